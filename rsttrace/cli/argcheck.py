"""Checks for command-line values: numbers in ASCII digits within stated bounds, existing netns.

Python's ``int()`` and ``float()`` take far more than a user means by a number: other scripts'
digits (``８０``, ``١٢``), underscores (``10_799``), ``nan``, ``inf`` and exponents. A NaN interval
spun a CPU, an infinite one never reported. Every number rsttrace takes goes through here, and
each flag's help states its bounds (``bounds()``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Callable, Iterable, Optional, Set

_INT = re.compile(r"[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)

NETNS_MAX = 2**32 - 1  # nsfs inode numbers are 32-bit (proc_inum)


def _fmt(x: float) -> str:
    return ("%d" % x) if float(x).is_integer() else ("%g" % x)


def bounds(lo: float, hi: float, unit: str = "") -> str:
    """For help texts: "0.1 to 3600 s"."""
    return "%s to %s%s" % (_fmt(lo), _fmt(hi), " " + unit if unit else "")


def ascii_int(v: str) -> Optional[int]:
    """The integer in ``v`` written in ASCII digits only (surrounding blanks allowed), else None."""
    v = v.strip()
    return int(v) if _INT.fullmatch(v) else None


def integer(lo: int, hi: int, power_of_two: bool = False) -> Callable[[str], int]:
    """An argparse type: an ASCII integer from lo to hi."""

    def parse(v: str) -> int:
        x = ascii_int(v)
        what = "a power of 2 " if power_of_two else "a whole number "
        if x is None or not lo <= x <= hi:
            raise argparse.ArgumentTypeError("%r is not %sfrom %d to %d" % (v, what, lo, hi))
        if power_of_two and x & (x - 1):
            raise argparse.ArgumentTypeError("%r must be a power of 2 (%d to %d)" % (v, lo, hi))
        return x

    return parse


def seconds(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a decimal number of seconds (no exponent, nan or inf) from lo to hi."""

    def parse(v: str) -> float:
        s = v.strip()
        x = float(s) if _DECIMAL.fullmatch(s) else math.nan
        if not (math.isfinite(x) and lo <= x <= hi):
            raise argparse.ArgumentTypeError("%r is not a number of seconds from %s to %s" % (v, _fmt(lo), _fmt(hi)))
        return x

    return parse


def netns_inode(v: str) -> int:
    """An argparse type: a netns inode, as a number or as ``readlink`` prints it (``net:[N]``)."""
    s = v.strip()
    if s.startswith("net:[") and s.endswith("]"):
        s = s[5:-1]
    x = ascii_int(s)
    if x is None or not 1 <= x <= NETNS_MAX:
        raise argparse.ArgumentTypeError(
            "%r is not a netns inode: a number from 1 to %d, or net:[N] (see `lsns -t net`)" % (v, NETNS_MAX))
    return x


def _ns_inode_of_link(path: str) -> Optional[int]:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    if target.startswith("net:[") and target.endswith("]"):
        return ascii_int(target[5:-1])
    return None


def _nsfs_mounts(mountinfo: str) -> Set[int]:
    """netns inodes bind-mounted somewhere (``ip netns add``, container runtimes' netns files)."""
    found: Set[int] = set()
    try:
        with open(mountinfo) as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields = pre.split()
                if post.split()[:1] == ["nsfs"] and len(fields) > 3 and fields[3].startswith("net:["):
                    ino = ascii_int(fields[3][5:].rstrip("]"))
                    if ino is not None:
                        found.add(ino)
    except OSError:
        pass
    return found


def _pids(proc_root: str) -> Iterable[str]:
    try:
        return [p for p in os.listdir(proc_root) if p.isascii() and p.isdigit()]
    except OSError:
        return []


def netns_exists(ino: int, proc_root: str = "/proc") -> bool:
    """Whether a network namespace with this inode exists now: a process in it, a bind mount of it
    (``/run/netns``, runtimes' files), or an open file of it. Best effort: without root, other
    users' processes are not visible."""
    pids = list(_pids(proc_root))
    for pid in pids:
        if _ns_inode_of_link(os.path.join(proc_root, pid, "ns", "net")) == ino:
            return True
    for mountinfo in ("/proc/self/mountinfo", os.path.join(proc_root, "1", "mountinfo")):
        if ino in _nsfs_mounts(mountinfo):
            return True
    for pid in pids:
        fd_dir = os.path.join(proc_root, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            if _ns_inode_of_link(os.path.join(fd_dir, fd)) == ino:
                return True
    return False
