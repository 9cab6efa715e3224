"""The kernel's own TCP counters (/proc/net/snmp, /proc/net/netstat), per network namespace.

They are the oracle rsttrace is checked against (tests, coverage metric) and the source of the
overflow kinds that no tracepoint reports (SYN dropped on a full accept queue, SYN queue full).
Both files are pairs of lines: a header ``Tcp: RtoAlgorithm RtoMin ...`` then values.
"""

from __future__ import annotations

import os
from typing import Dict

Counters = Dict[str, Dict[str, int]]


def parse(text: str) -> Counters:
    out: Counters = {}
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for head, vals in zip(lines[::2], lines[1::2]):
        hsec, _, hnames = head.partition(":")
        vsec, _, hvals = vals.partition(":")
        if hsec != vsec:
            continue  # malformed pair: skip rather than mislabel
        section = out.setdefault(hsec.strip(), {})
        for name, value in zip(hnames.split(), hvals.split()):
            try:
                section[name] = int(value)
            except ValueError:
                continue
    return out


def read(net_dir: str = "/proc/net") -> Counters:
    """snmp and netstat of the netns ``net_dir`` belongs to (``/proc/<pid>/net`` for another)."""
    out: Counters = {}
    for name in ("snmp", "netstat"):
        path = os.path.join(net_dir, name)
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            continue
        for section, values in parse(text).items():
            out.setdefault(section, {}).update(values)
    return out


def get(counters: Counters, section: str, name: str) -> int:
    return counters.get(section, {}).get(name, 0)
