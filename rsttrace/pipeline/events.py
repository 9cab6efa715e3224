"""Events as users see them: decoded from the kernel's raw record, named from the kernel's tables.

``Event.to_dict()`` is the ``--json`` contract documented in the README; its keys may gain
siblings but never change meaning.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
import time
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Type, TypeVar, Union

from rsttrace.capture import contract as c
from rsttrace.kernel.facts import KernelFacts

# Received resets carry no reason; the kernel's own words for them are the errno tcp_reset()
# hands the application, chosen by state (net/ipv4/tcp_input.c, tcp_reset()).
RECEIVED_ERRNO = {"TCP_SYN_SENT": "ECONNREFUSED", "TCP_CLOSE_WAIT": "EPIPE", "TCP_CLOSE": None}

# --- the event schema ------------------------------------------------------------------------
# One declaration of every event field: the Event type (keyword-only where the interpreter allows,
# and for mypy always), its JSON (to_dict, and output.json_line generated from the same fields, so
# the two cannot disagree), the README's key table (a test holds it to these fields) and the
# fields copied straight from the kernel's record (``raw``: contract.RawEvent's field of that
# name, 0 meaning "none"). The kernel record itself is contract.RawEvent, held to bpf/rsttrace.h
# by a test. JSON rules: "always"; "overflow" (overflow and drop kinds only); "set" (only when
# true/non-zero/non-empty); attribution's keys are merged in when it ran and found a container.

OVERFLOW_KINDS = ("listen_overflow_syn", "listen_overflow_ack", "syn_queue_overflow", "listen_drop")

def _f(doc: str, json: str = "always", raw: bool = False, repeats: bool = False, default: Any = MISSING) -> Any:
    """doc: the README's meaning; json: its rule (above); raw: copied from the record; repeats: takes
    a few values over a whole stream (a kind, a reason), so its JSON text is cached with its
    neighbours' (output.json_line)."""
    meta = {"doc": doc, "json": json, "raw": raw, "repeats": repeats}
    if default is MISSING:
        return field(metadata=meta)
    if isinstance(default, (list, dict, set)):  # shared by every event the decoder builds: immutable only
        raise TypeError("event field defaults must be immutable (a tuple, not a list)")
    return field(default=default, metadata=meta)


_T = TypeVar("_T")
if TYPE_CHECKING:  # mypy sees keyword-only fields declared with _f
    from typing_extensions import dataclass_transform

    @dataclass_transform(kw_only_default=True, field_specifiers=(_f,))
    def _schema(cls: Type[_T]) -> Type[_T]: ...
else:
    def _schema(cls):
        # keyword-only where the interpreter has it (3.10+): a swapped lport/rport is an error,
        # not a silent bug; on Python 3.9 (Debian 11) the same class, keywords by convention
        return dataclass(kw_only=True)(cls) if sys.version_info >= (3, 10) else dataclass(cls)


@dataclass(frozen=True)
class Attribution:
    """Who an event belongs to, from rsttrace.enrich (present only when a container was found)."""

    namespace: str  # Kubernetes namespace, "" outside a pod
    pod: str
    container: str
    container_id: str


@_schema
class Event:
    time: str = _f("wall clock, ISO 8601 UTC (`2026-11-21T22:26:17.425840Z`)")
    ktime_ns: int = _f("CLOCK_MONOTONIC ns (`bpf_ktime_get_ns`); for counter-derived events, when rsttrace "
                       "saw the counters move")
    kind: str = _f("what happened: see `kind` below", repeats=True)
    reason: Optional[str] = _f("the kernel's name for why: see `reason` below", repeats=True)
    reason_raw: Optional[int] = _f("the number the kernel passed, or null when it passed none", repeats=True)
    reason_source: Optional[str] = _f("`kernel` (the kernel named it) or `inferred` (rsttrace deduced it)",
                                      repeats=True)
    state: Optional[str] = _f("TCP state of the socket (`TCP_ESTABLISHED`, …), null when there was no socket",
                              repeats=True)
    family: Optional[str] = _f("`ipv4` / `ipv6`", repeats=True)
    laddr: Optional[str] = _f("local address as seen from this host")
    lport: Optional[int] = _f("local port")
    raddr: Optional[str] = _f("remote address")
    rport: Optional[int] = _f("remote port")
    netns: Optional[int] = _f("network namespace inode: from the socket, or the receiving device without one",
                              raw=True, default=None)
    cookie: Optional[int] = _f("socket cookie where the kernel has assigned one, else null", raw=True,
                               default=None)
    pid: Optional[int] = _f("the socket owner's pid, **only** in its process context, else null", default=None)
    comm: Optional[str] = _f("the socket owner's command name, with `pid`", default=None)
    source: str = _f("`tracepoint`, `kprobe` (older kernels' gaps) or `counters` (counter-derived)",
                     default="tracepoint", repeats=True)
    count: int = _f("1 for traced events; how many for counter-derived ones", default=1, repeats=True)
    backlog: Optional[int] = _f("the listener's accept queue length (`ss -lt` Recv-Q)", json="overflow",
                                default=None)
    max_backlog: Optional[int] = _f("the listener's accept queue limit (`ss -lt` Send-Q)", json="overflow",
                                    default=None)
    cgroup_id: Optional[int] = _f("the socket owner's cgroup v2 id", json="set", raw=True, default=None)
    peer_from_packet: bool = _f("the kernel passed the listener; the peer comes from the packet", json="set",
                                default=False)
    local_abort: bool = _f("a reset the local kernel decided while tcp_reset() ran on the same socket (data "
                           "after shutdown); the `received` event the hook also fired for it was taken back",
                           json="set", default=False)
    syncookie: bool = _f("a final ACK with a valid SYN cookie met a full accept queue", json="set", default=False)
    includes_ack: bool = _f("counter-derived overflows that may include final-ACK ones this kernel cannot "
                            "tell apart", json="set", default=False)
    listeners: Tuple[str, ...] = _f("the listeners concerned when there were several (`addr:port`, with "
                                    "request counts in a SYN flood)", json="set", default=())
    attribution: Optional[Attribution] = _f("`namespace`, `pod`, `container`, `container_id` of the owner's "
                                            "container, when one was found (see Kubernetes)", json="merge",
                                            default=None)

    def to_dict(self) -> Dict[str, Any]:
        """The ``--json`` contract, in field order (output.json_line prints the same text)."""
        d: Dict[str, Any] = {}
        for name, rule in JSON_RULES:
            v = getattr(self, name)
            if rule == "always" or (rule == "overflow" and self.kind in OVERFLOW_KINDS) or (rule == "set" and v):
                d[name] = v
            elif rule == "merge" and v is not None:
                d.update(asdict(v))
        return d


EVENT_FIELDS: Tuple[Field[Any], ...] = fields(Event)
JSON_RULES: Tuple[Tuple[str, str], ...] = tuple((f.name, f.metadata["json"]) for f in EVENT_FIELDS)
ATTRIBUTION_FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(Attribution))
REPEATING: Tuple[str, ...] = tuple(f.name for f in EVENT_FIELDS if f.metadata["repeats"])
# fields typed as numbers: 1, 1.0 and True are equal as dict keys, so their cached text is only
# used for plain ints (output.json_line)
NUMERIC: Tuple[str, ...] = tuple(f.name for f in EVENT_FIELDS if "int" in str(f.type))


def json_keys() -> List[Tuple[str, str]]:
    """(key, meaning) for every key an event's JSON can have: the README's table."""
    out: List[Tuple[str, str]] = []
    for f in EVENT_FIELDS:
        if f.metadata["json"] == "merge":
            out.extend((a.name, f.metadata["doc"]) for a in fields(Attribution))
        else:
            out.append((f.name, f.metadata["doc"]))
    return out


class Clock:
    """Turns CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) into wall-clock ISO 8601.

    The text up to the second is computed once per second; the microseconds are appended. The
    result equals ``datetime.fromtimestamp(us / 1e6, timezone.utc).isoformat(timespec=
    "microseconds")`` with ``Z``: within this epoch's range a double holds the microseconds
    exactly enough for that rounding to land on the integer (tests compare both).
    """

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()
        self._second: Tuple[int, str] = (-1, "")  # one tuple, so another thread sees a matching pair

    def iso(self, ktime_ns: int) -> str:
        sec, us = divmod((ktime_ns + self.offset_ns) // 1000, 1000000)
        second = self._second
        if second[0] != sec:
            second = self._second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)))
        return "%s%06dZ" % (second[1], us)


ADDR_CACHE_MAX = 4096  # distinct addresses remembered; a port scan from 1 M peers stays this small
_addr_cache: Dict[bytes, str] = {}


def _ntop(key: bytes) -> str:
    """An address's text from its 4 (IPv4) or 16 (IPv6) bytes, cached: a storm repeats a few."""
    text = _addr_cache.get(key)
    if text is None:
        if len(_addr_cache) >= ADDR_CACHE_MAX:
            _addr_cache.clear()  # bounded: cheaper than LRU bookkeeping, and refills at once
        text = _addr_cache[key] = socket.inet_ntop(socket.AF_INET if len(key) == 4 else socket.AF_INET6, key)
    return text


def infer_sent_reason(state: Optional[str], flags: int) -> str:
    """A reason for kernels whose tcp_send_reset has none (< 6.10). Documented in the README.

    Before 6.10 the tracepoint fires only with a full socket (tcp_v4_send_reset's
    ``sk && sk_fullsock(sk)``) or for active resets (tcp_send_active_reset, no skb).
    """
    if flags & c.F_LOCAL_ABORT:
        # tcp_reset() ran for this socket just before on this CPU: data after shutdown
        # (tcp_rcv_state_process's TCPAbortOnData), what 6.10+ names TCP_ABORT_ON_DATA
        return "TCP_ABORT_ON_DATA"
    if state is None:
        return "NO_SOCKET"  # the kprobe on tcp_v4/v6_send_reset with no socket: a closed port
    if state == "TCP_TIME_WAIT":
        return "TCP_TIMEWAIT_SOCKET"
    if flags & c.F_ACTIVE:
        # Active resets from a system call on the socket: close() with unread data (the
        # common case), SO_LINGER 0, shutdown/disconnect. Timers (keepalive, memory) run
        # without the socket lock owned and stay unspecified.
        return "TCP_ABORT_ON_CLOSE" if flags & c.F_PROCESS else "NOT_SPECIFIED"
    if state == "TCP_LISTEN":
        return "INVALID_SYN"  # tcp_check_req's embryonic reset passes the listener
    return "NOT_SPECIFIED"


def name_reason(
    facts: KernelFacts, kind: str, raw: Optional[int], state: Optional[str], flags: int
) -> Tuple[Optional[str], Optional[str]]:
    """(reason, reason_source) for events and counters alike."""
    if raw is not None:
        return facts.reason_name(kind, raw), "kernel"
    if kind == "sent":
        return infer_sent_reason(state, flags), "inferred"
    if kind == "received" and flags & c.F_REQUEST_SOCK:
        # a RST that hit a request socket: no application sees it; the kernel counts it as
        # EmbryonicRsts (tcp_check_req)
        return "EmbryonicRsts", "inferred"
    if kind == "received" and state is not None:
        reason = RECEIVED_ERRNO.get(state, "ECONNRESET")
        return reason, ("inferred" if reason else None)
    if kind in ("listen_overflow_syn", "listen_overflow_ack"):
        return "ListenOverflows", "inferred"  # a kprobe saw it; the kernel counts it there
    return None, None


def _struct_of(record: Any) -> Tuple[struct.Struct, Tuple[str, ...]]:
    """A struct.Struct unpacking a ctypes record in one call, and the names of what it yields.

    Built from the contract's own fields, so it cannot drift from contract.RawEvent (which a
    test holds to bpf/rsttrace.h). "=": native byte order, no implicit alignment: the record's
    padding is explicit (fields named ``pad``).
    """
    codes = {ctypes.c_uint64: "Q", ctypes.c_uint32: "I", ctypes.c_uint16: "H", ctypes.c_uint8: "B"}
    fmt, names = "=", []
    for name, ctype in record._fields_:
        code = codes.get(ctype)
        if name == "pad":
            fmt += "%dx" % ctypes.sizeof(ctype)
            continue
        fmt += code if code else "%ds" % ctypes.sizeof(ctype)  # byte and char arrays
        names.append(name)
    return struct.Struct(fmt), tuple(names)


# One unpack of the whole record instead of 20 ctypes attribute reads; fields found by name.
RAW, _RAW_FIELDS = _struct_of(c.RawEvent)
RAW_SIZE = RAW.size
_AT = {name: i for i, name in enumerate(_RAW_FIELDS)}
_KTIME, _REASON, _KIND, _FAMILY, _STATE, _FLAGS = (_AT[n] for n in ("ktime_ns", "reason", "kind", "family", "state",
                                                                     "flags"))
_LADDR, _RADDR, _LPORT, _RPORT, _PID, _COMM = (_AT[n] for n in ("laddr", "raddr", "lport", "rport", "pid", "comm"))
_BACKLOG, _MAX_BACKLOG = _AT["backlog"], _AT["max_backlog"]
# Event fields copied from the record field of the same name, 0 meaning none (the schema's raw=True):
# one generated statement each, so a field added to both the record and Event needs no edit here.
_copy_src = "def _copy(d, v):\n" + "".join("    d[%r] = v[%d] or None\n" % (f.name, _AT[f.name])
                                            for f in EVENT_FIELDS if f.metadata["raw"])
_copy_ns: Dict[str, Any] = {}
exec(compile(_copy_src, "<rsttrace.pipeline.events._copy>", "exec"), _copy_ns)  # noqa: S102 - our own text
_copy: Any = _copy_ns["_copy"]
# The decoder builds an event's attributes as one dict of what the record says, without the
# 28-argument keyword __init__ (measured: 1 us of a 2.8 us decode). A field it does not set reads
# as its default: a dataclass keeps each default as a class attribute (immutable, see _f).
_new = object.__new__

_PROCESS, _KPROBE, _PEER = c.F_PROCESS, c.F_KPROBE, c.F_PEER_FROM_SKB
_AF_INET, _AF_INET6 = c.AF_INET, c.AF_INET6
_NAMES_MAX = 4096  # (kind, reason, state, flags) combinations: a few dozen in practice
# kind, reason, reason_raw, reason_source, state, source, process, peer, local_abort, syncookie
_Names = Tuple[str, Optional[str], Optional[int], Optional[str], Optional[str], str, bool, bool, bool, bool]


class Decoder:
    """Raw records to Events for one kernel's facts and clock, names cached per combination.

    The cache assumes ``facts`` is not changed after the first decode (it is filled once, by
    ``kernel_read.gather``).
    """

    def __init__(self, facts: KernelFacts, clock: Clock) -> None:
        self.facts = facts
        self.clock = clock
        self._names: Dict[Tuple[int, int, int, int], _Names] = {}

    def _name(self, kind_raw: int, reason: int, state_raw: int, flags: int) -> _Names:
        kind = c.KIND_NAMES.get(kind_raw, "unknown:%d" % kind_raw)
        state = self.facts.state_name(state_raw)
        reason_raw = None if reason == c.REASON_NONE else int(reason)
        rname, source = name_reason(self.facts, kind, reason_raw, state, flags)
        names = (kind, rname, reason_raw, source, state, "kprobe" if flags & _KPROBE else "tracepoint",
                 bool(flags & _PROCESS), bool(flags & _PEER), bool(flags & c.F_LOCAL_ABORT),
                 bool(flags & c.F_SYNCOOKIE))
        if len(self._names) >= _NAMES_MAX:
            self._names.clear()
        self._names[(kind_raw, reason, state_raw, flags)] = names
        return names

    def decode(self, data: bytes, offset: int = 0) -> Event:
        """The record at ``offset`` in ``data`` (a batch from the ring buffer holds many)."""
        v = RAW.unpack_from(data, offset)
        key = (v[_KIND], v[_REASON], v[_STATE], v[_FLAGS])
        names = self._names.get(key) or self._name(*key)
        kind, rname, reason_raw, source, state, hook, process, peer, local_abort, syncookie = names
        family = v[_FAMILY]
        if family == _AF_INET:
            fam: Optional[str] = "ipv4"
            la: Optional[str] = _ntop(v[_LADDR][:4])
            ra: Optional[str] = _ntop(v[_RADDR][:4])
        elif family == _AF_INET6:
            fam, la, ra = "ipv6", _ntop(v[_LADDR]), _ntop(v[_RADDR])
        else:
            fam = la = ra = None
        max_backlog = v[_MAX_BACKLOG]
        d = {
            "time": self.clock.iso(v[_KTIME]), "ktime_ns": v[_KTIME], "kind": kind, "reason": rname,
            "reason_raw": reason_raw, "reason_source": source, "state": state, "family": fam, "laddr": la,
            "lport": v[_LPORT] if family else None, "raddr": ra, "rport": v[_RPORT] if family else None,
            "pid": v[_PID] if process else None,
            "comm": v[_COMM].split(b"\0", 1)[0].decode("utf-8", "replace") if process else None,
            "source": hook, "backlog": v[_BACKLOG] if max_backlog else None, "max_backlog": max_backlog or None,
            "peer_from_packet": peer, "local_abort": local_abort, "syncookie": syncookie,
        }
        _copy(d, v)
        ev: Event = _new(Event)
        ev.__dict__ = d
        return ev


def decode(raw: Union[bytes, c.RawEvent], facts: KernelFacts, clock: Clock) -> Event:
    """One raw record (bytes, or a RawEvent) to an Event. A stream of them: hold a Decoder."""
    return Decoder(facts, clock).decode(raw if type(raw) is bytes else bytes(raw))
