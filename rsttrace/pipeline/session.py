"""A tracing session: the BPF tracer, the counter-derived overflow poller, and the event pipeline.

Shared by ``trace``, ``summary`` and ``export``. Events flow: ring buffer -> decode (names from
the running kernel) -> filter -> sinks. Counters never flow: they are read from the BPF maps
when someone asks (summary interval, Prometheus scrape).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from rsttrace.capture import contract as c
from rsttrace.capture.tracer import TraceOptions, Tracer
from rsttrace.kernel.facts import KernelFacts
from rsttrace.pipeline.events import Clock, Decoder, Event, name_reason
from rsttrace.pipeline.filters import EventFilter
from rsttrace.pipeline.overflow import OverflowPoller

_FIN_WAIT = ("TCP_FIN_WAIT1", "TCP_FIN_WAIT2")


@dataclass(frozen=True)
class CountKey:
    """A counter with names, as summary and the exporter show it."""

    kind: str
    reason: Optional[str]
    reason_source: Optional[str]
    state: Optional[str]
    family: Optional[str]
    netns: Optional[int]
    port: Optional[int]


class Session:
    def __init__(
        self,
        facts: KernelFacts,
        options: TraceOptions,
        sink: Optional[Callable[[Event], None]] = None,
        event_filter: Optional[EventFilter] = None,
        overflow_interval: float = 1.0,
        poll_overflows: bool = True,
        attribute: Optional[Callable[[Event], None]] = None,
        proc_root: str = "/proc",
    ) -> None:
        self.facts = facts
        self.options = options
        self.sink = sink
        self.filter = event_filter or EventFilter()
        self.attribute = attribute
        self.clock = Clock()
        self._decode = Decoder(facts, self.clock).decode
        self.tracer = Tracer(facts, options)
        self.overflow_interval = overflow_interval
        self.poller: Optional[OverflowPoller] = None
        if poll_overflows:
            ack_traced = facts.listen_overflow_reason is not None or facts.kp_syn_recv
            overflows_traced = ack_traced or facts.kp_conn_request or facts.kfree_rx_sk
            syn_recv = next((v for v, n in facts.tcp_states.items() if n == "TCP_SYN_RECV"), None)
            # proc_root: in a pod, the host's /proc mounted elsewhere, so every pod's namespace is seen
            self.poller = OverflowPoller(facts.tcp_listen, self._traced, only_netns=options.netns,
                                         includes_ack=not ack_traced, clock=self.clock, proc_root=proc_root,
                                         overflows_traced=overflows_traced, tcp_syn_recv_state=syn_recv,
                                         netns_id=facts.netns_gen)
        self._generations = facts.netns_gen is not None
        self._invalid_syn = next((v for v, n in facts.rst_reasons.items() if n == "INVALID_SYN"), None)
        self.delivered = 0
        self.last_loop = time.monotonic()
        self._lock = threading.Lock()
        # Counts of namespaces that are gone, folded together (netns None) so every total stays
        # monotonic after their map entries are deleted (see prune()).
        self.retired: Dict[CountKey, int] = {}
        self._missing: Dict[int, int] = {}  # netns in the counter map but not alive: polls missed
        self._reads_at_poll = 0  # tracer.reads when prune() last ran
        self._snapshot: Dict[Tuple[int, Optional[int], int, int, int, int, int], int] = {}  # poll_overflows()
        # received events in FIN_WAIT1/2 wait here for a poll: the send event of a local abort
        # on data (local_abort: true) that follows takes them back (see deliver()).
        self._held: List[Tuple[int, Event]] = []
        self._polls = 0

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.tracer.start(self._on_raw if self.options.events else None)
        if self.poller is not None:
            self._snapshot = self.tracer.counters()
            self.poller.poll()  # baseline of every namespace's counters

    def close(self) -> None:
        self.tracer.close()

    def finish(self, settle: float = 1.0) -> List[Event]:
        """At exit: one last look at the counters, read until two readings agree (at most
        ``settle`` seconds), so the overflows of the last seconds are reported, then every
        held event. Returns the counter-derived events of these last readings."""
        out: List[Event] = []
        if self.options.events:
            self.tracer.poll(0)  # what the ring buffer still holds: corrections included
        if self.poller is not None:
            end = time.monotonic() + settle
            while True:
                out.extend(self.poll_overflows())
                if self.poller.settled or time.monotonic() >= end:
                    break
                time.sleep(0.05)
        self._release_held(everything=True)
        return out

    def run(
        self,
        stop: threading.Event,
        duration: Optional[float] = None,
        max_events: Optional[int] = None,
        after_poll: Optional[Callable[[], None]] = None,
    ) -> None:
        """Deliver events until ``stop`` is set, ``duration`` passes or ``max_events`` arrive."""
        deadline = time.monotonic() + duration if duration else None
        next_poll = time.monotonic() + self.overflow_interval
        while not stop.is_set():
            now = self.last_loop = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            timeout = min(0.1, max(0.0, next_poll - now))
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now))
            self.tracer.poll(int(timeout * 1000))
            self._polls += 1
            if self._held:
                self._release_held()
            if after_poll is not None:
                after_poll()
            if time.monotonic() >= next_poll:
                next_poll += self.overflow_interval
                self.poll_overflows()
            if max_events is not None and self.delivered >= max_events:
                break

    # --- events ------------------------------------------------------------------------
    def _on_raw(self, buf: bytes, offsets: List[int]) -> None:
        """A batch of records from the tracer: decoded from the one buffer, in order."""
        decode, deliver = self._decode, self.deliver
        for off in offsets:
            deliver(decode(buf, off))

    def deliver(self, ev: Event) -> None:
        if ev.kind == "received" and ev.state in _FIN_WAIT and ev.source != "counters":
            # tcp:tcp_receive_reset also fires when this kernel aborts a shut-down socket on data;
            # then a send event marked local_abort follows at once (the same call chain)
            self._held.append((self._polls, ev))
            return
        if ev.local_abort and self._held:
            tup = (ev.netns, ev.laddr, ev.lport, ev.raddr, ev.rport)
            for i, (_n, held) in enumerate(self._held):
                if (held.netns, held.laddr, held.lport, held.raddr, held.rport) == tup:
                    del self._held[i]  # no RST arrived: the count was taken back in the kernel too
                    break
        self._pass(ev)

    def _release_held(self, everything: bool = False) -> None:
        """Deliver held received events that no correction claimed within two polls."""
        keep: List[Tuple[int, Event]] = []
        for n, ev in self._held:
            if everything or self._polls - n >= 2:
                self._pass(ev)
            else:
                keep.append((n, ev))
        self._held = keep

    def _pass(self, ev: Event) -> None:
        if not self.filter.match(ev):
            return
        self.delivered += 1
        if self.attribute is not None:
            self.attribute(ev)
        if self.sink is not None:
            self.sink(ev)

    def poll_overflows(self) -> List[Event]:
        if self.poller is None:
            return []
        with self._lock:
            # one read of the counter map serves the poller (what was traced) and prune() (which
            # namespaces have counts): before the kernel's counters, see OverflowPoller.base
            self._snapshot = self.tracer.counters()
            evs = self.poller.poll()
            self.prune()
        for ev in evs:
            if self.options.events:
                self.deliver(ev)
        return evs

    def _traced(self) -> Dict[int, Dict[str, int]]:
        """Per netns, what the BPF programs counted that the kernel's counters count too
        (overflow.Traced): listen overflows, and the resets EmbryonicRsts counts."""
        out: Dict[int, Dict[str, int]] = {}
        listen = self.facts.tcp_listen
        for (kind, reason, state, _f, netns, _p, flags), n in self._snapshot.items():
            if kind in (c.KIND_LISTEN_OVERFLOW_ACK, c.KIND_LISTEN_OVERFLOW_SYN):
                name = "ListenOverflows"
            elif kind == c.KIND_RECEIVED and flags & c.F_REQUEST_SOCK:
                name = "EmbryonicRsts"
            elif kind == c.KIND_SENT and (
                    (reason is not None and reason == self._invalid_syn)
                    or (reason is None and state == listen and not flags & c.F_ACTIVE)):
                # tcp_check_req's embryonic reset (INVALID_SYN; before 6.10 a passive reset by a
                # listener, as infer_sent_reason names it) counts EmbryonicRsts too
                name = "EmbryonicRsts"
            else:
                continue
            d = out.setdefault(netns, {})
            d[name] = d.get(name, 0) + n
        return out

    def prune(self) -> None:
        """Forget namespaces that are gone (called with the poller's view, under its lock).

        A namespace no poll found twice running, or whose inode now belongs to a new namespace
        (a newer generation in the BPF keys; the poller saw its cookie change or its counters go
        down), has its BPF counters deleted and their counts folded into ``retired`` (netns
        None): totals never go down, the map holds only live namespaces, and a reused inode
        starts from zero. On kernels without namespace generations (before 5.12) the counts a
        new namespace made on a reused inode before the poll that noticed it go with the old one.
        """
        if self.poller is None or not self.poller.polled or not self.poller.discovered:
            return  # a poll that could not list namespaces says nothing about who is gone
        gone = self.poller.take_gone()
        live = self.poller.live
        inodes = {k[4] for k in self._snapshot if k[4]}
        for ino in inodes - live:
            self._missing[ino] = self._missing.get(ino, 0) + 1
            if self._missing[ino] >= 2:
                gone.add(ino)
        for ino in list(self._missing):
            if ino in live or ino not in inodes:
                self._missing.pop(ino, None)
        gone -= {0}
        # A reused inode that is alive: where the kernel has namespace generations, its old
        # namespace's counts are an older generation, which retire_netns() always takes, and
        # its own stay; without them (before 5.12) the inode's counts go, the new one's first
        # moments with them.
        if self._generations:
            # Every live namespace's own generation, where the poller could ask it (setns): any
            # other generation of its inode is a predecessor's. Where it could not, older
            # generations already seen at the previous poll are.
            known = {ino: v & 0xFFFFFFFF for ino, v in self.poller.ids.items() if ino in live}
            retired = self.tracer.retire(gone - live, known, live - set(known), self._reads_at_poll)
        else:
            retired = self.tracer.retire(gone, {}, set(), 0)
        self._reads_at_poll = self.tracer.reads
        for key, n in self._name_counts(retired).items():
            k = CountKey(key.kind, key.reason, key.reason_source, key.state, key.family, None, key.port)
            self.retired[k] = self.retired.get(k, 0) + n
        for ino in gone:
            self._missing.pop(ino, None)
            # its BPF counts start again from zero: so does the poller's view of them
            self.poller.traced_seen.pop(ino, None)
            # counter-derived totals are the poller's, which started the new namespace from zero
            for (kind, reason, port, state), n in self.poller.totals.retire(ino).items():
                k = CountKey(kind, reason, "kernel", state, None, None, port)
                self.retired[k] = self.retired.get(k, 0) + n

    # --- counters ------------------------------------------------------------------------
    def counts(self) -> Dict[CountKey, int]:
        """Every exact count so far with names: BPF map counters, counter-derived kinds, and the
        retired counts of namespaces that are gone (netns None)."""
        with self._lock:
            out = self._name_counts(self.tracer.counters())
            for k, n in self.retired.items():
                out[k] = out.get(k, 0) + n
        for (dkind, dreason, dnetns, dport, dstate), n in self.derived().items():
            key = CountKey(dkind, dreason, "kernel", dstate, None, dnetns, dport)
            out[key] = out.get(key, 0) + n
        return out

    def derived(self) -> Dict[Tuple[str, str, int, Optional[int], Optional[str]], int]:
        """The counter-derived kinds' totals since start, by (kind, reason, netns, port, state):
        a copy taken under the lock the poller updates them under."""
        if self.poller is None:
            return {}
        with self._lock:
            return dict(self.poller.totals.counts)

    def _name_counts(self, raw: Dict[Tuple[int, Optional[int], int, int, int, int, int], int]) -> Dict[CountKey, int]:
        out: Dict[CountKey, int] = {}
        for (kind, reason, state, family, netns, port, flags), n in raw.items():
            kname = c.KIND_NAMES.get(kind, "unknown:%d" % kind)
            sname = self.facts.state_name(state)
            if netns or reason is not None:
                rname, rsrc = name_reason(self.facts, kname, reason, sname, flags)
            else:  # spilled counts (map full): nothing left to name them by
                rname, rsrc = None, None
            key = CountKey(kname, rname, rsrc, sname, {c.AF_INET: "ipv4", c.AF_INET6: "ipv6"}.get(family),
                           netns or None, port or None)
            out[key] = out.get(key, 0) + n
        return out

    def lost(self) -> Dict[str, int]:
        return self.tracer.stats()


def group(counts: Dict[CountKey, int]) -> Dict[Tuple[str, str, str], int]:
    """(kind, reason, state) totals, as the summary prints them."""
    out: Dict[Tuple[str, str, str], int] = {}
    for k, n in counts.items():
        key = (k.kind, k.reason or "-", (k.state or "-"))
        out[key] = out.get(key, 0) + n
    return out
