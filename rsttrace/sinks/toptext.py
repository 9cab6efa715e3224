"""``rsttrace top``'s batch output (``-b``): tables as the screen draws them, or one JSON object
per interval; and the names rows are shown with."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set

from rsttrace.pipeline.top import DIMENSIONS, Snapshot
from rsttrace.pipeline.topsample import Sampler
from rsttrace.sinks.output import SHORT_KIND, terminal_safe


class Labels:
    """Pod names for namespaces (the enricher, when it runs) and process names for pids."""

    def __init__(self, pod_of: Optional[Callable[[int], Optional[str]]] = None, proc_root: str = "/proc") -> None:
        self.pod_of = pod_of
        self.proc_root = proc_root
        self._comms: Dict[int, str] = {}

    def pod(self, netns: Optional[int]) -> Optional[str]:
        if netns is None or self.pod_of is None:
            return None
        return self.pod_of(netns)

    def comm(self, pid: int) -> str:
        name = self._comms.get(pid)
        if name is None:
            try:
                with open(os.path.join(self.proc_root, str(pid), "comm")) as f:
                    name = f.read().strip()
            except OSError:
                name = ""  # gone: the pid stays, with no name
            if len(self._comms) > 4096:
                self._comms.clear()
            self._comms[pid] = name
        return name

    def text(self, dim: str, v: Any) -> str:
        if v is None:
            return "-"
        if dim == "pod":
            return terminal_safe(self.pod(v) or str(v))
        if dim == "pid":
            pid, comm = v
            comm = comm or self.comm(pid)
            return "%d/%s" % (pid, terminal_safe(comm)) if comm else str(pid)
        if dim == "kind":
            return SHORT_KIND.get(str(v), str(v))
        if dim == "port" and isinstance(v, tuple):
            return "peer:%d" % v[1]
        if dim == "state":
            return str(v).replace("TCP_", "", 1)
        if dim == "laddr" and ":" in str(v):
            return "[%s]" % v
        return terminal_safe(str(v))

    def summary(self, dim: str, values: Set[Any]) -> str:
        """A non-grouped dimension of a group: its one value, or how many there were."""
        if not values:
            return "-"
        if len(values) == 1:
            return self.text(dim, next(iter(values)))
        return "%d %s" % (len(values), PLURAL[dim])


PLURAL = {"pod": "netns", "kind": "kinds", "reason": "reasons", "state": "states", "laddr": "addrs",
          "port": "ports", "peer": "peers", "pid": "pids"}
WIDTH = {"pod": 16, "kind": 7, "reason": 20, "state": 11, "laddr": 16, "port": 10, "peer": 18, "pid": 18}


def columns(by: Sequence[str]) -> List[str]:
    """The grouped dimensions, then the others (each a one-value-or-count summary)."""
    return list(by) + [d for d in DIMENSIONS if d not in by]


def table(snap: Snapshot, labels: Labels, rows: Optional[int] = None, width: int = 0) -> List[str]:
    """The batch text (and the screen's body): a title, totals, hints, a header and the rows."""
    out: List[str] = []
    ts = time.strftime("%H:%M:%S", time.localtime(snap.time))
    out.append("rsttrace top - %s  up %ds  interval %.1fs  by %s  sort %s  keys %d/%d" % (
        ts, int(snap.elapsed), snap.interval, ",".join(snap.by), snap.sort, snap.keys, snap.max_keys))
    tot = "  ".join("%s %.1f/s (%d)" % (k, d / snap.interval, t) for k, (d, t) in sorted(snap.totals.items()) if t)
    out.append("totals: " + (tot or "no resets yet"))
    if snap.spill[1]:
        out.append("map full: %d resets (%.1f/s now) have no row; the rows' tail is incomplete (--max-keys %d)" % (
            snap.spill[1], snap.spill[0] / snap.interval, snap.max_keys))
    for h in snap.hints:
        out.append("hint: %s [%s: rsttrace reasons]" % (h.text, h.reason))
    out.append("")
    cols = columns(snap.by)
    head = ["%-*s" % (WIDTH[d], DIMENSIONS[d]) for d in snap.by] + ["%9s %9s %10s" % ("RATE/s", "INTERVAL", "TOTAL")]
    head += ["%-*s" % (WIDTH[d], DIMENSIONS[d]) for d in cols[len(snap.by):]]
    out.append(" ".join(head).rstrip())
    shown = snap.groups if rows is None else snap.groups[:rows]
    for g in shown:
        cells = ["%-*s" % (WIDTH[d], labels.text(d, v)) for d, v in zip(snap.by, g.key)]
        cells.append("%9.1f %9d %10d" % (g.rate, g.delta, g.total))
        cells += ["%-*s" % (WIDTH[d], labels.summary(d, g.values.get(d, set()))) for d in cols[len(snap.by):]]
        out.append(" ".join(cells).rstrip())
    if not snap.groups:
        out.append("(no resets or overflows yet)")
    elif len(shown) < len(snap.groups):
        out.append("... %d more rows" % (len(snap.groups) - len(shown)))
    if width:
        out = [line[:width] for line in out]
    return out


def _json_value(dim: str, v: Any, labels: Labels) -> Dict[str, Any]:
    if dim == "pod":
        return {"netns": v, "pod": labels.pod(v)}
    if dim == "port" and isinstance(v, tuple):
        return {"port": v[1], "port_of": "peer"}
    if dim == "pid":
        if v is None:
            return {"pid": None, "comm": None}
        return {"pid": v[0], "comm": v[1] or labels.comm(v[0]) or None}
    return {dim: v}


def as_json(snap: Snapshot, labels: Labels, rows: Optional[int] = None) -> Dict[str, Any]:
    out_rows: List[Dict[str, Any]] = []
    for g in (snap.groups if rows is None else snap.groups[:rows]):
        d: Dict[str, Any] = {}
        for dim, v in zip(snap.by, g.key):
            d.update(_json_value(dim, v, labels))
        d.update({"rate": round(g.rate, 3), "interval": g.delta, "total": g.total})
        d["distinct"] = {dim: len(vals) for dim, vals in g.values.items()}
        d["values"] = {dim: next(iter(vals)) for dim, vals in g.values.items() if len(vals) == 1}
        out_rows.append(d)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.time)),
        "interval_s": round(snap.interval, 3),
        "elapsed_s": round(snap.elapsed, 3),
        "by": list(snap.by),
        "sort": snap.sort,
        "rows": out_rows,
        "more_rows": len(snap.groups) - len(out_rows),
        "spill": {"interval": snap.spill[0], "total": snap.spill[1], "by_kind": snap.spill_by_kind},
        "keys": snap.keys,
        "max_keys": snap.max_keys,
        "totals": {k: {"interval": d, "total": t} for k, (d, t) in sorted(snap.totals.items())},
        "hints": [h.as_dict() for h in snap.hints],
    }


def batch(snapshots: Iterable[Snapshot], labels: Labels, as_json_lines: bool, rows: Optional[int],
          out: Any = None) -> None:
    """`top -b`: one table (or JSON object) per interval."""
    out = out or sys.stdout
    for snap in snapshots:
        if as_json_lines:
            out.write(json.dumps(as_json(snap, labels, rows)) + "\n")
        else:
            out.write("\n".join(table(snap, labels, rows)) + "\n\n")
        out.flush()


def run_batch(sampler: Sampler, delay: float, iterations: Optional[int], labels: Labels, as_json_lines: bool,
              rows: Optional[int], sort: str) -> None:
    n = 0
    while iterations is None or n < iterations:
        if not sampler.wait(delay):
            break
        n += 1
        snap = sampler.sample(sort, last=iterations is not None and n == iterations)
        batch([snap], labels, as_json_lines, rows)
