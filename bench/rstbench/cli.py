"""``bench/run``: rsttrace against the untraced kernel and the tools users would pick instead.

Phases, all in one network namespace of the bench's own:

1. throughput: for each storm mode and round, every configuration in turn (the order rotates
   each round so drift and other load hit all alike) runs the same storm; each figure is a ratio
   to the untraced storm of the same round. Counters are compared with the namespace's OutRsts.
2. python: rsttrace with every event and a rate-capped one-process storm, stepping the rate up:
   the highest event rate that crosses to user space with no loss (read live from rsttrace's
   own stats map), and a py-spy profile of the Python side at saturation.
3. kernel: kernel.bpf_stats_enabled=1 and the storm again: run_time_ns / run_cnt of the programs
   each tool loaded (told apart by the fds the tool holds, not by name).
4. memory: 10 M events over 1 M distinct peers (a port scan's shape) through `trace` and
   `export`, RSS sampled after each chunk: the ceiling and whether it stays flat.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from . import profile, report
from .storm import EVENTS_PER_ITERATION, storm
from .system import (
    BenchError,
    Netns,
    bpf_stats_enabled,
    compile_storm,
    delta,
    find_tools,
    foreign_tracers,
    load,
    machine,
    map_name,
    map_percpu_sums,
    owned_bpf,
    prog_stats,
)
from .tools import (
    Config,
    Running,
    configurations,
    has_all_events,
    has_raw_flag,
    has_top,
    has_write_flag,
    pick_bpftrace_program,
)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
REPO = os.path.dirname(HERE)

# rsttrace's "stats" map slots (bpf/rsttrace.h enum rsttrace_stat)
STAT_EVENTS, STAT_RINGBUF_FULL = 0, 1


@dataclass
class Params:
    rounds: int  # closed storm
    rounds_other: int  # abort and overflow storms
    duration: float
    modes: List[str]
    procs: int
    sweep_step: float
    sweep_start: float  # events/s
    sweep_max_steps: int
    kernel_duration: float
    kernel_configs: List[str]
    rss_events: int
    rss_peers: int
    rss_chunk: int  # iterations per chunk
    rss_budget: float  # seconds per tool at most
    profile_seconds: float
    configs: str = ""  # --configs: only these throughput rows (comma list); "": all


FULL = Params(rounds=5, rounds_other=3, duration=5.0, modes=["closed", "abort", "overflow"], procs=0, sweep_step=3.0,
              sweep_start=25000.0, sweep_max_steps=12, kernel_duration=5.0,
              kernel_configs=["counters", "trace_all", "bpftrace"], rss_events=10_000_000, rss_peers=1_000_000,
              rss_chunk=500_000, rss_budget=600.0, profile_seconds=8.0)
QUICK = Params(rounds=1, rounds_other=1, duration=1.0, modes=["closed"], procs=0, sweep_step=1.0, sweep_start=20000.0,
               sweep_max_steps=1, kernel_duration=1.0, kernel_configs=["trace_all"], rss_events=40_000,
               rss_peers=10_000, rss_chunk=10_000, rss_budget=10.0, profile_seconds=0.0)


@dataclass
class RoundResult:
    mode: str
    round: int
    pair: int  # the untraced run and the configuration run measured back to back
    config: str
    per_sec: float
    iterations: int
    seconds: float
    storm_errors: int
    out_rsts: int
    counted: Optional[int]
    delivered: Optional[int]
    lost: Optional[int]
    cpu_s: Optional[float]
    rss_kib: Optional[int]
    hwm_kib: Optional[int]
    ready_s: Optional[float]
    foreign: List[str] = field(default_factory=list)
    detail: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace, params: Params) -> None:
        self.t0 = time.monotonic()
        self.active: List[Running] = []
        self.args = args
        self.p = params
        self.out_dir = args.out
        self.rsttrace: List[str] = shlex.split(args.rsttrace)
        self.tools = find_tools(install=not args.no_install)
        if not self.tools.get("cc"):
            raise BenchError("no C compiler: apt-get install gcc libc6-dev")
        self.storm_exe = compile_storm(str(self.tools["cc"]), os.path.join(HERE, "storm.c"), self.out_dir)
        self.procs = params.procs or (os.cpu_count() or 1)
        self.all_events = has_all_events(self.rsttrace)
        self.configs = {c.key: c for c in configurations(self.all_events, has_raw_flag(self.rsttrace),
                                                         has_write_flag(self.rsttrace), has_top(self.rsttrace))}
        self.bpftrace: Dict[str, str] = {}
        self.only = [k.strip() for k in params.configs.split(",") if k.strip()]
        unknown = [k for k in self.only if k not in self.configs]
        if unknown:
            raise BenchError("--configs: no row %s here (rows: %s)" % (",".join(unknown), ",".join(self.configs)))
        self.ns = Netns()
        self.results: Dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine(),
            "quick": args.quick,
            "params": asdict(params),
            "procs": self.procs,
            "rsttrace": self.rsttrace,
            "all_events_flag": self.all_events,
            "tools": self.tools,
            "load_before": load(),
            "rounds": [],
        }
        self.log("namespace %s (inode %d), storm %s, %d storm processes"
                 % (self.ns.name, self.ns.inode, self.storm_exe, self.procs))

    def log(self, msg: str) -> None:
        sys.stderr.write("bench: %5.1f s %s\n" % (time.monotonic() - self.t0, msg))
        sys.stderr.flush()

    def close(self) -> None:
        for r in self.active:  # after an error or an interrupt: leave nothing running
            if r.launch is not None and r.launch.proc.poll() is None:
                r.launch.stop(10)
        self.ns.delete()

    # --- helpers ---------------------------------------------------------------------------
    def start(self, cfg: Config) -> Tuple[Running, Optional[float]]:
        r = Running(cfg, self.rsttrace, self.ns, self.tools, self.out_dir, self.bpftrace.get("program"))
        self.active = [a for a in self.active if a.launch is not None and a.launch.proc.poll() is None] + [r]
        ready = r.wait_ready(120)
        return r, ready

    # --- phase 1 ---------------------------------------------------------------------------
    def pick_bpftrace(self) -> None:
        if self.tools.get("bpftrace") and "program" not in self.bpftrace:
            self.bpftrace = pick_bpftrace_program(str(self.tools["bpftrace"]))
            self.log("bpftrace: %s" % (self.bpftrace.get("program") or "no one-liner compiled"))
        self.results["bpftrace"] = self.bpftrace

    def available(self, key: str) -> bool:
        if key == "bpftrace":
            self.pick_bpftrace()
            return bool(self.bpftrace.get("program"))
        if key == "tcpdump":
            return bool(self.tools.get("tcpdump"))
        return True

    def throughput(self) -> None:
        keys = [k for k in self.configs if (not self.only or k in self.only or k == "untraced") and self.available(k)]
        self.results["configs"] = {k: self.configs[k].label for k in keys}
        self.results["unavailable"] = [k for k in self.configs if k not in keys]
        storm(self.storm_exe, self.ns, "closed", self.procs, 1.0)  # warm-up: caches, allocator pools
        tools = [k for k in keys if k != "untraced"]
        pair = 0
        for mode in self.p.modes:
            for rnd in range(self.p.rounds if mode == "closed" else self.p.rounds_other):
                order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]
                for key in order:
                    # Each configuration is paired with an untraced storm run just before its
                    # start, seconds apart: the machine's load (other people's tests, here)
                    # drifts over a round's minute, far less over a pair's ten seconds.
                    pair += 1
                    for k in ("untraced", key):
                        res = self.one(self.configs[k], mode, rnd, pair)
                        self.results["rounds"].append(asdict(res))
                        self.log("%-8s round %d %-10s %9.0f it/s  out_rsts %d counted %s delivered %s lost %s %s"
                                 % (mode, rnd + 1, k, res.per_sec, res.out_rsts, res.counted, res.delivered,
                                    res.lost, res.detail))

    def one(self, cfg: Config, mode: str, rnd: int, pair: int) -> RoundResult:
        running, ready = self.start(cfg)
        pid = running.pid
        own = owned_bpf(pid)[0] if pid else set()
        foreign = foreign_tracers(own, self.tools.get("bpftool"))
        before = self.ns.counters()
        cpu0 = running.launch.cpu() if running.launch else None
        s = storm(self.storm_exe, self.ns, mode, self.procs, self.p.duration)
        cpu1 = running.launch.cpu() if running.launch else None
        mem = running.launch.memory() if running.launch else {}
        if cfg.events:
            time.sleep(0.5)  # let the reader drain the ring before it is stopped
        elif cfg.kind == "tcpdump":
            time.sleep(1.2)  # libpcap hands over a block when full or after its 1 s timeout
        after = self.ns.counters()
        rep = running.finish()
        return RoundResult(
            mode=mode, round=rnd + 1, pair=pair, config=cfg.key, per_sec=s.per_sec, iterations=s.iterations,
            seconds=s.seconds, storm_errors=s.errors, out_rsts=delta(before, after, "Tcp", "OutRsts"),
            counted=rep.counted, delivered=rep.delivered, lost=rep.lost,
            cpu_s=(cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
            rss_kib=mem.get("VmRSS"), hwm_kib=mem.get("VmHWM"), ready_s=ready, foreign=foreign,
            detail=rep.detail.strip(),
        )

    # --- phase 2 and 3 ---------------------------------------------------------------------
    def stats_map(self, pid: int) -> Optional[int]:
        bpftool = self.tools.get("bpftool")
        if not bpftool:
            return None
        for mid in sorted(owned_bpf(pid)[1]):
            if map_name(mid, bpftool) == "stats":
                return mid
        return None

    def read_stats(self, map_id: Optional[int]) -> Tuple[int, int]:
        """(events handed to the ring, events lost: ring full), live from the kernel."""
        if map_id is None or not self.tools.get("bpftool"):
            return 0, 0
        d = map_percpu_sums(map_id, str(self.tools["bpftool"]))
        return d.get(STAT_EVENTS, 0), d.get(STAT_RINGBUF_FULL, 0)

    def python_and_kernel(self, skip: Set[str]) -> None:
        """One every-event rsttrace for the rate sweep, the profile and its kernel cost."""
        cfg = self.configs["trace_all"]
        running, ready = self.start(cfg)
        assert running.pid is not None
        mid = self.stats_map(running.pid)
        kernel: List[Dict[str, Any]] = []
        try:
            if "python" not in skip:
                sweep: List[Dict[str, Any]] = []
                best = 0.0
                if mid is None:
                    self.log("no bpftool or no stats map: the no-loss sweep needs both")
                else:
                    sweep, best = self.sweep(running, mid)
                py: Dict[str, Any] = {"sweep": sweep, "max_lossless_events_per_s": best, "ready_s": ready}
                self.results["python"] = py
                py["saturated"] = self.saturate(running, mid)
            if "kernel" not in skip:
                kernel.append(self.kernel_cost_running(running, "trace_all"))
        finally:
            rep = running.finish()
        if "python" in self.results:
            self.results["python"]["stopped"] = asdict(rep)
        if "python" not in skip and "trace_w" in self.configs:
            self.results["python_w"] = self.python_one("trace_w")
        if "kernel" in skip:
            return
        for key in self.p.kernel_configs:
            if key == "trace_all" or not self.available(key):
                continue
            running, _ = self.start(self.configs[key])
            try:
                kernel.append(self.kernel_cost_running(running, key))
            finally:
                running.finish()
        self.results["kernel"] = kernel

    def python_one(self, key: str) -> Dict[str, Any]:
        """The no-loss sweep and the saturated storm for another every-event configuration
        (trace -w beside trace --json)."""
        running, ready = self.start(self.configs[key])
        assert running.pid is not None
        mid = self.stats_map(running.pid)
        py: Dict[str, Any] = {"config": key, "sweep": [], "max_lossless_events_per_s": 0.0, "ready_s": ready}
        try:
            if mid is None:
                self.log("no bpftool or no stats map: the no-loss sweep needs both")
            else:
                py["sweep"], py["max_lossless_events_per_s"] = self.sweep(running, mid)
            py["saturated"] = self.saturate(running, mid)
        finally:
            py["stopped"] = asdict(running.finish())
        return py

    def sweep(self, running: Running, mid: int) -> Tuple[List[Dict[str, Any]], float]:
        """The highest event rate rsttrace takes with no loss: step the rate up by 1.4x (or down
        by 2x while even the first is lossy), then bisect twice between the best lossless and the
        lowest lossy rate."""
        per_it = EVENTS_PER_ITERATION["closed"]
        rate = self.p.sweep_start
        steps: List[Dict[str, Any]] = []
        best, bad = 0.0, 0.0
        searching, bisections = self.p.sweep_max_steps, 2
        while searching > 0 or (bisections > 0 and best and bad and bad / best > 1.1):
            if searching > 0:
                searching -= 1
            else:
                bisections -= 1
                rate = (best + bad) / 2
            ev0, lost0 = self.read_stats(mid)
            cpu0 = running.launch.cpu() if running.launch else None
            s = storm(self.storm_exe, self.ns, "closed", 1, self.p.sweep_step, rate=rate / per_it)
            time.sleep(0.3)
            ev1, lost1 = self.read_stats(mid)
            cpu1 = running.launch.cpu() if running.launch else None
            achieved = s.iterations * per_it / s.seconds
            lost = lost1 - lost0
            steps.append({"target": rate, "achieved": achieved, "submitted": ev1 - ev0, "lost": lost,
                          "cpu_s": (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
                          "seconds": s.seconds})
            self.log("python sweep: target %.0f ev/s achieved %.0f lost %d" % (rate, achieved, lost))
            if lost == 0 and achieved >= 0.9 * rate:
                best = max(best, achieved)
                if bad:
                    searching = 0
                rate *= 1.4
            elif lost == 0:
                break  # the generator cannot go faster: nothing above to find
            else:
                bad = min(bad, rate) if bad else rate
                if best or rate < 2000:
                    searching = 0
                rate /= 2
        return steps, best

    def saturate(self, running: Running, mid: Optional[int]) -> Dict[str, Any]:
        """An unthrottled one-process storm: how many events/s Python takes when it cannot keep
        up (the rest is lost and counted), and where its time goes (py-spy)."""
        if not running.launch or not self.p.profile_seconds:
            return {}
        pyspy = profile.find_pyspy(self.rsttrace)
        dur = self.p.profile_seconds
        prof: Dict[str, Any] = {}
        ev0, lost0 = self.read_stats(mid)
        cpu0 = running.launch.cpu()
        threads = []
        svg: Dict[str, Any] = {}
        if pyspy:
            pid = running.launch.pid

            def record_into(sink: Dict[str, Any], fmt: str) -> None:
                sink.update(profile.record(str(pyspy), pid, dur - 1.0, self.out_dir, fmt))

            # Folded stacks for the tallies and a flame graph to look at, sampled side by side.
            for fmt, sink in (("raw", prof), ("flamegraph", svg)):
                th = threading.Thread(target=record_into, args=(sink, fmt))
                th.start()
                threads.append(th)
        s = storm(self.storm_exe, self.ns, "closed", 1, dur)
        for th in threads:
            th.join(60)
        prof["svg"] = svg.get("file") or svg.get("error")
        time.sleep(0.3)
        ev1, lost1 = self.read_stats(mid)
        cpu1 = running.launch.cpu()
        out: Dict[str, Any] = {"storm_per_sec": s.per_sec, "events_through": ev1 - ev0, "lost": lost1 - lost0,
                               "seconds": s.seconds, "events_per_s": (ev1 - ev0) / s.seconds,
                               "cpu_s": (cpu1 or 0) - (cpu0 or 0)}
        if ev1 > ev0 and out["cpu_s"]:
            out["cpu_us_per_event"] = out["cpu_s"] * 1e6 / (ev1 - ev0)
        out["profile"] = prof if pyspy else {"error": "py-spy not found (pip install py-spy)"}
        self.log("python saturated: %.0f events/s through, %d lost, %.1f us CPU per event"
                 % (out["events_per_s"], out["lost"], out.get("cpu_us_per_event", 0)))
        return out

    def kernel_cost_running(self, running: Running, key: str) -> Dict[str, Any]:
        assert running.pid is not None
        bpftool = self.tools.get("bpftool")
        with bpf_stats_enabled() as ok:
            if not ok:
                return {"config": key, "error": "kernel.bpf_stats_enabled cannot be set"}
            base = {p.prog_id: p for p in prog_stats(running.pid, bpftool)}
            s = storm(self.storm_exe, self.ns, "closed", self.procs, self.p.kernel_duration)
            now = prog_stats(running.pid, bpftool)
        progs = []
        total_ns = total_runs = 0
        for p in now:
            b = base.get(p.prog_id)
            ns = p.run_time_ns - (b.run_time_ns if b else 0)
            cnt = p.run_cnt - (b.run_cnt if b else 0)
            total_ns += ns
            total_runs += cnt
            progs.append({"name": p.name, "id": p.prog_id, "run_cnt": cnt, "run_time_ns": ns,
                          "ns_per_run": ns / cnt if cnt else None})
        self.log("kernel cost %s: %s" % (key, ", ".join("%s %s ns x %s" % (p["name"], p["ns_per_run"], p["run_cnt"])
                                                        for p in progs)))
        return {"config": key, "programs": progs, "storm_per_sec": s.per_sec, "iterations": s.iterations,
                "ns_per_run": total_ns / total_runs if total_runs else None,
                "ns_per_iteration": total_ns / s.iterations if s.iterations else None}

    # --- phase 4 ---------------------------------------------------------------------------
    def memory(self) -> None:
        out = []
        for key in ("trace_all", "export"):
            out.append(self.memory_one(self.configs[key]))
        self.results["memory"] = out

    def memory_one(self, cfg: Config) -> Dict[str, Any]:
        running, ready = self.start(cfg)
        assert running.launch is not None and running.pid is not None
        mid = self.stats_map(running.pid)
        samples: List[Dict[str, Any]] = []
        start_mem = running.launch.memory()
        started = time.monotonic()
        iterations = 0
        through = lost = 0
        per_it = EVENTS_PER_ITERATION["closed"]
        try:
            while time.monotonic() - started < self.p.rss_budget:
                # One process: the other core is Python's, so most events get through.
                s = storm(self.storm_exe, self.ns, "closed", 1, 3600, iterations=self.p.rss_chunk,
                          peers=self.p.rss_peers)
                iterations += s.iterations
                time.sleep(0.2)
                ev, lo = self.read_stats(mid)
                through, lost = (ev, lo) if mid is not None else (iterations * per_it, 0)
                m = running.launch.memory()
                samples.append({"iterations": iterations, "events_through": through, "lost": lost,
                                "rss_kib": m.get("VmRSS"), "hwm_kib": m.get("VmHWM"), "anon_kib": m.get("RssAnon"),
                                "file_kib": m.get("RssFile"),
                                "t": round(time.monotonic() - started, 1)})
                self.log("memory %s: %d events through, %d lost, RSS %s KiB"
                         % (cfg.key, through, lost, m.get("VmRSS")))
                # Done when the storm made the events; how many of them Python took (the rest
                # were lost and counted) is reported beside the memory.
                if iterations * per_it >= self.p.rss_events:
                    break
        finally:
            rep = running.finish()
        rss = [x["rss_kib"] for x in samples if x["rss_kib"]]
        # Flat: after the first chunk (allocator pools, first series, code paths warmed), RSS
        # grows by no more than 4 MiB however many more peers and events pass.
        growth = (max(rss[1:]) - rss[0]) if len(rss) > 1 else 0
        return {"config": cfg.key, "ready_s": ready, "start_rss_kib": start_mem.get("VmRSS"), "samples": samples,
                "events_target": self.p.rss_events, "peers": self.p.rss_peers,
                "events_generated": iterations * per_it, "events_through": through, "lost": lost,
                "hwm_kib": max((x["hwm_kib"] or 0) for x in samples) if samples else None,
                "growth_after_first_chunk_kib": growth, "flat": growth <= 4096, "stopped": asdict(rep)}


def default_rsttrace() -> str:
    """rsttrace as installed by scripts/install, else on PATH, else the test venv."""
    for cand in ("/opt/rsttrace/venv/bin/rsttrace", shutil.which("rsttrace"), "/tmp/venv/bin/rsttrace"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return "rsttrace"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (under a minute): checks the bench works")
    p.add_argument("--rounds", type=int, help="rounds per storm mode (full: 5 closed, 3 abort and overflow)")
    p.add_argument("--duration", type=float, help="seconds per storm (full: 5)")
    p.add_argument("--modes", help="storm modes, comma list: closed,abort,overflow (full: all)")
    p.add_argument("--procs", type=int, default=0, help="storm processes (default: one per core)")
    p.add_argument("--skip", default="", help="phases to skip, comma list: throughput,python,kernel,memory")
    p.add_argument("--configs", default="",
                   help="only these throughput rows, comma list of keys (untraced is always paired): counters, "
                        "counters_perf, trace, trace_all, trace_w, export, top, bpftrace, tcpdump (default: all)")
    p.add_argument("--rsttrace", default=default_rsttrace(),
                   help="how to run rsttrace (a command line; default %(default)s)")
    p.add_argument("--out", help="directory for results.json, table.md, profiles (default bench/out/DATE)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install missing bpftrace/tcpdump/bpftool")
    return p.parse_args(argv)


def _interrupt(_sig: int, _frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("bench: must run as root (sudo bench/run)\n")
        return 2
    base = QUICK if args.quick else FULL
    params = Params(**asdict(base))
    params.configs = args.configs
    if args.rounds:
        params.rounds = params.rounds_other = args.rounds
    if args.duration:
        params.duration = args.duration
    if args.modes:
        params.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in params.modes if m not in EVENTS_PER_ITERATION]
        if bad:
            sys.stderr.write("bench: unknown mode %s (closed, abort, overflow)\n" % ",".join(bad))
            return 2
    params.procs = args.procs
    args.out = args.out or os.path.join(HERE, "out", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(args.out, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    # SIGTERM, and SIGINT even where a shell started us in the background with it ignored,
    # unwind through the cleanup: tools stopped, namespace deleted, results written.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        bench = Bench(args, params)
    except BenchError as e:
        sys.stderr.write("bench: error: %s\n" % e)
        return 2
    try:
        if "throughput" not in skip:
            bench.throughput()
        if not {"python", "kernel"} <= skip:
            bench.python_and_kernel(skip)
        if "memory" not in skip:
            bench.memory()
    except (BenchError, RuntimeError) as e:
        sys.stderr.write("bench: error: %s\n" % e)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted; partial results kept\n")
        return 130
    finally:
        bench.close()
        bench.results["load_after"] = load()
        bench.results["elapsed_s"] = round(time.monotonic() - started, 1)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(bench.results, f, indent=1, default=str)
    text = report.render(bench.results)
    sys.stdout.write(text + "\n")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(report.markdown(bench.results) + "\n")
    sys.stderr.write("bench: results in %s (%.0f s)\n" % (args.out, time.monotonic() - started))
    return 0
