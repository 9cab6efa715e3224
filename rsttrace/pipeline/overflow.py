"""What no hook reports, derived from the kernel's own counters per network namespace.

A SYN dropped because the accept queue is full (tcp_conn_request: ListenOverflows, then
consume_skb with no drop reason), a full SYN queue (tcp_syn_flood_action: TCPReqQFullDrop /
TCPReqQFullDoCookies), the listener's other drops (ListenDrops alone: the SYN backlog
three-quarters full with syncookies off, no route for the SYN-ACK) and, on kernels whose
kfree_skb has no rx_sk, RSTs that hit a request socket (EmbryonicRsts) fire no tracepoint, and
this kind of node has neither kprobes nor loadable fentry programs. So, per namespace and per
interval, rsttrace reads the counters, takes away what it traced itself, and emits one event
with the count and, where sock_diag can tell, the listener concerned. Such events carry
``source: "counters"``. The identities these rest on are in the README ("The books").
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from rsttrace.kernel import netns as nsmod
from rsttrace.kernel import procnet
from rsttrace.pipeline.events import Clock, Event

WATCHED = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies", "EmbryonicRsts")

SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h (5.14+): a namespace's never-reused id
# include/uapi/linux/nsfs.h, _IOR(0xb7, 0xd, __u64) (6.18+): ns_common.ns_id, another such id
NS_GET_ID = (2 << 30) | (8 << 16) | (0xB7 << 8) | 0xD

# Per netns, what the BPF programs counted of the things the kernel's counters also count:
# "ListenOverflows" (traced listen overflows) and "EmbryonicRsts" (embryonic resets sent plus RSTs
# traced hitting a request socket).
Traced = Dict[int, Dict[str, int]]

# derived name -> (kind, reason, state) of its events
DERIVED: Dict[str, Tuple[str, str, Optional[str]]] = {
    "ListenOverflows": ("listen_overflow_syn", "ListenOverflows", None),
    "TCPReqQFullDrop": ("syn_queue_overflow", "TCPReqQFullDrop", None),
    "TCPReqQFullDoCookies": ("syn_queue_overflow", "TCPReqQFullDoCookies", None),
    "ListenDrops": ("listen_drop", "ListenDrops", None),
    "EmbryonicRsts": ("received", "EmbryonicRsts", "TCP_SYN_RECV"),
}
# Those that subtract a BPF count: a traced event reaches the BPF count a moment before the
# kernel's counter (a kprobe on entry) or after it (kfree_skb, a reset sent after the request is
# dropped), so one reading can be off by those in flight; emit only what two readings agree on.
SKEWED = ("ListenOverflows", "EmbryonicRsts")


@dataclass
class OverflowTotals:
    """Counter-derived totals since start, by (kind, reason, netns, port or None, state or None)."""

    counts: Dict[Tuple[str, str, int, Optional[int], Optional[str]], int] = field(default_factory=dict)

    def add(self, kind: str, reason: str, netns: int, port: Optional[int], n: int, state: Optional[str] = None) -> None:
        key = (kind, reason, netns, port, state)
        self.counts[key] = self.counts.get(key, 0) + n

    def retire(self, netns: int) -> Dict[Tuple[str, str, Optional[int], Optional[str]], int]:
        """Remove a namespace's totals (it is gone); returns them by (kind, reason, port, state)."""
        out: Dict[Tuple[str, str, Optional[int], Optional[str]], int] = {}
        for key in [k for k in self.counts if k[2] == netns]:
            kind, reason, _ns, port, state = key
            out[(kind, reason, port, state)] = out.get((kind, reason, port, state), 0) + self.counts.pop(key)
        return out


def _namespace_id(how: str) -> int:
    """The calling thread's namespace's never-reused id, as KernelFacts.netns_gen names it; 0
    where this kernel cannot say (NS_GET_ID is 6.18+, SO_NETNS_COOKIE 5.14+)."""
    try:
        if how == "ns_id":
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                return int(struct.unpack("=Q", fcntl.ioctl(fd, NS_GET_ID, b"\0" * 8))[0])
            finally:
                os.close(fd)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return 0


def _reader(netns_id: Optional[str]) -> Callable[[str], Dict[str, int]]:
    def read(net_dir: str) -> Dict[str, int]:
        ext = procnet.read(net_dir).get("TcpExt", {})
        out = {name: ext.get(name, 0) for name in WATCHED}
        if netns_id and net_dir == "/proc/thread-self/net":  # entered with setns: ask its id too
            out["_id"] = _namespace_id(netns_id)
        return out

    return read


class OverflowPoller:
    """Call ``poll()`` every interval; it returns the counter-derived events since the last call.

    ``traced`` returns what rsttrace traced itself per netns (see ``Traced``). With
    ``overflows_traced`` False no listen overflow can be traced on this kernel, and all of
    ListenOverflows is reported as ``listen_overflow_syn`` with ``includes_ack: true``; with
    ``includes_ack`` True final-ACK overflows are only partly traceable (the same mark).
    """

    ERRORS_MAX = 32  # distinct error lines kept: a node with pod churn must not grow this

    def __init__(
        self,
        tcp_listen_state: Optional[int],
        traced: Callable[[], Traced],
        only_netns: Optional[int] = None,
        includes_ack: bool = False,
        proc_root: str = "/proc",
        run_netns: str = nsmod.RUN_NETNS,
        clock: Optional[Clock] = None,
        overflows_traced: bool = True,
        tcp_syn_recv_state: Optional[int] = None,
        netns_id: Optional[str] = None,
    ) -> None:
        self.tcp_listen = tcp_listen_state
        self.tcp_syn_recv = tcp_syn_recv_state
        self._read = _reader(netns_id)  # netns_id: KernelFacts.netns_gen
        self.traced = traced
        self.only_netns = only_netns
        self.includes_ack = includes_ack
        self.overflows_traced = overflows_traced
        self.proc_root = proc_root
        self.run_netns = run_netns
        self.clock = clock or Clock()
        # Per netns: counters at first sight and the traced totals then (the baseline), and how
        # much of each derived value was already emitted. Working from cumulative values means a
        # read that races an event (counter bumped, BPF count not yet) is made good at the next
        # poll instead of being counted twice.
        self.base: Dict[int, Tuple[Dict[str, int], Dict[str, int]]] = {}
        self.emitted: Dict[Tuple[int, str], int] = {}
        self.last: Dict[int, Dict[str, int]] = {}
        # Traced totals are keyed by inode in the BPF map and so carry over from a dead namespace
        # to the next one given the same inode: remember where each inode stood.
        self.traced_seen: Dict[int, Dict[str, int]] = {}
        self.prev_cum: Dict[Tuple[int, str], int] = {}
        self.polled = False
        self.discovered = False  # the last poll could list the namespaces
        self.settled = True  # the last poll held nothing back for a second reading
        self.live: Set[int] = set()  # namespaces found by the last poll
        self.ids: Dict[int, int] = {}  # their never-reused ids, where setns let us ask (netns_id)
        self.gone: Set[int] = set()  # inodes whose namespace died or was replaced; the Session takes them
        self.totals = OverflowTotals()
        self.errors: List[str] = []

    def _error(self, msg: str) -> None:
        if msg not in self.errors:
            self.errors.append(msg)
            del self.errors[:-self.ERRORS_MAX]

    def _listeners(self, ref: nsmod.NetnsRef) -> List[nsmod.Listener]:
        if self.tcp_listen is None:
            return []
        state = self.tcp_listen
        try:
            return nsmod.run_in(ref.ns_path, lambda: nsmod.listeners(state))
        except OSError as e:
            self._error("listing listeners in netns %d failed: %s" % (ref.inode, e))
            return []

    def _flooded(self, ref: nsmod.NetnsRef) -> List[Tuple[nsmod.Listener, int]]:
        """Listeners with request sockets (SYN_RECV), most first: a SYN flood's target."""
        if self.tcp_listen is None or self.tcp_syn_recv is None:
            return []
        listen, syn_recv = self.tcp_listen, self.tcp_syn_recv
        try:
            return nsmod.run_in(ref.ns_path, lambda: nsmod.flooded(listen, syn_recv))
        except OSError as e:
            self._error("listing request sockets in netns %d failed: %s" % (ref.inode, e))
            return []

    def poll(self) -> List[Event]:
        try:
            refs = nsmod.discover(self.proc_root, self.run_netns)
        except OSError as e:
            # nothing is known this time (not "every namespace is gone"): keep all state
            self._error("listing namespaces under %s failed: %s" % (self.proc_root, e))
            self.discovered = False
            return []
        self.discovered = True
        if self.only_netns is not None:
            refs = {k: v for k, v in refs.items() if k == self.only_netns}
        traced = self.traced()  # before the counters: see the race note on self.base
        readings = nsmod.read_each(refs, self._read)
        out: List[Event] = []
        now = time.monotonic_ns()
        settled = True
        for ino, cur in readings.items():
            ref = refs[ino]
            tr = traced.get(ino, {})
            last = self.last.get(ino)
            self.last[ino] = cur
            if last is not None and (any(cur[n] < last[n] for n in WATCHED)
                                     or last.get("_id", 0) != cur.get("_id", 0)):
                # Another namespace has this inode now (the kernel recycles them): its id
                # differs, or its counters went down, between two polls.
                self._forget(ino)
                self.traced_seen.pop(ino, None)  # its BPF counts are a new namespace's: from zero
                self.gone.add(ino)
            if ino not in self.base:
                if not self.polled:
                    # Present when tracing started: what it counted before is history.
                    self.base[ino] = (cur, dict(tr))
                    self.traced_seen[ino] = dict(tr)
                    continue
                # Born while we trace: everything it counted happened under our watch, even
                # before this first look, so count from zero.
                self.base[ino] = ({n: 0 for n in WATCHED}, self.traced_seen.get(ino, {}))
            self.traced_seen[ino] = dict(tr)
            base, tbase = self.base[ino]
            d = {n: cur[n] - base[n] for n in WATCHED}
            dt = {n: tr.get(n, 0) - tbase.get(n, 0) for n in SKEWED}
            cum = {
                "ListenOverflows": d["ListenOverflows"] - (dt["ListenOverflows"] if self.overflows_traced else 0),
                "TCPReqQFullDrop": d["TCPReqQFullDrop"],
                "TCPReqQFullDoCookies": d["TCPReqQFullDoCookies"],
                # ListenDrops counts every listener drop, ListenOverflows and TCPReqQFullDrop
                # included (tcp_listendrop() at their drop labels): the rest has no other name
                "ListenDrops": d["ListenDrops"] - d["ListenOverflows"] - d["TCPReqQFullDrop"],
                "EmbryonicRsts": d["EmbryonicRsts"] - dt["EmbryonicRsts"],
            }
            for name in SKEWED:
                if name == "ListenOverflows" and not self.overflows_traced:
                    continue
                prev = self.prev_cum.get((ino, name))
                self.prev_cum[(ino, name)] = cum[name]
                agreed = min(cum[name], prev if prev is not None else 0)
                if agreed != cum[name]:
                    settled = False
                cum[name] = agreed
            new = {name: total - self.emitted.get((ino, name), 0) for name, total in cum.items()}
            if all(n <= 0 for n in new.values()):
                continue
            full = [lst for lst in self._listeners(ref) if lst.full] if new["ListenOverflows"] > 0 else []
            floods = self._flooded(ref) if any(new[n] > 0 for n in ("TCPReqQFullDrop", "TCPReqQFullDoCookies",
                                                                     "ListenDrops")) else []
            for name, n in new.items():
                if n <= 0:
                    continue
                self.emitted[(ino, name)] = self.emitted.get((ino, name), 0) + n
                if name == "ListenOverflows":
                    out.append(self._event(name, n, ino, now, [(lst, 0) for lst in full],
                                           self.includes_ack or not self.overflows_traced))
                elif name == "EmbryonicRsts":
                    out.append(self._event(name, n, ino, now, [], False))
                else:
                    out.append(self._event(name, n, ino, now, floods, False))
        self.live = set(refs)
        self.ids = {ino: r["_id"] for ino, r in readings.items() if r.get("_id")}
        for ino in list(self.base):
            if ino not in refs:  # the namespace is gone (a failed read alone proves nothing)
                self._forget(ino)
                self.last.pop(ino, None)
                self.gone.add(ino)
        self.polled = True
        self.settled = settled
        return out

    def take_gone(self) -> Set[int]:
        gone, self.gone = self.gone, set()
        return gone

    def _forget(self, ino: int) -> None:
        self.base.pop(ino, None)
        for name in WATCHED:
            self.emitted.pop((ino, name), None)
            self.prev_cum.pop((ino, name), None)

    def _event(
        self, name: str, n: int, ino: int, now: int, listeners: List[Tuple[nsmod.Listener, int]],
        includes_ack: bool,
    ) -> Event:
        kind, reason, state = DERIVED[name]
        # One listener named: the only one concerned, or a flood's clear target (most requests).
        one = listeners[0][0] if len(listeners) == 1 or (listeners and listeners[0][1] > 0) else None
        self.totals.add(kind, reason, ino, one.port if one else None, n, state)
        ev = Event(
            time=self.clock.iso(now),
            ktime_ns=now,
            kind=kind,
            reason=reason,  # the kernel's counter name (TcpExt in /proc/net/netstat)
            reason_raw=None,
            reason_source="kernel",
            state=state or ("TCP_LISTEN" if one else None),
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
        if len(listeners) > 1:
            ev.listeners = tuple("%s:%d" % (lst.addr, lst.port) + (" (%d requests)" % r if r else "")
                                 for lst, r in listeners[:8])
        if includes_ack:
            ev.includes_ack = True
        return ev
