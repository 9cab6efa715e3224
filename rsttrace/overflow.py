"""Listen-queue overflows that no tracepoint reports, derived from the kernel's own counters.

A SYN dropped because the accept queue is full (tcp_conn_request: ListenOverflows, then
consume_skb with no drop reason) and a full SYN queue (tcp_syn_flood_action: TCPReqQFullDrop /
TCPReqQFullDoCookies) fire no tracepoint, and this kind of node has neither kprobes nor loadable
fentry programs. So, per network namespace and per interval, rsttrace reads the counters, takes
away what it traced itself (final-ACK overflows via kfree_skb TCP_LISTEN_OVERFLOW, which also
bump ListenOverflows), and emits one event with the count and the listeners whose accept queue
is at its limit right then (sock_diag, what `ss -lt` shows). Such events carry
``source: "counters"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from . import netns as nsmod
from . import procnet
from .events import Clock, Event

WATCHED = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies")


@dataclass
class OverflowTotals:
    """Counter-derived totals since start, by (kind, reason, netns, port or None)."""

    counts: Dict[Tuple[str, str, int, Optional[int]], int] = field(default_factory=dict)

    def add(self, kind: str, reason: str, netns: int, port: Optional[int], n: int) -> None:
        key = (kind, reason, netns, port)
        self.counts[key] = self.counts.get(key, 0) + n


class OverflowPoller:
    """Call ``poll()`` every interval; it returns the counter-derived events since the last call.

    ``traced`` returns the running total of listen overflows rsttrace traced itself per netns
    (BPF counters: kfree_skb TCP_LISTEN_OVERFLOW, or the kprobes), or None when it traces
    none; the rest of ListenOverflows is reported as ``listen_overflow_syn``, with
    ``includes_ack: true`` when final-ACK overflows cannot be traced on this kernel.
    """

    def __init__(
        self,
        tcp_listen_state: Optional[int],
        traced: Callable[[], Optional[Dict[int, int]]],
        only_netns: Optional[int] = None,
        includes_ack: bool = False,
        proc_root: str = "/proc",
        run_netns: str = nsmod.RUN_NETNS,
        clock: Optional[Clock] = None,
    ) -> None:
        self.tcp_listen = tcp_listen_state
        self.traced = traced
        self.only_netns = only_netns
        self.includes_ack = includes_ack
        self.proc_root = proc_root
        self.run_netns = run_netns
        self.clock = clock or Clock()
        # Per netns: counters at first sight and the traced-ACK total then (the baseline), and
        # how much of each derived kind was already emitted. Working from cumulative values
        # means a read that races an overflow (counter bumped, BPF count not yet) is made good
        # at the next poll instead of being counted twice.
        self.base: Dict[int, Tuple[Dict[str, int], int]] = {}
        self.emitted: Dict[Tuple[int, str], int] = {}
        self.last: Dict[int, Dict[str, int]] = {}
        # Traced-ACK totals are keyed by inode in the BPF map and so carry over from a dead
        # namespace to the next one given the same inode: remember where each inode stood.
        self.ack_seen: Dict[int, int] = {}
        self.prev_cum: Dict[int, int] = {}
        self.polled = False
        self.totals = OverflowTotals()
        self.errors: List[str] = []

    @staticmethod
    def _watched(net_dir: str) -> Dict[str, int]:
        ext = procnet.read(net_dir).get("TcpExt", {})
        return {name: ext.get(name, 0) for name in WATCHED}

    def _listeners(self, ref: nsmod.NetnsRef) -> List[nsmod.Listener]:
        if self.tcp_listen is None:
            return []
        state = self.tcp_listen
        try:
            return nsmod.run_in(ref.ns_path, lambda: nsmod.listeners(state))
        except OSError as e:
            msg = "listing listeners in netns %d failed: %s" % (ref.inode, e)
            if msg not in self.errors:
                self.errors.append(msg)
            return []

    def poll(self) -> List[Event]:
        refs = nsmod.discover(self.proc_root, self.run_netns)
        if self.only_netns is not None:
            refs = {k: v for k, v in refs.items() if k == self.only_netns}
        traced = self.traced()  # before the counters: see the race note on self.base
        readings = nsmod.read_each(refs, self._watched)
        out: List[Event] = []
        now = time.monotonic_ns()
        for ino, cur in readings.items():
            ref = refs[ino]
            ack_now = (traced or {}).get(ino, 0)
            last = self.last.get(ino)
            self.last[ino] = cur
            if last is not None and any(cur[n] < last[n] for n in WATCHED):
                # Counters went down: the namespace was destroyed and its inode number reused
                # by a new one (the kernel recycles them) between two polls.
                self._forget(ino)
            if ino not in self.base:
                if not self.polled:
                    # Present when tracing started: what it counted before is history.
                    self.base[ino] = (cur, ack_now)
                    self.ack_seen[ino] = ack_now
                    continue
                # Born while we trace: everything it counted happened under our watch, even
                # before this first look, so count from zero.
                self.base[ino] = ({n: 0 for n in WATCHED}, self.ack_seen.get(ino, 0))
            self.ack_seen[ino] = ack_now
            base, ack_base = self.base[ino]
            lo = cur["ListenOverflows"] - base["ListenOverflows"]
            cum = {
                "ListenOverflows": lo - (ack_now - ack_base) if traced is not None else lo,
                "TCPReqQFullDrop": cur["TCPReqQFullDrop"] - base["TCPReqQFullDrop"],
                "TCPReqQFullDoCookies": cur["TCPReqQFullDoCookies"] - base["TCPReqQFullDoCookies"],
            }
            if traced is not None:
                # A traced overflow reaches the BPF count a moment before the kernel's counter (a
                # kprobe on entry) or after it (kfree_skb), so one reading can be off by those in
                # flight; emit only what two consecutive readings agree on.
                prev = self.prev_cum.get(ino)
                self.prev_cum[ino] = cum["ListenOverflows"]
                cum["ListenOverflows"] = min(cum["ListenOverflows"], prev if prev is not None else 0)
            new = {name: total - self.emitted.get((ino, name), 0) for name, total in cum.items()}
            if all(n <= 0 for n in new.values()):
                continue
            syn = new["ListenOverflows"]
            full = [lst for lst in self._listeners(ref) if lst.full] if syn > 0 else []
            if syn > 0:
                out.append(self._event("listen_overflow_syn", "ListenOverflows", syn, ino, now, full,
                                       self.includes_ack if traced is not None else True))
            for name in ("TCPReqQFullDrop", "TCPReqQFullDoCookies"):
                if new[name] > 0:
                    out.append(self._event("syn_queue_overflow", name, new[name], ino, now, [], False))
            for name, n in new.items():
                if n > 0:
                    self.emitted[(ino, name)] = self.emitted.get((ino, name), 0) + n
        for ino in list(self.base):
            if ino not in refs:  # the namespace is gone (a failed read alone proves nothing)
                self._forget(ino)
                self.last.pop(ino, None)
        self.polled = True
        return out

    def _forget(self, ino: int) -> None:
        self.base.pop(ino, None)
        self.prev_cum.pop(ino, None)
        for name in WATCHED:
            self.emitted.pop((ino, name), None)

    def _event(
        self, kind: str, reason: str, n: int, ino: int, now: int, full: List[nsmod.Listener], includes_ack: bool
    ) -> Event:
        one = full[0] if len(full) == 1 else None
        self.totals.add(kind, reason, ino, one.port if one else None, n)
        ev = Event(
            time=self.clock.iso(now),
            ktime_ns=now,
            kind=kind,
            reason=reason,  # the kernel's counter name (TcpExt in /proc/net/netstat)
            reason_raw=None,
            reason_source="kernel",
            state="TCP_LISTEN" if one else None,
            family=("ipv4" if one.family == 2 else "ipv6") if one else None,
            laddr=one.addr if one else None,
            lport=one.port if one else None,
            raddr=None,
            rport=None,
            netns=ino,
            cookie=None,
            pid=None,
            comm=None,
            source="counters",
            count=n,
            backlog=one.backlog if one else None,
            max_backlog=one.max_backlog if one else None,
        )
        if len(full) > 1:
            ev.extra["listeners"] = ["%s:%d" % (lst.addr, lst.port) for lst in full]
        if includes_ack:
            ev.extra["includes_ack"] = True
        return ev
