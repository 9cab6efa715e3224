"""The configurations under test: how each is started, known to be ready, scraped and stopped.

A configuration is what a user would run: rsttrace in one of its modes, a bpftrace one-liner or
tcpdump writing a pcap. Each is started before the storm, measured only once it says it is
attached (so start-up cost is reported separately and never counted against throughput), and
stopped after it, with whatever it reports on exit parsed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Optional, Sequence

from .system import Netns, cpu_seconds, free_port, memory_kib, run

# Tried in order until one compiles and attaches: bpftrace 0.17 reads the 6.10+ `enum
# sk_rst_reason` field through args->; newer ones also take args.reason; a cast is the last resort.
# bpftrace prints "Attaching N probes..." *before* attaching; BEGIN fires once every probe is
# attached, so its line is the ready signal (it costs nothing per event).
BPFTRACE_READY = 'BEGIN { printf("attached\\n"); } '
BPFTRACE_PROGRAMS = (
    "tracepoint:tcp:tcp_send_reset { @[args->reason] = count(); }",
    "tracepoint:tcp:tcp_send_reset { @[args.reason] = count(); }",
    "tracepoint:tcp:tcp_send_reset { @[(uint32)args->reason] = count(); }",
    "tracepoint:tcp:tcp_send_reset { @ = count(); }",
)
TCPDUMP_FILTER = "tcp[tcpflags] & tcp-rst != 0"
PCAPNG = "{pcapng}"  # in a configuration's arguments: the file `trace -w` writes (in the bench's out dir)


@dataclass
class Config:
    key: str
    label: str
    kind: str  # none, rsttrace, bpftrace, tcpdump
    args: List[str] = field(default_factory=list)  # rsttrace subcommand and flags
    events: bool = False  # events cross to user space (delivered/lost are reported)


def configurations(all_events_flag: bool, raw_flag: bool = False, write_flag: bool = False,
                   top_flag: bool = False) -> List[Config]:
    """``raw_flag``: rsttrace has --no-raw-tracepoints; a row then measures the perf tracepoints
    it would fall back to, against the raw ones it uses, in the same run. ``write_flag``: it has
    `trace -w FILE.pcapng`; a row then measures every event written to a pcapng file, beside
    tcpdump's pcap. ``top_flag``: it has `rsttrace top`; a row then measures its in-kernel map
    sampled each second (issue 15's target: no costlier than export)."""
    every = ["--all-events"] if all_events_flag else []
    summary = ["summary", "--interval", "3600", "--json"]
    perf = [Config("counters_perf", "rsttrace summary, perf tracepoints", "rsttrace",
                   summary + ["--no-raw-tracepoints"])] if raw_flag else []
    write = [Config("trace_w", "rsttrace trace -w pcapng, every event", "rsttrace", ["trace", "-w", PCAPNG, *every],
                    events=True)] if write_flag else []
    top = [Config("top", "rsttrace top --json --rows 20, sampled 1/s", "rsttrace",
                  ["top", "--json", "-d", "1", "--rows", "20"])] \
        if top_flag else []
    return [
        Config("untraced", "untraced", "none"),
        Config("counters", "rsttrace summary (counters only)", "rsttrace", summary),
        *perf,
        Config("trace", "rsttrace trace --json (default)", "rsttrace", ["trace", "--json"], events=True),
        Config("trace_all", "rsttrace trace --json, every event", "rsttrace", ["trace", "--json", *every], events=True),
        *write,
        Config("export", "rsttrace export, scraped 1/s", "rsttrace", ["export", "--netns-label"], events=True),
        *top,
        Config("bpftrace", "bpftrace one-liner by reason", "bpftrace"),
        Config("tcpdump", "tcpdump -w pcap, RST filter", "tcpdump"),
    ]


def has_raw_flag(rsttrace: Sequence[str]) -> bool:
    """Whether this rsttrace has `summary --no-raw-tracepoints` (raw tracepoints by default)."""
    p = run(list(rsttrace) + ["summary", "--help"], check=False)
    return "--no-raw-tracepoints" in p.stdout


def has_write_flag(rsttrace: Sequence[str]) -> bool:
    """Whether this rsttrace has `trace -w FILE` (pcapng)."""
    p = run(list(rsttrace) + ["trace", "--help"], check=False)
    return "--write" in p.stdout


def has_top(rsttrace: Sequence[str]) -> bool:
    """Whether this rsttrace has `rsttrace top`."""
    p = run(list(rsttrace) + ["top", "--help"], check=False)
    return p.returncode == 0 and "--max-keys" in p.stdout


def has_all_events(rsttrace: Sequence[str]) -> bool:
    """Whether this rsttrace has `trace --all-events` (added if the default ever samples)."""
    p = run(list(rsttrace) + ["trace", "--help"], check=False)
    return "--all-events" in p.stdout


class Launch:
    """One running tool: its process, its output lines, when it became ready."""

    def __init__(self, argv: List[str], ready: Callable[[str], bool], stdout_to_null: bool,
                 stop_signal: int = signal.SIGTERM) -> None:
        self.argv = argv
        self.ready_match = ready
        self.stop_signal = stop_signal
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        self._ready = threading.Event()
        self.started = time.monotonic()
        self.ready_after: Optional[float] = None
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if stdout_to_null else subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace",
            # its own process group: stopping it never signals the bench
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._threads: List[threading.Thread] = []
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            if stream is not None:
                t = threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                t.start()
                self._threads.append(t)

    def _read(self, stream: IO[str], sink: List[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            sink.append(line)
            if not self._ready.is_set() and self.ready_match(line):
                self.ready_after = time.monotonic() - self.started
                self._ready.set()

    def wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._ready.wait(0.05):
                return True
            if self.proc.poll() is not None:
                for t in self._threads:
                    t.join(2)
                return self._ready.is_set()
        return False

    def cpu(self) -> Optional[float]:
        return cpu_seconds(self.pid)

    def memory(self) -> Dict[str, int]:
        return memory_kib(self.pid)

    def stop(self, timeout: float = 30.0) -> int:
        # Signal again each second: bpftrace ignores a SIGINT that arrives between its BEGIN
        # probe and installing its handler.
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            try:
                os.kill(self.pid, self.stop_signal)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for t in self._threads:
            t.join(5)
        return self.proc.returncode

    def output(self) -> str:
        return "\n".join(self.stderr[-20:] + self.stdout[-20:])


def json_lines(lines: List[str]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for line in lines:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def log_event(lines: List[str], name: str) -> Optional[Dict[str, Any]]:
    found = [d for d in json_lines(lines) if d.get("event") == name]
    return found[-1] if found else None


@dataclass
class ToolReport:
    """What a tool said about one storm once stopped."""

    counted: Optional[int] = None  # sent resets the tool counted in the storm's namespace
    delivered: Optional[int] = None  # events (or packets) it got to user space
    lost: Optional[int] = None
    detail: str = ""


class Scraper:
    """GET /metrics every second while the storm runs, like a Prometheus scrape interval."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.url = url
        self.interval = interval
        self.stop_flag = threading.Event()
        self.scrapes = 0
        self.failures = 0
        self.durations: List[float] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop_flag.wait(self.interval):
            t = time.monotonic()
            try:
                fetch(self.url)
                self.scrapes += 1
                self.durations.append(time.monotonic() - t)
            except OSError:
                self.failures += 1

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(10)


def fetch(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_sum(text: str, name: str, **labels: str) -> int:
    """Sum of a metric's samples whose labels include ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return int(total)


class Running:
    """A configuration started and ready; ``finish`` stops it and reads its report."""

    def __init__(self, cfg: Config, rsttrace: Sequence[str], ns: Netns, tools: Dict[str, Optional[str]],
                 out_dir: str, bpftrace_program: Optional[str] = None) -> None:
        self.cfg = cfg
        self.ns = ns
        self.port = 0
        self.scraper: Optional[Scraper] = None
        self.pcap = ""
        self.launch: Optional[Launch] = None
        if cfg.kind == "rsttrace":
            if PCAPNG in cfg.args:
                self.pcap = os.path.join(out_dir, "rsttrace.pcapng")
            argv = list(rsttrace) + ["--log-format", "json"] + [self.pcap if a == PCAPNG else a for a in cfg.args]
            if cfg.key.startswith("export") or cfg.args[0] == "export":
                self.port = free_port()
                argv += ["--listen", "127.0.0.1:%d" % self.port]
            if cfg.args[0] in ("summary", "top"):
                argv += ["--netns", str(ns.inode)]
            # trace's events go to /dev/null, as `rsttrace trace --json > /dev/null`
            self.launch = Launch(argv, _rsttrace_ready, stdout_to_null=cfg.args[0] == "trace")
        elif cfg.kind == "bpftrace":
            assert tools.get("bpftrace") and bpftrace_program
            self.launch = Launch([str(tools["bpftrace"]), "-e", BPFTRACE_READY + bpftrace_program],
                                 lambda line: line == "attached", stdout_to_null=False,
                                 stop_signal=signal.SIGINT)
        elif cfg.kind == "tcpdump":
            assert tools.get("tcpdump")
            self.pcap = os.path.join(out_dir, "rst.pcap")
            # Inside the storm's namespace: its lo is where the storm's packets are.
            argv = ns.prefix() + [str(tools["tcpdump"]), "-i", "lo", "-w", self.pcap, TCPDUMP_FILTER]
            self.launch = Launch(argv, lambda line: "listening on" in line, stdout_to_null=False,
                                 stop_signal=signal.SIGINT)

    @property
    def pid(self) -> Optional[int]:
        return self.launch.pid if self.launch else None

    def wait_ready(self, timeout: float) -> Optional[float]:
        """Seconds from start to attached, or raises RuntimeError with the tool's output."""
        if self.launch is None:
            return None
        if not self.launch.wait_ready(timeout):
            self.launch.stop()
            raise RuntimeError("%s did not become ready: %s" % (self.cfg.label, self.launch.output()))
        if self.port:
            self.scraper = Scraper("http://127.0.0.1:%d/metrics" % self.port)
        return self.launch.ready_after

    def finish(self) -> ToolReport:
        rep = ToolReport()
        if self.launch is None:
            return rep
        final_metrics = ""
        if self.scraper is not None:
            self.scraper.stop()
            try:
                final_metrics = fetch("http://127.0.0.1:%d/metrics" % self.port)
            except OSError as e:
                rep.detail = "final scrape failed: %s" % e
        rc = self.launch.stop()
        if rc not in (0, -signal.SIGINT, -signal.SIGTERM):
            rep.detail += " exit %s: %s" % (rc, self.launch.output()[-300:])
        if self.cfg.kind == "rsttrace":
            self._rsttrace(rep, final_metrics)
            if self.pcap:
                try:
                    rep.detail += " pcapng %d bytes" % os.path.getsize(self.pcap)
                    os.unlink(self.pcap)  # as tcpdump's: the figures are what matter
                except OSError:
                    pass
        elif self.cfg.kind == "bpftrace":
            # "@[1]: 12345" (or "@: 12345") per reason; system-wide, so it includes anyone's resets.
            counts = [int(m.group(1)) for m in (re.match(r"^@(?:\[.*\])?: (\d+)$", ln) for ln in self.launch.stdout)
                      if m]
            rep.counted = sum(counts)
            rep.delivered = None
        elif self.cfg.kind == "tcpdump":
            text = "\n".join(self.launch.stderr)
            cap = re.search(r"(\d+) packets? captured", text)
            drop = re.search(r"(\d+) packets? dropped by kernel", text)
            seen = re.search(r"(\d+) packets? received by filter", text)
            rep.delivered = int(cap.group(1)) if cap else None
            rep.lost = int(drop.group(1)) if drop else None
            rep.detail = "%s received by filter" % (seen.group(1) if seen else "?")
            try:
                os.unlink(self.pcap)  # up to hundreds of MB per round; the figures are what matter
            except OSError:
                pass
        return rep

    def _rsttrace(self, rep: ToolReport, metrics: str) -> None:
        assert self.launch is not None
        stopped = log_event(self.launch.stderr, "stopped")
        sub = self.cfg.args[0]
        if sub == "summary":
            rows = [d for d in json_lines(self.launch.stdout) if "rows" in d]
            if rows:
                last = rows[-1]
                rep.counted = sum(int(r["total"]) for r in last["rows"]
                                  if r.get("kind") == "sent")
                lost = last.get("lost") or {}
                rep.lost = int(lost.get("lost_kernel", 0)) + int(lost.get("lost_user", 0))
            else:
                rep.detail += " summary printed no totals"
            return
        if sub == "top":
            return  # nothing crosses to user space: no events to deliver or lose, no exit line
        if stopped is not None:
            rep.lost = int(stopped.get("lost_kernel", 0)) + int(stopped.get("lost_user", 0))
            if "delivered" in stopped:
                rep.delivered = int(stopped["delivered"])
        else:
            rep.detail += " no 'stopped' log line"
        if sub == "export" and metrics:
            rep.counted = metric_sum(metrics, "rsttrace_tcp_resets_sent_total", netns=str(self.ns.inode))
            if self.scraper is not None:
                rep.detail += " %d scrapes, %d failed" % (self.scraper.scrapes, self.scraper.failures)


def _rsttrace_ready(line: str) -> bool:
    return line.startswith("{") and '"ready"' in line and '"event": "ready"' in line


def pick_bpftrace_program(bpftrace: str) -> Dict[str, str]:
    """The first one-liner this bpftrace compiles and attaches, with what the others said."""
    tried: Dict[str, str] = {}
    for prog in BPFTRACE_PROGRAMS:
        launch = Launch([bpftrace, "-e", BPFTRACE_READY + prog], lambda line: line == "attached",
                        stdout_to_null=False, stop_signal=signal.SIGINT)
        ok = launch.wait_ready(60)
        launch.stop()
        if ok:
            tried[prog] = "ok"
            return {"program": prog, **{"tried: " + k: v for k, v in tried.items()}}
        tried[prog] = " ".join(ln for ln in launch.stderr if "RLIMIT_MEMLOCK" not in ln)[-300:]
    return {"program": "", **{"tried: " + k: v for k, v in tried.items()}}
