"""What the bench reads from and does to the machine: network namespaces, /proc, BPF stats, tools.

Everything here is stdlib and Python 3.9 compatible: the bench must run from a fresh clone with
the system's python3, before or without rsttrace's own virtualenv.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

CLK_TCK = os.sysconf("SC_CLK_TCK")
RUN_NETNS = "/run/netns"

Counters = Dict[str, Dict[str, int]]


class BenchError(Exception):
    """The bench cannot go on; the message says why and what to do."""


def run(cmd: Sequence[str], timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True,
                           timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise BenchError("%s: not found" % cmd[0]) from e
    if check and p.returncode != 0:
        raise BenchError("%s failed (%d): %s" % (" ".join(cmd), p.returncode, p.stderr.strip()[-500:]))
    return p


# --- network namespace ---------------------------------------------------------------------
class Netns:
    """A namespace of the bench's own: the storm's traffic and counters stay in it."""

    def __init__(self, prefix: str = "rsttrace-bench-") -> None:
        self.name = prefix + uuid.uuid4().hex[:8]
        run(["ip", "netns", "add", self.name])
        try:
            run(["ip", "-n", self.name, "link", "set", "lo", "up"])
            # The overflow storm wants a RST for each overflowed final ACK (sent and received
            # resets, like the other storms); the sysctl is per namespace.
            self.sysctl("net.ipv4.tcp_abort_on_overflow", "1")
        except BenchError:
            self.delete()
            raise
        self.inode = os.stat(os.path.join(RUN_NETNS, self.name)).st_ino

    def prefix(self) -> List[str]:
        return ["ip", "netns", "exec", self.name]

    def sysctl(self, name: str, value: str) -> None:
        run(self.prefix() + ["sysctl", "-q", "-w", "%s=%s" % (name, value)])

    def counters(self) -> Counters:
        """The namespace's own /proc/net/snmp and /proc/net/netstat (what `nstat` reads)."""
        out = run(self.prefix() + ["cat", "/proc/net/snmp", "/proc/net/netstat"]).stdout
        return parse_snmp(out)

    def delete(self) -> None:
        run(["ip", "netns", "del", self.name], check=False)


def parse_snmp(text: str) -> Counters:
    """Pairs of lines "Section: names..." / "Section: values..." into {section: {name: value}}."""
    out: Counters = {}
    lines = [ln for ln in text.splitlines() if ":" in ln]
    for head, vals in zip(lines[::2], lines[1::2]):
        sec, names = head.split(":", 1)
        sec2, values = vals.split(":", 1)
        if sec != sec2:
            continue
        d = out.setdefault(sec, {})
        for n, v in zip(names.split(), values.split()):
            try:
                d[n] = int(v)
            except ValueError:
                pass
    return out


def delta(before: Counters, after: Counters, section: str, name: str) -> int:
    return after.get(section, {}).get(name, 0) - before.get(section, {}).get(name, 0)


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


# --- processes -----------------------------------------------------------------------------
def cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of a live process, from /proc/<pid>/stat (fields 14 and 15)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            text = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> Dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon (heap: what grows) and RssFile (mapped libraries) in KiB."""
    out: Dict[str, int] = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


# --- BPF -----------------------------------------------------------------------------------
@dataclass
class ProgStat:
    prog_id: int
    name: str
    run_time_ns: int
    run_cnt: int

    @property
    def ns_per_run(self) -> Optional[float]:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None


def _fdinfo(pid: int) -> Iterator[Dict[str, str]]:
    d = "/proc/%d/fdinfo" % pid
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        try:
            with open(os.path.join(d, n)) as f:
                text = f.read()
        except OSError:
            continue
        info: Dict[str, str] = {}
        for line in text.splitlines():
            k, sep, v = line.partition(":")
            if sep:
                info[k.strip()] = v.strip()
        yield info


def owned_bpf(pid: int) -> Tuple[Set[int], Set[int]]:
    """(program ids, map ids) whose fds this process holds: which loaded programs are *its*.

    Other engineers' tests may load rsttrace's programs at the same time, so names alone
    cannot tell ours apart; the fds can.
    """
    progs: Set[int] = set()
    maps: Set[int] = set()
    for info in _fdinfo(pid):
        if "prog_id" in info:
            progs.add(int(info["prog_id"]))
        elif "map_id" in info:
            maps.add(int(info["map_id"]))
    return progs, maps


def prog_stats(pid: int, bpftool: Optional[str]) -> List[ProgStat]:
    """run_time_ns / run_cnt of the programs this process holds (kernel.bpf_stats_enabled=1).

    `bpftool -j prog show` gives names; fdinfo gives the same counters when bpftool is absent.
    """
    ids, _ = owned_bpf(pid)
    out: List[ProgStat] = []
    if bpftool:
        p = run([bpftool, "-j", "prog", "show"], check=False)
        try:
            for prog in json.loads(p.stdout or "[]"):
                if prog.get("id") in ids:
                    out.append(ProgStat(prog["id"], prog.get("name", "?"), int(prog.get("run_time_ns", 0)),
                                        int(prog.get("run_cnt", 0))))
            return out
        except ValueError:
            out = []
    for info in _fdinfo(pid):
        if "prog_id" in info:
            out.append(ProgStat(int(info["prog_id"]), "prog%s" % info["prog_id"], int(info.get("run_time_ns", 0)),
                                int(info.get("run_cnt", 0))))
    return out


TRACING_TYPES = {"tracepoint", "raw_tracepoint", "tracing", "kprobe", "perf_event"}


def foreign_tracers(own: Set[int], bpftool: Optional[str]) -> List[str]:
    """Tracing programs loaded by anyone but the tool under test: they tax every storm alike
    (including "untraced"), so the report names them as noise."""
    if not bpftool:
        return []
    p = run([bpftool, "-j", "prog", "show"], check=False)
    try:
        progs = json.loads(p.stdout or "[]")
    except ValueError:
        return []
    return sorted("%s#%d" % (x.get("name", "?"), x["id"]) for x in progs
                  if x.get("type") in TRACING_TYPES and x.get("id") not in own)


def map_percpu_sums(map_id: int, bpftool: str) -> Dict[int, int]:
    """A per-CPU array map's slots summed over CPUs (rsttrace's "stats": events, ring full)."""
    p = run([bpftool, "-j", "map", "dump", "id", str(map_id)], check=False)
    try:
        entries = json.loads(p.stdout or "[]")
    except ValueError:
        return {}
    out: Dict[int, int] = {}
    for e in entries:
        # With BTF, bpftool prints {"formatted": {"key": 0, "values": [{"cpu": 0, "value": 5}]}};
        # without, byte arrays in hex, little-endian on the machines this runs on.
        f = e.get("formatted", e)
        key, values = f.get("key"), f.get("values", [])
        k = key if isinstance(key, int) else _le(key)
        out[k] = sum(v["value"] if isinstance(v["value"], int) else _le(v["value"]) for v in values)
    return out


def _le(hexbytes: object) -> int:
    if not isinstance(hexbytes, list):
        return 0
    return int.from_bytes(bytes(int(b, 16) for b in hexbytes), "little")


def map_name(map_id: int, bpftool: str) -> str:
    p = run([bpftool, "-j", "map", "show", "id", str(map_id)], check=False)
    try:
        return str(json.loads(p.stdout).get("name", ""))
    except ValueError:
        return ""


@contextmanager
def bpf_stats_enabled() -> Iterator[bool]:
    """kernel.bpf_stats_enabled=1 for the body, restored after. Yields whether it could be set.

    Stats cost two clock reads per program run, for every program on the machine: the
    throughput rounds run without them.
    """
    path = "/proc/sys/kernel/bpf_stats_enabled"
    try:
        with open(path) as f:
            old = f.read().strip()
        with open(path, "w") as f:
            f.write("1")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        with open(path, "w") as f:
            f.write(old)


# --- tools ---------------------------------------------------------------------------------
APT_PACKAGES = {"bpftrace": "bpftrace", "tcpdump": "tcpdump", "bpftool": "bpftool", "cc": "gcc"}


def find_tools(install: bool) -> Dict[str, Optional[str]]:
    """Paths of the tools the bench uses, installing Debian's packages for missing ones."""
    found = {t: shutil.which(t) for t in APT_PACKAGES}
    missing = [APT_PACKAGES[t] for t, p in found.items() if p is None]
    if missing and install and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode:
            # Package lists may be missing on a fresh machine: update once, then try again.
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
            subprocess.run(cmd + ["libc6-dev"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        found = {t: shutil.which(t) for t in APT_PACKAGES}
    return found


def compile_storm(cc: str, src: str, out_dir: str) -> str:
    exe = os.path.join(out_dir, "storm")
    run([cc, "-O2", "-Wall", "-Wextra", "-o", exe, src])
    return exe


def machine() -> Dict[str, str]:
    u = os.uname()
    info = {"kernel": u.release, "cores": str(os.cpu_count() or 0), "machine": u.machine}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def load() -> Dict[str, float]:
    """Load average and CPU pressure: how busy the rest of the machine was."""
    out: Dict[str, float] = {}
    try:
        with open("/proc/loadavg") as f:
            out["loadavg1"] = float(f.read().split()[0])
    except OSError:
        pass
    try:
        with open("/proc/pressure/cpu") as f:
            for part in f.readline().split():
                if part.startswith("avg10="):
                    out["cpu_pressure_avg10"] = float(part[6:])
    except OSError:
        pass
    return out
