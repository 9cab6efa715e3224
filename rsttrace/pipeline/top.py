"""``rsttrace top``: who is resetting whom, right now, ranked; the model and the batch output.

Counts come from the kernel's ``top_counts`` map (bpf/rsttrace.bpf.c, ``RSTTRACE_TOP``): every
traced event counted by its tuple (netns, kind, raw reason, state, family, local address and
port, remote address, owning process where the kernel knows it) in the same programs that keep
the exact counters, never from the budgeted event stream. The map is a sized per-CPU hash that
is never deleted from while top runs: every row shown is exact since start, and a reset whose key
finds the map full goes to a per-kind spill, shown as the rows' missing tail. Kinds derived from
the kernel's counters (overflow.py: SYN overflows, SYN-queue drops) join as rows with the
listener's port where it is known and no peer. Totals by kind are the exact counters'.

This module groups rows (``--by``), folds peers to a prefix and ranks groups by their rate over
the last interval (``tophints`` says what the counts show, ``topsample`` reads a session);
rsttrace/sinks/toptext.py writes batch output and rsttrace/sinks/topscreen.py draws the same
snapshots with curses.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from rsttrace.capture import contract as c
from rsttrace.kernel.facts import KernelFacts
from rsttrace.pipeline.events import name_reason

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

    def __hash__(self) -> int:
        # computed once: every sample hashes every row several times (a full map is 10,240 rows),
        # and the dataclass's own __hash__ rebuilds the 12-field tuple each time
        h: Optional[int] = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", h)
        return h


ROW_CACHE_MAX = 1 << 21  # above the map's largest size (--max-keys 1 Mi) with room for the counter rows


class Namer:
    """TopTuples (tracer.top_counts) to Rows, names from the running kernel as trace prints them."""

    def __init__(self, facts: KernelFacts) -> None:
        self.facts = facts
        self._names: Dict[Tuple[int, Optional[int], int, int], Tuple[str, Optional[str], Optional[str]]] = {}
        self._addrs: Dict[bytes, str] = {}
        self._rows: Dict[Tuple[Any, ...], Row] = {}  # a map's keys persist: each named once

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
        r = self._rows.get(t)
        if r is None:
            if len(self._rows) >= ROW_CACHE_MAX:
                self._rows.clear()
            r = self._rows[t] = self._row(t)
        return r

    def _row(self, t: Tuple[int, Optional[int], int, int, int, int, bytes, bytes, int, int, bytes, bool]) -> Row:
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
    tie: Tuple[Tuple[int, int, str], ...] = ()  # _tie(self), computed once per key (TopModel)


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
    return g.tie or tuple(_sort_value(v) for v in g.key)


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
                 family: Optional[str] = None, hinter: Optional[Callable[[Dict[Row, int]], List[Hint]]] = None
                 ) -> None:
        """``hinter``: what names the counts' patterns (``tophints.hints``, which imports this
        module's Row and Hint: given here rather than imported, so neither module imports the other
        at use)."""
        self.by = tuple(by)
        self.hinter = hinter
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
        # per row: its group's key and its other dimensions' values; per key: its sort tie. A map's
        # rows persist from sample to sample (Namer hands out the same Row), so each is placed once.
        self._place: Dict[Row, Tuple[Tuple[Any, ...], List[Tuple[str, Any]]]] = {}
        self._ties: Dict[Tuple[Any, ...], Tuple[Tuple[int, int, str], ...]] = {}

    def _placed(self, r: Row, others: Sequence[str]) -> Tuple[Tuple[Any, ...], List[Tuple[str, Any]]]:
        p = self._place.get(r)
        if p is None:
            if len(self._place) >= ROW_CACHE_MAX:
                self._place.clear()
                self._ties.clear()
            key = tuple(value_of(r, d, self.prefix) for d in self.by)
            vals = [(d, v) for d, v in ((d, value_of(r, d, self.prefix)) for d in others) if v is not None]
            p = self._place[r] = (key, vals)
            if key not in self._ties:
                self._ties[key] = tuple(_sort_value(v) for v in key)
        return p

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
        if self.kinds is None and self.netns is None and self.family is None:
            kept = {r: n for r, n in rows.items() if n}
        else:
            kept = {r: n for r, n in rows.items() if n and self.keep(r)}
        groups: Dict[Tuple[Any, ...], Group] = {}
        others = [d for d in DIMENSIONS if d not in self.by]
        placed, ties = self._placed, self._ties
        for r, n in kept.items():
            key, vals = placed(r, others)
            g = groups.get(key)
            if g is None:
                g = groups[key] = Group(key, values={d: set() for d in others}, tie=ties[key])
            g.total += n
            for d, v in vals:
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
                        tot, self.hinter(kept) if self.hinter is not None else [], sort)
