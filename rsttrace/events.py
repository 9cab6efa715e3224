"""Events as users see them: decoded from the kernel's raw record, named from the kernel's tables.

``Event.to_dict()`` is the ``--json`` contract documented in the README; its keys may gain
siblings but never change meaning.
"""

from __future__ import annotations

import ctypes
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Optional, Tuple

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
    """Turns CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) into wall-clock ISO 8601."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def iso(self, ktime_ns: int) -> str:
        ns = ktime_ns + self.offset_ns
        dt = datetime.fromtimestamp(ns // 1000 / 1e6, tz=timezone.utc)
        return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def fmt_addr(family: int, raw: ctypes.Array[ctypes.c_uint8]) -> Optional[str]:
    if family == c.AF_INET:
        return socket.inet_ntop(socket.AF_INET, bytes(raw[:4]))
    if family == c.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, bytes(raw))
    return None


def infer_sent_reason(state: Optional[str], flags: int) -> str:
    """A reason for kernels whose tcp_send_reset has none (< 6.10). Documented in the README.

    Before 6.10 the tracepoint fires only with a full socket (tcp_v4_send_reset's
    ``sk && sk_fullsock(sk)``) or for active resets (tcp_send_active_reset, no skb).
    """
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
    if kind == "received" and state is not None:
        reason = RECEIVED_ERRNO.get(state, "ECONNRESET")
        return reason, ("inferred" if reason else None)
    if kind in ("listen_overflow_syn", "listen_overflow_ack"):
        return "ListenOverflows", "inferred"  # a kprobe saw it; the kernel counts it there
    return None, None


def decode(raw: c.RawEvent, facts: KernelFacts, clock: Clock) -> Event:
    kind = c.KIND_NAMES.get(raw.kind, "unknown:%d" % raw.kind)
    state = facts.state_name(raw.state)
    reason_raw = None if raw.reason == c.REASON_NONE else int(raw.reason)
    reason, source = name_reason(facts, kind, reason_raw, state, raw.flags)
    family = raw.family
    process = bool(raw.flags & c.F_PROCESS)
    return Event(
        time=clock.iso(raw.ktime_ns),
        ktime_ns=raw.ktime_ns,
        kind=kind,
        reason=reason,
        reason_raw=reason_raw,
        reason_source=source,
        state=state,
        family=FAMILY_NAMES.get(family),
        laddr=fmt_addr(family, raw.laddr),
        lport=raw.lport if family else None,
        raddr=fmt_addr(family, raw.raddr),
        rport=raw.rport if family else None,
        netns=raw.netns or None,
        cookie=raw.cookie or None,
        pid=raw.pid if process else None,
        comm=raw.comm.decode("utf-8", "replace") if process else None,
        backlog=raw.backlog if raw.max_backlog else None,
        max_backlog=raw.max_backlog or None,
        cgroup_id=raw.cgroup_id or None,
        peer_from_packet=bool(raw.flags & c.F_PEER_FROM_SKB),
        source="kprobe" if raw.flags & c.F_KPROBE else "tracepoint",
    )
