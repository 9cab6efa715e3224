"""Scan a proc root: which processes live in which network namespace, and in
which pod/container cgroup.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

from rsttrace.enrich.cgroups import CgroupIdentity, parse_proc_cgroup

_NETNS_LINK = re.compile(r"^net:\[(\d+)\]$")


def parse_netns_link(target: str) -> Optional[int]:
    """``net:[4026531840]`` (the ``/proc/<pid>/ns/net`` link text) -> inode."""
    m = _NETNS_LINK.match(target.strip())
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ProcInNetns:
    """A process of a pod, as seen from the proc root."""

    pid: int
    comm: str
    identity: CgroupIdentity


@dataclass
class ProcScan:
    """Result of one pass over a proc root."""

    # Network namespace of pid 1 of the proc root: the host's when the tracer
    # runs with hostPID.  None when pid 1 cannot be read.
    host_netns: Optional[int] = None
    # Every netns inode seen, pod or not: lookups of these are misses that a
    # rescan will not turn into hits, so they need not nudge the refresher.
    all_netns: Set[int] = field(default_factory=set)
    # Pod processes per non-host netns.
    pods_by_netns: Dict[int, List[ProcInNetns]] = field(default_factory=dict)


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        # The process exited, or we lack ptrace rights on it.
        return None


def _netns_of(proc_root: str, pid: str) -> Optional[int]:
    try:
        return parse_netns_link(os.readlink(os.path.join(proc_root, pid, "ns", "net")))
    except OSError:
        return None


def scan_proc(proc_root: str) -> ProcScan:
    """Map network namespaces to the pod processes inside them.

    Host-netns processes are skipped before their cgroup file is read: they
    are most of a node's processes and are never attributed to a pod
    (hostNetwork pods share the host netns and cannot be told apart by it).
    """
    scan = ProcScan(host_netns=_netns_of(proc_root, "1"))
    try:
        pids = [name for name in os.listdir(proc_root) if name.isdigit()]
    except OSError:
        return scan
    for pid in pids:
        netns = _netns_of(proc_root, pid)
        if netns is None:
            continue
        scan.all_netns.add(netns)
        if netns == scan.host_netns:
            continue
        text = _read_text(os.path.join(proc_root, pid, "cgroup"))
        identity = parse_proc_cgroup(text) if text is not None else None
        if identity is None:
            continue
        comm = (_read_text(os.path.join(proc_root, pid, "comm")) or "").strip()
        scan.pods_by_netns.setdefault(netns, []).append(ProcInNetns(pid=int(pid), comm=comm, identity=identity))
    return scan
