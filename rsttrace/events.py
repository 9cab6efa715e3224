"""Events as users see them: decoded from the kernel's raw record, named from the kernel's tables.

``Event.to_dict()`` is the ``--json`` contract documented in the README; its keys may gain
siblings but never change meaning.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

from . import contract as c
from .kernel import KernelFacts

FAMILY_NAMES = {c.AF_INET: "ipv4", c.AF_INET6: "ipv6"}

# Received resets carry no reason; the kernel's own words for them are the errno tcp_reset()
# hands the application, chosen by state (net/ipv4/tcp_input.c, tcp_reset()).
RECEIVED_ERRNO = {"TCP_SYN_SENT": "ECONNREFUSED", "TCP_CLOSE_WAIT": "EPIPE", "TCP_CLOSE": None}


@dataclass
class Event:
    time: str
    ktime_ns: int
    kind: str
    reason: Optional[str]
    reason_raw: Optional[int]
    reason_source: Optional[str]  # "kernel" | "inferred" | None
    state: Optional[str]
    family: Optional[str]
    laddr: Optional[str]
    lport: Optional[int]
    raddr: Optional[str]
    rport: Optional[int]
    netns: Optional[int]
    cookie: Optional[int]
    pid: Optional[int]
    comm: Optional[str]
    source: str = "tracepoint"  # "kprobe" where older kernels need one, "counters" for counter-derived
    count: int = 1
    backlog: Optional[int] = None
    max_backlog: Optional[int] = None
    cgroup_id: Optional[int] = None
    peer_from_packet: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {
            "time": self.time,
            "ktime_ns": self.ktime_ns,
            "kind": self.kind,
            "reason": self.reason,
            "reason_raw": self.reason_raw,
            "reason_source": self.reason_source,
            "state": self.state,
            "family": self.family,
            "laddr": self.laddr,
            "lport": self.lport,
            "raddr": self.raddr,
            "rport": self.rport,
            "netns": self.netns,
            "cookie": self.cookie,
            "pid": self.pid,
            "comm": self.comm,
            "source": self.source,
            "count": self.count,
        }
        if self.kind.startswith("listen_overflow") or self.kind == "syn_queue_overflow":
            d["backlog"] = self.backlog
            d["max_backlog"] = self.max_backlog
        if self.cgroup_id:
            d["cgroup_id"] = self.cgroup_id
        if self.peer_from_packet:
            d["peer_from_packet"] = True
        d.update(self.extra)
        return d


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


# One unpack of the whole record instead of 20 ctypes attribute reads.
RAW, _RAW_FIELDS = _struct_of(c.RawEvent)
RAW_SIZE = RAW.size
_UNPACKED = ("ktime_ns", "cookie", "cgroup_id", "netns", "pid", "reason", "backlog", "max_backlog", "netns_gen", "kind",
             "family", "lport", "rport", "state", "flags", "laddr", "raddr", "comm")  # Decoder.decode's order
if _RAW_FIELDS != _UNPACKED or ctypes.sizeof(c.RawEvent) != RAW_SIZE:  # not an assert: -O must not skip it
    raise ImportError("contract.RawEvent changed: update Decoder.decode's unpacking (%s)" % ", ".join(_RAW_FIELDS))

_PROCESS, _KPROBE, _PEER = c.F_PROCESS, c.F_KPROBE, c.F_PEER_FROM_SKB
_MARKS = c.F_LOCAL_ABORT | c.F_SYNCOOKIE  # flags that add a JSON key (see Decoder.decode)
_AF_INET, _AF_INET6 = c.AF_INET, c.AF_INET6
_NAMES_MAX = 4096  # (kind, reason, state, flags) combinations: a few dozen in practice
_Names = Tuple[str, Optional[str], Optional[int], Optional[str], Optional[str], str, bool, bool]


class Decoder:
    """Raw records to Events for one kernel's facts and clock, names cached per combination.

    The cache assumes ``facts`` is not changed after the first decode (it is filled once, by
    ``kernel.gather``).
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
                 bool(flags & _PROCESS), bool(flags & _PEER))
        if len(self._names) >= _NAMES_MAX:
            self._names.clear()
        self._names[(kind_raw, reason, state_raw, flags)] = names
        return names

    def decode(self, data: bytes) -> Event:
        (ktime_ns, cookie, cgroup_id, netns, pid, reason, backlog, max_backlog, _gen, kind_raw, family, lport,
         rport, state_raw, flags, laddr, raddr, comm) = RAW.unpack_from(data)
        names = self._names.get((kind_raw, reason, state_raw, flags))
        if names is None:
            names = self._name(kind_raw, reason, state_raw, flags)
        kind, rname, reason_raw, source, state, hook, process, peer = names
        if family == _AF_INET:
            fam: Optional[str] = "ipv4"
            la: Optional[str] = _ntop(laddr[:4])
            ra: Optional[str] = _ntop(raddr[:4])
        elif family == _AF_INET6:
            fam, la, ra = "ipv6", _ntop(laddr), _ntop(raddr)
        else:
            fam = la = ra = None
        ev = Event(
            self.clock.iso(ktime_ns), ktime_ns, kind, rname, reason_raw, source, state, fam,
            la, lport if family else None, ra, rport if family else None,
            netns or None, cookie or None,
            pid if process else None,
            comm.split(b"\0", 1)[0].decode("utf-8", "replace") if process else None,
            hook, 1,
            backlog if max_backlog else None, max_backlog or None, cgroup_id or None, peer,
        )
        if flags & _MARKS:
            if flags & c.F_LOCAL_ABORT:
                ev.extra["local_abort"] = True  # see Session.deliver: the received it corrects
            if flags & c.F_SYNCOOKIE:
                ev.extra["syncookie"] = True
        return ev


def decode(raw: Union[bytes, c.RawEvent], facts: KernelFacts, clock: Clock) -> Event:
    """One raw record (bytes, or a RawEvent) to an Event. A stream of them: hold a Decoder."""
    return Decoder(facts, clock).decode(raw if type(raw) is bytes else bytes(raw))
