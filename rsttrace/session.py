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

from . import contract as c
from .events import Clock, Decoder, Event, name_reason
from .filters import EventFilter
from .kernel import KernelFacts
from .overflow import OverflowPoller
from .tracer import TraceOptions, Tracer


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
            # proc_root: in a pod, the host's /proc mounted elsewhere, so every pod's namespace is seen
            self.poller = OverflowPoller(facts.tcp_listen, self._traced_overflows, only_netns=options.netns,
                                         includes_ack=not ack_traced, clock=self.clock, proc_root=proc_root)
        self.delivered = 0
        self.last_loop = time.monotonic()
        self._lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.tracer.start(self._on_raw if self.options.events else None)
        if self.poller is not None:
            self.poller.poll()  # baseline of every namespace's counters

    def close(self) -> None:
        self.tracer.close()

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
            if after_poll is not None:
                after_poll()
            if time.monotonic() >= next_poll:
                next_poll += self.overflow_interval
                self.poll_overflows()
            if max_events is not None and self.delivered >= max_events:
                break

    # --- events ------------------------------------------------------------------------
    def _on_raw(self, raw: bytes) -> None:
        self.deliver(self._decode(raw))

    def deliver(self, ev: Event) -> None:
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
            evs = self.poller.poll()
        for ev in evs:
            if self.options.events:
                self.deliver(ev)
        return evs

    def _traced_overflows(self) -> Optional[Dict[int, int]]:
        """Listen overflows the BPF programs counted, per netns; None when none can be."""
        f = self.facts
        if f.listen_overflow_reason is None and not f.kp_syn_recv and not f.kp_conn_request:
            return None
        out: Dict[int, int] = {}
        for (kind, _r, _s, _f, netns, _p, _fl), n in self.tracer.counters().items():
            if kind in (c.KIND_LISTEN_OVERFLOW_ACK, c.KIND_LISTEN_OVERFLOW_SYN):
                out[netns] = out.get(netns, 0) + n
        return out

    # --- counters ------------------------------------------------------------------------
    def counts(self) -> Dict[CountKey, int]:
        """Every exact count so far with names: BPF map counters plus counter-derived kinds."""
        out: Dict[CountKey, int] = {}
        for (kind, reason, state, family, netns, port, flags), n in self.tracer.counters().items():
            kname = c.KIND_NAMES.get(kind, "unknown:%d" % kind)
            sname = self.facts.state_name(state)
            if netns or reason is not None:
                rname, rsrc = name_reason(self.facts, kname, reason, sname, flags)
            else:  # spilled counts (map full): nothing left to name them by
                rname, rsrc = None, None
            key = CountKey(kname, rname, rsrc, sname, {c.AF_INET: "ipv4", c.AF_INET6: "ipv6"}.get(family),
                           netns or None, port or None)
            out[key] = out.get(key, 0) + n
        if self.poller is not None:
            with self._lock:
                items = list(self.poller.totals.counts.items())
            for (dkind, dreason, dnetns, dport), n in items:
                key = CountKey(dkind, dreason, "kernel", None, None, dnetns, dport)
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
