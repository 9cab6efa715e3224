"""``rsttrace top``: who is resetting whom, right now, ranked; the model and the batch output.

Counts come from the kernel's ``top_counts`` map (bpf/rsttrace.bpf.c, ``RSTTRACE_TOP``): every
traced event counted by its tuple (netns, kind, raw reason, state, family, local address and
port, remote address, owning process where the kernel knows it) in the same programs that keep
the exact counters, never from the budgeted event stream. The map is a sized per-CPU hash that
is never deleted from while top runs: every row shown is exact since start, and a reset whose key
finds the map full goes to a per-kind spill, shown as the rows' missing tail. Kinds derived from
the kernel's counters (overflow.py: SYN overflows, SYN-queue drops) join as rows with the
listener's port where it is known and no peer. Totals by kind are the exact counters'.

This module groups rows (``--by``), folds peers to a prefix, ranks groups by their rate over the
last interval, derives hints from the counts, and writes batch output; ``topscreen`` draws the
same snapshots with curses.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from rsttrace.capture import contract as c
from rsttrace.pipeline.events import name_reason
from rsttrace.kernel.facts import KernelFacts
from rsttrace.sinks.output import SHORT_KIND, terminal_safe

# --by names -> column titles, in the order rows show them
DIMENSIONS: Dict[str, str] = {
    "pod": "POD/NETNS",
    "kind": "KIND",
    "reason": "REASON",
    "state": "STATE",
    "laddr": "LOCAL ADDR",
    "port": "PORT",
    "peer": "PEER",
    "pid": "PID/COMM",
}
SORTS = ("rate", "total", *DIMENSIONS)
DEFAULT_BY = ("pod", "port")

# A hint needs at least this much: many ports from one peer, many peers on one port, aborts.
SCAN_PORTS = 10
MANY_PEERS = 10
ABORTS = 10
# Resets an application causes by closing: reason -> what the application did
APP_ABORTS = {
    "TCP_ABORT_ON_CLOSE": "closed with unread data",
    "TCP_STATE": "aborted live connections (SO_LINGER 0, ss -K)",
    "TCP_DISCONNECT_WITH_DATA": "disconnected with unsent data",
}


class TopError(ValueError):
    """Bad --by, --sort or --peer-prefix: one line naming what is allowed."""


def parse_by(values: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if not values:
        return DEFAULT_BY
    out: List[str] = []
    for v in values:
        for part in v.split(","):
            name = part.strip().lower()
            if name not in DIMENSIONS:
                raise TopError("--by %r: group by one or more of %s (comma list)" % (part, ", ".join(DIMENSIONS)))
            if name not in out:
                out.append(name)
    return tuple(out)


def parse_prefix(value: str) -> Tuple[int, int]:
    """``24`` or ``24,64``: (IPv4 prefix, IPv6 prefix). One value folds IPv6 peers to /64 when it
    folds IPv4 ones at all (the usual pairing), else to /128."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) > 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise TopError("--peer-prefix %r: an IPv4 prefix length, optionally ,IPv6 length (24 or 24,64)" % value)
    v4 = int(parts[0])
    v6 = int(parts[1]) if len(parts) == 2 else (64 if v4 < 32 else 128)
    if not (0 <= v4 <= 32 and 0 <= v6 <= 128):
        raise TopError("--peer-prefix %r: IPv4 0 to 32, IPv6 0 to 128" % value)
    return v4, v6


@dataclass(frozen=True)
class Row:
    """One key of the top map (or a counter-derived count), with names."""

    kind: str
    reason: Optional[str]
    state: Optional[str]
    family: Optional[str]
    netns: Optional[int]
    laddr: Optional[str]
    port: Optional[int]
    raddr: Optional[str]
    pid: Optional[int]
    source: str = "kernel"  # "counters": derived from the kernel's counters (no peer, port if known)
    comm: str = ""  # the owner's name with pid, as the kernel saw it then
    port_remote: bool = False  # port is the peer's: a client on an ephemeral port (the kernel keyed it so)


class Namer:
    """TopTuples (tracer.top_counts) to Rows, names from the running kernel as trace prints them."""

    def __init__(self, facts: KernelFacts) -> None:
        self.facts = facts
        self._names: Dict[Tuple[int, Optional[int], int, int], Tuple[str, Optional[str], Optional[str]]] = {}
        self._addrs: Dict[bytes, str] = {}

    def _addr(self, b: bytes) -> Optional[str]:
        if len(b) not in (4, 16):
            return None
        text = self._addrs.get(b)
        if text is None:
            if len(self._addrs) >= 65536:
                self._addrs.clear()
            text = self._addrs[b] = socket.inet_ntop(socket.AF_INET if len(b) == 4 else socket.AF_INET6, b)
        return text

    def row(self, t: Tuple[int, Optional[int], int, int, int, int, bytes, bytes, int, int, bytes, bool]) -> Row:
        kind_raw, reason, state_raw, family, netns, lport, laddr, raddr, pid, flags, comm, port_remote = t
        nkey = (kind_raw, reason, state_raw, flags)
        names = self._names.get(nkey)
        if names is None:
            kind = c.KIND_NAMES.get(kind_raw, "unknown:%d" % kind_raw)
            state = self.facts.state_name(state_raw)
            rname, _src = name_reason(self.facts, kind, reason, state, flags)
            names = self._names[nkey] = (kind, rname, state)
        kind, rname, state = names
        fam = {c.AF_INET: "ipv4", c.AF_INET6: "ipv6"}.get(family)
        return Row(kind, rname, state, fam, netns or None, self._addr(laddr) if fam else None,
                   lport if fam else None, self._addr(raddr) if fam else None,
                   pid if flags & c.F_PROCESS else None,
                   comm=comm.decode("utf-8", "replace") if flags & c.F_PROCESS else "",
                   port_remote=bool(port_remote and fam))


def fold_peer(addr: Optional[str], prefix: Tuple[int, int]) -> Optional[str]:
    """``addr`` as its network at ``prefix`` (v4, v6); the address itself at full length."""
    if addr is None:
        return None
    v6 = ":" in addr
    bits = prefix[1] if v6 else prefix[0]
    if bits >= (128 if v6 else 32):
        return addr
    return str(ipaddress.ip_network("%s/%d" % (addr, bits), strict=False))


@dataclass
class Group:
    key: Tuple[Any, ...]  # values of the --by dimensions, in their order
    total: int = 0
    delta: int = 0
    rate: float = 0.0
    values: Dict[str, Set[Any]] = field(default_factory=dict)  # the other dimensions' distinct values


@dataclass
class Hint:
    what: str  # "scan", "port", "aborts", "synflood"
    reason: str  # the rsttrace reason name to read in `rsttrace reasons`
    text: str
    subject: Dict[str, Any]

    def as_dict(self) -> Dict[str, Any]:
        return {"hint": self.what, "reason": self.reason, "text": self.text, "read": "rsttrace reasons: " + self.reason,
                **self.subject}


@dataclass
class Snapshot:
    time: float  # wall clock
    interval: float  # seconds since the previous snapshot (since start for the first)
    elapsed: float
    by: Tuple[str, ...]
    groups: List[Group]
    spill: Tuple[int, int]  # resets in no row (map full): interval, total
    spill_by_kind: Dict[str, int]
    keys: int  # keys in the map
    max_keys: int
    totals: Dict[str, Tuple[int, int]]  # kind -> (interval, total), from the exact counters
    hints: List[Hint]
    sort: str = "rate"


def value_of(row: Row, dim: str, prefix: Tuple[int, int]) -> Any:
    if dim == "pod":
        return row.netns
    if dim == "peer":
        return fold_peer(row.raddr, prefix)
    if dim == "port":  # a client's row: the service's port on the peer ("peer", port)
        return ("peer", row.port) if row.port_remote and row.port is not None else row.port
    if dim == "pid":  # with the name the kernel saw: a short-lived process is gone before it is shown
        return None if row.pid is None else (row.pid, row.comm)
    return getattr(row, dim)


def _sort_value(v: Any) -> Tuple[int, int, str]:
    """Numbers as numbers (a pid with its name), then peers' ports, then text, None last."""
    if v is None:
        return (3, 0, "")
    if isinstance(v, int):
        return (0, v, "")
    if isinstance(v, tuple) and isinstance(v[0], int):  # (pid, comm)
        return (0, v[0], str(v[1]))
    if isinstance(v, tuple):  # ("peer", port)
        return (1, int(v[1]), "")
    return (2, 0, str(v))


def _tie(g: Group) -> Tuple[Tuple[int, int, str], ...]:
    return tuple(_sort_value(v) for v in g.key)


def rank(groups: List[Group], sort: str, by: Sequence[str]) -> List[Group]:
    """Busiest first (rate over the last interval, then total since start), or by a column."""
    tie = _tie
    if sort == "total":
        return sorted(groups, key=lambda g: (-g.total, -g.rate, tie(g)))
    if sort in by:
        i = list(by).index(sort)
        return sorted(groups, key=lambda g: (_sort_value(g.key[i]), -g.rate, -g.total, tie(g)))
    if sort in DIMENSIONS:  # a dimension the rows are not grouped by: by how many distinct values
        return sorted(groups, key=lambda g: (-len(g.values.get(sort, ())), -g.rate, -g.total, tie(g)))
    return sorted(groups, key=lambda g: (-g.rate, -g.total, tie(g)))


class TopModel:
    """Groups rows by ``by`` and keeps the previous totals, so each snapshot has rates."""

    def __init__(self, by: Sequence[str], prefix: Tuple[int, int] = (32, 128), max_keys: int = c.TOP_ENTRIES_DEFAULT,
                 kinds: Optional[Set[str]] = None, netns: Optional[Set[int]] = None,
                 family: Optional[str] = None) -> None:
        self.by = tuple(by)
        self.prefix = prefix
        self.max_keys = max_keys
        self.kinds = kinds
        self.netns = netns
        self.family = family
        self.started = time.monotonic()
        self._last = self.started
        self._prev: Dict[Tuple[Any, ...], int] = {}
        self._prev_spill = 0
        self._prev_totals: Dict[str, int] = {}

    def keep(self, row: Row) -> bool:
        return ((self.kinds is None or row.kind in self.kinds)
                and (self.netns is None or row.netns in self.netns)
                and (self.family is None or row.family in (self.family, None)))

    def snapshot(self, rows: Dict[Row, int], spill: Dict[str, int], keys: int, totals: Dict[str, int],
                 now: Optional[float] = None, wall: Optional[float] = None, sort: str = "rate") -> Snapshot:
        """``rows``: every row's total since start; ``spill``: by kind; ``keys``: map entries in use;
        ``totals``: the exact counters by kind (filtered alike by the caller)."""
        now = time.monotonic() if now is None else now
        interval = max(1e-9, now - self._last)
        self._last = now
        kept = {r: n for r, n in rows.items() if n and self.keep(r)}
        groups: Dict[Tuple[Any, ...], Group] = {}
        others = [d for d in DIMENSIONS if d not in self.by]
        for r, n in kept.items():
            key = tuple(value_of(r, d, self.prefix) for d in self.by)
            g = groups.get(key)
            if g is None:
                g = groups[key] = Group(key, values={d: set() for d in others})
            g.total += n
            for d in others:
                v = value_of(r, d, self.prefix)
                if v is not None:
                    g.values[d].add(v)
        for key, g in groups.items():
            g.delta = g.total - self._prev.get(key, 0)
            g.rate = g.delta / interval
        self._prev = {k: g.total for k, g in groups.items()}
        spill_kept = {k: n for k, n in spill.items() if self.kinds is None or k in self.kinds}
        spill_total = sum(spill_kept.values())
        spill_pair = (spill_total - self._prev_spill, spill_total)
        self._prev_spill = spill_total
        tot = {k: (n - self._prev_totals.get(k, 0), n) for k, n in totals.items()}
        self._prev_totals = dict(totals)
        return Snapshot(time.time() if wall is None else wall, interval, now - self.started, self.by,
                        rank(list(groups.values()), sort, self.by), spill_pair, spill_kept, keys, self.max_keys,
                        tot, hints(kept), sort)


def _where(ns: Optional[int]) -> str:
    return "netns %d" % ns if ns else "an unknown netns"


def hints(rows: Dict[Row, int]) -> List[Hint]:
    """What the counts show, where they show it: many closed ports from one peer, one closed port
    from many peers, SYN-queue overflows on a port, one namespace's processes aborting connections.
    Factual: each says what was counted and names the reason to read in `rsttrace reasons`."""
    by_peer: Dict[Tuple[Optional[int], str], Tuple[Set[int], int]] = {}
    by_port: Dict[Tuple[Optional[int], int], Tuple[Set[str], int]] = {}
    floods: Dict[Tuple[Optional[int], Optional[int], str], int] = {}
    aborts: Dict[Tuple[Optional[int], str], Tuple[Set[int], int]] = {}
    for r, n in rows.items():
        if r.kind == "sent" and r.reason == "NO_SOCKET":
            if r.raddr is not None and r.port is not None:
                ports, total = by_peer.get((r.netns, r.raddr), (set(), 0))
                ports.add(r.port)
                by_peer[(r.netns, r.raddr)] = (ports, total + n)
                peers, total = by_port.get((r.netns, r.port), (set(), 0))
                peers.add(r.raddr)
                by_port[(r.netns, r.port)] = (peers, total + n)
        elif r.kind in ("syn_queue_overflow", "listen_drop") and r.reason:
            k = (r.netns, r.port, r.reason)
            floods[k] = floods.get(k, 0) + n
        elif r.kind == "sent" and r.reason is not None and r.reason in APP_ABORTS:
            akey = (r.netns, r.reason)
            pids, total = aborts.get(akey, (set(), 0))
            if r.pid is not None:
                pids.add(r.pid)
            aborts[akey] = (pids, total + n)
    out: List[Hint] = []
    for (ns, peer), (ports, total) in sorted(by_peer.items(), key=lambda kv: -len(kv[1][0])):
        if len(ports) >= SCAN_PORTS:
            out.append(Hint("scan", "NO_SOCKET", "peer %s refused on %d closed ports in %s (%d resets): a port "
                                                 "scan's shape" % (peer, len(ports), _where(ns), total),
                            {"netns": ns, "peer": peer, "ports": len(ports), "resets": total}))
    for (ns, port), (peers, total) in sorted(by_port.items(), key=lambda kv: -len(kv[1][0])):
        if len(peers) >= MANY_PEERS:
            out.append(Hint("port", "NO_SOCKET", "port %d in %s refused %d peers (%d resets): nothing listens: "
                                                 "service down, or a SYN flood at it"
                            % (port, _where(ns), len(peers), total),
                            {"netns": ns, "port": port, "peers": len(peers), "resets": total}))
    for (ns, lport, reason), count in sorted(floods.items(), key=lambda kv: -kv[1]):
        what = "port %d" % lport if lport else "a listener"
        out.append(Hint("synflood", reason, "%s in %s: %d SYNs it could not queue: a SYN flood, or a backlog too "
                                            "small" % (what, _where(ns), count),
                        {"netns": ns, "port": lport, "resets": count}))
    for (ns, reason), (pids, total) in sorted(aborts.items(), key=lambda kv: -kv[1][1]):
        if total >= ABORTS:
            who = " (pid %s)" % ", ".join(str(p) for p in sorted(pids)[:5]) if pids else ""
            out.append(Hint("aborts", reason, "%s%s: %d resets, the application %s"
                            % (_where(ns), who, total, APP_ABORTS[reason]),
                            {"netns": ns, "pids": sorted(pids), "resets": total}))
    return out


# --- reading a session -----------------------------------------------------------------------

def session_rows(session: Any, namer: Namer) -> Tuple[Dict[Row, int], Dict[str, int], int]:
    """(rows, spill by kind name, keys in the map) from a running Session with a top map, plus
    its counter-derived kinds as rows without peers."""
    raw, spill = session.tracer.top_counts()
    rows: Dict[Row, int] = {}
    for t, n in raw.items():
        r = namer.row(t)
        rows[r] = rows.get(r, 0) + n
    poller = session.poller
    if poller is not None:
        with session._lock:
            derived = list(poller.totals.counts.items())
        for (kind, reason, netns, port, state), n in derived:
            r = Row(kind, reason, state, None, netns or None, None, port or None, None, None, "counters")
            rows[r] = rows.get(r, 0) + n
    return rows, {c.KIND_NAMES.get(k, "unknown:%d" % k): n for k, n in spill.items()}, len(raw)


def session_totals(session: Any, netns: Optional[Set[int]], family: Optional[str]) -> Dict[str, int]:
    """The exact counters by kind (and the counter-derived kinds), filtered as the rows are."""
    out: Dict[str, int] = {}
    for k, n in session.counts().items():
        if netns is not None and k.netns not in netns:
            continue
        if family is not None and k.family not in (family, None):
            continue
        out[k.kind] = out.get(k.kind, 0) + n
    return out


# --- names for display -----------------------------------------------------------------------

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


# --- running ---------------------------------------------------------------------------------

class Sampler:
    """A started Session with a top map, read into Snapshots; polls the counter-derived kinds
    while it waits (every ``overflow_interval``), as Session.run does for the other commands."""

    def __init__(self, session: Any, model: TopModel, stop: Any, overflow_interval: float = 1.0) -> None:
        self.session = session
        self.model = model
        self.stop = stop
        self.namer = Namer(session.facts)
        self.overflow_interval = overflow_interval
        self._next_poll = time.monotonic() + overflow_interval

    def wait(self, seconds: float, tick: Optional[Callable[[], bool]] = None) -> bool:
        """Wait ``seconds`` (polling overflows meanwhile); ``tick`` runs every 100 ms and ends the
        wait early by returning True. False when stopped."""
        end = time.monotonic() + seconds
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= self._next_poll:
                self.session.poll_overflows()
                self._next_poll = now + self.overflow_interval
            if now >= end:
                return True
            if tick is not None:
                if tick():
                    return True
            else:
                self.stop.wait(min(0.1, end - now, max(0.0, self._next_poll - now)))
        return False

    def sample(self, sort: str = "rate", last: bool = False) -> Snapshot:
        if last:
            self.session.finish(settle=1.0)  # the last seconds' counter-derived counts
        rows, spill, keys = session_rows(self.session, self.namer)
        totals = session_totals(self.session, self.model.netns, self.model.family)
        if self.model.kinds is not None:
            totals = {k: n for k, n in totals.items() if k in self.model.kinds}
        return self.model.snapshot(rows, spill, keys, totals, sort=sort)


def run_batch(sampler: Sampler, delay: float, iterations: Optional[int], labels: Labels, as_json_lines: bool,
              rows: Optional[int], sort: str) -> None:
    n = 0
    while iterations is None or n < iterations:
        if not sampler.wait(delay):
            break
        n += 1
        snap = sampler.sample(sort, last=iterations is not None and n == iterations)
        batch([snap], labels, as_json_lines, rows)
