"""``rsttrace export``: Prometheus metrics read from the BPF maps at scrape time.

A custom collector (prometheus client_python's "custom collectors"; ebpf_exporter's Collect)
turns the session's exact counts into samples on each scrape. Nothing is mirrored into Python
``Counter`` objects: the BPF maps are the only state, so a scrape shows exactly what the kernel
counted, and a storm costs Python nothing until someone scrapes.

Cardinality is bounded by construction: addresses and peer ports are never labels (they go to
the logs), listening ports are capped (``--max-port-labels``: the first N ports seen keep their
label for the process's life, later ones become ``port="other"``, so no series ever moves between
labels and no counter jumps), and a global cap (``--max-series``) folds any further label set
into an ``other`` bucket.
"""

from __future__ import annotations

import platform
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Set, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from rsttrace import __version__
from rsttrace.kernel import procnet
from rsttrace.pipeline.session import CountKey

DEFAULT_PORT = 10793  # outside Prometheus' default port allocations (9100-9999 is full); RFC 793 defined RST

# rsttrace_kernel_tcp_<name>_total <- (section, counter) of /proc/net/snmp or /proc/net/netstat
KERNEL_COUNTERS: Tuple[Tuple[str, str, str, str], ...] = (
    ("out_rsts", "Tcp", "OutRsts", "Segments sent with RST (Tcp OutRsts)"),
    ("estab_resets", "Tcp", "EstabResets", "Resets of established or close-wait connections (Tcp EstabResets)"),
    ("listen_overflows", "TcpExt", "ListenOverflows", "Accept queue overflows (TcpExt ListenOverflows)"),
    ("listen_drops", "TcpExt", "ListenDrops", "SYNs and ACKs dropped by listeners (TcpExt ListenDrops)"),
    ("abort_on_data", "TcpExt", "TCPAbortOnData", "Resets for data after close or SO_LINGER 0 (TCPAbortOnData)"),
    ("abort_on_close", "TcpExt", "TCPAbortOnClose", "Resets on close with unread data (TCPAbortOnClose)"),
    ("abort_on_memory", "TcpExt", "TCPAbortOnMemory", "Resets for lack of memory (TCPAbortOnMemory)"),
    ("abort_on_timeout", "TcpExt", "TCPAbortOnTimeout", "Connections killed by timeouts (TCPAbortOnTimeout)"),
    ("abort_on_linger", "TcpExt", "TCPAbortOnLinger", "Resets for TCP_LINGER2 (TCPAbortOnLinger)"),
    ("req_q_full_drop", "TcpExt", "TCPReqQFullDrop", "SYNs dropped: SYN queue full (TCPReqQFullDrop)"),
    ("req_q_full_do_cookies", "TcpExt", "TCPReqQFullDoCookies",
     "SYN cookies sent: SYN queue full (TCPReqQFullDoCookies)"),
)

# kind label of rsttrace_tcp_listen_overflows_total, by event kind (and reason where one kind
# holds two meanings): a SYN the accept queue had no room for, a final ACK likewise, a SYN the
# full SYN queue dropped, a SYN answered with a cookie (absorbed, not dropped), a SYN the listener
# dropped for another reason (ListenDrops alone). Cookies and drops are separate series so
# "absorbed by cookies" and "connections refused" can be told apart.
OVERFLOW_KIND = {"listen_overflow_syn": "syn", "listen_overflow_ack": "ack", "listen_drop": "syn_drop"}
SYN_QUEUE_KIND = {"TCPReqQFullDrop": "syn_queue_drop", "TCPReqQFullDoCookies": "syn_cookie"}

# The seam for per-namespace/pod labels (Kubernetes issue): given a netns inode, extra labels.
NetnsLabeler = Callable[[Optional[int]], Dict[str, str]]


class SeriesCap:
    """Sticky label budgets: what got a label keeps it; beyond the budget, ``other``."""

    def __init__(self, max_ports: int, max_series: int) -> None:
        self.max_ports = max_ports
        self.max_series = max_series
        self.ports: Set[int] = set()
        self.series: Dict[str, Set[Tuple[str, ...]]] = {}
        self.lock = threading.Lock()

    def port(self, port: Optional[int]) -> str:
        if port is None:
            return "unknown"
        with self.lock:
            if port in self.ports:
                return str(port)
            if len(self.ports) < self.max_ports:
                self.ports.add(port)
                return str(port)
        return "other"

    def labels(self, metric: str, values: Tuple[str, ...]) -> Tuple[str, ...]:
        with self.lock:
            seen = self.series.setdefault(metric, set())
            if values in seen:
                return values
            if sum(len(s) for s in self.series.values()) < self.max_series:
                seen.add(values)
                return values
        return tuple("other" for _ in values)


class SessionCollector:
    """Samples from a running session (or anything with its ``counts``/``lost``/attachments)."""

    def __init__(
        self,
        session: Any,
        cap: SeriesCap,
        proc_net: str = "/proc/net",
        netns_labels: Optional[NetnsLabeler] = None,
        extra_label_names: Tuple[str, ...] = (),
        kernel_release: Optional[str] = None,
    ) -> None:
        self.session = session
        self.cap = cap
        self.proc_net = proc_net
        self.netns_labels = netns_labels
        self.extra = extra_label_names
        self.kernel = kernel_release or platform.release()
        # Extra (pod) labels of a counter can change while its BPF count keeps growing: a pod's
        # entry expires, or the kernel gives a dead namespace's inode to a new pod. Series must
        # stay monotonic, so an unknown answer keeps the labels a counter had, and a move to
        # other labels retires what was counted so far under the old ones and starts the new
        # series from there.
        self._assigned: Dict[CountKey, Tuple[Tuple[str, ...], int]] = {}
        self._last: Dict[CountKey, int] = {}
        self._retired: Dict[Tuple[str, Tuple[str, ...]], int] = {}
        self._collect_lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        """The families a scrape returns, without samples: a restricted registry (``?name[]=...``)
        asks this once, at registration, to know which collector serves a name."""
        return [Metric(m.name, m.documentation, m.type) for m in self.collect()]

    def _extra(self, netns: Optional[int]) -> Tuple[str, ...]:
        if not self.extra or self.netns_labels is None:
            return ()
        labels = self.netns_labels(netns)
        return tuple(labels.get(n, "") for n in self.extra)

    def _rebased(self, k: CountKey, n: int, name: str, values: Tuple[str, ...]) -> Tuple[Tuple[str, ...], int]:
        """(extra labels, count under them) for counter ``k`` now at ``n``."""
        extra = self._extra(k.netns)
        prev = self._assigned.get(k)
        if prev is None:
            self._assigned[k] = (extra, 0)
            prev = (extra, 0)
        elif prev[0] != extra:
            if not any(extra):
                extra = prev[0]  # unknown now (pod gone, cache expired): keep the labels it had
            else:
                old = self.cap.labels(name, values + prev[0])
                self._retired[(name, old)] = self._retired.get((name, old), 0) + self._last.get(k, 0) - prev[1]
                self._assigned[k] = (extra, self._last.get(k, 0))
                prev = self._assigned[k]
        self._last[k] = n
        return extra, n - prev[1]

    def collect(self) -> Iterator[Metric]:
        with self._collect_lock:  # the rebasing state is shared by concurrent scrapes
            yield from self._collect()

    def _collect(self) -> Iterator[Metric]:
        counts: Dict[CountKey, int] = self.session.counts()
        sent = CounterMetricFamily("rsttrace_tcp_resets_sent", "TCP resets sent by the kernel, by its reason",
                                   labels=["reason", "reason_source", "state", "family", *self.extra])
        recv = CounterMetricFamily("rsttrace_tcp_resets_received", "TCP resets accepted by a socket, by its state",
                                   labels=["state", "family", *self.extra])
        ovf = CounterMetricFamily("rsttrace_tcp_listen_overflows",
                                  "Connection attempts a listener could not queue: syn/ack (accept queue full on "
                                  "SYN / final ACK), syn_queue_drop (SYN queue full, dropped), syn_cookie (SYN queue "
                                  "full, answered with a cookie), syn_drop (other listener drops, ListenDrops)",
                                  labels=["kind", "port", *self.extra])
        acc: Dict[Tuple[str, Tuple[str, ...]], int] = dict(self._retired)
        for k, n in counts.items():
            if k.kind == "sent":
                name = "sent"
                values: Tuple[str, ...] = (k.reason or "", k.reason_source or "", k.state or "", k.family or "")
            elif k.kind == "received":
                name = "received"
                values = (k.state or "", k.family or "")
            elif k.kind in OVERFLOW_KIND or k.kind == "syn_queue_overflow":
                name = "overflow"
                label = OVERFLOW_KIND.get(k.kind) or SYN_QUEUE_KIND.get(k.reason or "", "syn_queue_drop")
                values = (label, self.cap.port(k.port))
            else:
                continue
            extra, n = self._rebased(k, n, name, values) if self.extra else ((), n)
            values = self.cap.labels(name, values + extra)
            acc[(name, values)] = acc.get((name, values), 0) + n
        for gone in [k for k in self._last if k not in counts]:  # retired by the session: forget
            self._last.pop(gone, None)
            self._assigned.pop(gone, None)
        families = {"sent": sent, "received": recv, "overflow": ovf}
        for (name, values), n in sorted(acc.items()):
            families[name].add_metric(list(values), n)
        yield sent
        yield recv
        yield ovf

        lost = self.session.lost()
        lm = CounterMetricFamily("rsttrace_events_lost", "Events not delivered: kernel (ring/perf buffer full), "
                                 "user (dropped in user space)",
                                 labels=["stage"])
        lm.add_metric(["kernel"], lost.get("lost_kernel", 0))
        lm.add_metric(["user"], lost.get("lost_user", 0))
        yield lm
        held = CounterMetricFamily("rsttrace_events_suppressed", "Events the kernel held back to keep to the "
                                   "event log's rate (counted in the counters all the same)")
        held.add_metric([], lost.get("suppressed", 0))
        yield held
        full = CounterMetricFamily("rsttrace_map_spilled", "Counts that found the BPF map full: kept in a "
                                   "per-kind spill slot and exported with empty reason/state labels")
        full.add_metric([], lost.get("counter_map_full", 0))
        yield full

        att = GaugeMetricFamily("rsttrace_program_attached", "1 if the BPF program is attached", labels=["program"])
        for a in self.session.tracer.attachments:
            att.add_metric([a.program], 1 if a.attached else 0)
        yield att
        info = GaugeMetricFamily("rsttrace_build_info", "rsttrace version and the kernel it runs on",
                                 labels=["version", "kernel"])
        info.add_metric([__version__, self.kernel], 1)
        yield info

        kc = procnet.read(self.proc_net)
        for short, section, name, doc in KERNEL_COUNTERS:
            if name in kc.get(section, {}):
                m = CounterMetricFamily("rsttrace_kernel_tcp_" + short, doc + ", host network namespace")
                m.add_metric([], kc[section][name])
                yield m


class LogLimiter:
    """At most ``rate`` event lines a second; the rest are counted and reported each interval."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = float(rate)
        self.last = clock()
        self.suppressed = 0
        self.suppressed_total = 0

    def allow(self) -> bool:
        if self.rate <= 0:
            return False
        now = self.clock()
        self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        self.suppressed_total += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n
