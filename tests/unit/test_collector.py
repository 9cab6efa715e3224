"""The Prometheus collector against a fake session and fixture /proc/net files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from rsttrace.pipeline.session import CountKey
from rsttrace.sinks.exporter import LogLimiter, SeriesCap, SessionCollector
from rsttrace.sinks.httpserve import parse_listen

SNMP = "Tcp: RtoAlgorithm OutRsts EstabResets\nTcp: 1 42 7\n"
NETSTAT = ("TcpExt: ListenOverflows ListenDrops TCPAbortOnData TCPAbortOnClose TCPReqQFullDoCookies\n"
           "TcpExt: 5 6 3 2 1\n")


@dataclass
class Att:
    program: str
    attached: bool


@dataclass
class FakeTracer:
    attachments: List[Att] = field(default_factory=lambda: [Att("rsttrace_send_reset", True),
                                                           Att("rsttrace_kfree_skb", False)])


class FakeSession:
    def __init__(self, counts: Dict[CountKey, int]) -> None:
        self._counts = counts
        self.tracer = FakeTracer()

    def counts(self) -> Dict[CountKey, int]:
        return dict(self._counts)

    def lost(self) -> Dict[str, int]:
        return {"lost_kernel": 3, "lost_user": 1, "counter_map_full": 0}


def sent(reason: str, n_ns: int, state: str = "") -> CountKey:
    return CountKey("sent", reason, "kernel", state or None, "ipv4", n_ns, None)


@pytest.fixture()
def proc_net(tmp_path: str) -> str:
    for name, text in (("snmp", SNMP), ("netstat", NETSTAT)):
        with open(os.path.join(tmp_path, name), "w") as f:
            f.write(text)
    return str(tmp_path)


def registry(session: FakeSession, proc_net: str, cap: SeriesCap, **kw: object) -> CollectorRegistry:
    r = CollectorRegistry()
    r.register(SessionCollector(session, cap, proc_net=proc_net, kernel_release="6.18.0", **kw))  # type: ignore[arg-type]
    return r


def test_samples_sum_namespaces_and_read_kernel_counters(proc_net: str) -> None:
    s = FakeSession({
        sent("NO_SOCKET", 1): 4, sent("NO_SOCKET", 2): 6, sent("TCP_STATE", 1, "TCP_CLOSE"): 2,
        CountKey("received", "ECONNREFUSED", "inferred", "TCP_SYN_SENT", "ipv6", 1, None): 9,
        CountKey("listen_overflow_ack", "TCP_LISTEN_OVERFLOW", "kernel", "TCP_LISTEN", "ipv4", 1, 8080): 2,
        CountKey("listen_overflow_syn", "ListenOverflows", "kernel", None, None, 1, 8080): 3,
        CountKey("syn_queue_overflow", "TCPReqQFullDrop", "kernel", None, None, 1, None): 1,
        CountKey("syn_queue_overflow", "TCPReqQFullDoCookies", "kernel", None, None, 1, 443): 7,
        CountKey("listen_drop", "ListenDrops", "kernel", None, None, 2, None): 5,
    })
    r = registry(s, proc_net, SeriesCap(64, 2000))
    v = r.get_sample_value
    assert v("rsttrace_tcp_resets_sent_total",
             {"reason": "NO_SOCKET", "reason_source": "kernel", "state": "", "family": "ipv4"}) == 10
    assert v("rsttrace_tcp_resets_sent_total",
             {"reason": "TCP_STATE", "reason_source": "kernel", "state": "TCP_CLOSE", "family": "ipv4"}) == 2
    assert v("rsttrace_tcp_resets_received_total", {"state": "TCP_SYN_SENT", "family": "ipv6"}) == 9
    assert v("rsttrace_tcp_listen_overflows_total", {"kind": "ack", "port": "8080"}) == 2
    assert v("rsttrace_tcp_listen_overflows_total", {"kind": "syn", "port": "8080"}) == 3
    # SYNs refused and SYNs absorbed by cookies are separate series (the alerts tell them apart).
    assert v("rsttrace_tcp_listen_overflows_total", {"kind": "syn_queue_drop", "port": "unknown"}) == 1
    assert v("rsttrace_tcp_listen_overflows_total", {"kind": "syn_cookie", "port": "443"}) == 7
    assert v("rsttrace_tcp_listen_overflows_total", {"kind": "syn_drop", "port": "unknown"}) == 5
    assert v("rsttrace_tcp_listen_overflows_total", {"kind": "syn_queue", "port": "unknown"}) is None
    assert v("rsttrace_events_lost_total", {"stage": "kernel"}) == 3
    assert v("rsttrace_events_lost_total", {"stage": "user"}) == 1
    assert v("rsttrace_program_attached", {"program": "rsttrace_send_reset"}) == 1
    assert v("rsttrace_program_attached", {"program": "rsttrace_kfree_skb"}) == 0
    assert v("rsttrace_build_info", {"version": "0.1.0", "kernel": "6.18.0"}) == 1
    assert v("rsttrace_kernel_tcp_out_rsts_total") == 42
    assert v("rsttrace_kernel_tcp_listen_overflows_total") == 5
    assert v("rsttrace_kernel_tcp_req_q_full_do_cookies_total") == 1
    assert v("rsttrace_kernel_tcp_abort_on_memory_total") is None  # absent from this kernel's file
    text = generate_latest(r).decode()
    assert "laddr" not in text and "raddr" not in text  # addresses are never labels


def test_port_labels_are_capped_and_sticky(proc_net: str) -> None:
    cap = SeriesCap(max_ports=2, max_series=2000)
    keys = {CountKey("listen_overflow_ack", "TCP_LISTEN_OVERFLOW", "kernel", "TCP_LISTEN", "ipv4", 1, p): 1
            for p in (80, 443, 8080, 9090)}
    r = registry(FakeSession(keys), proc_net, cap)
    v = r.get_sample_value
    labelled = [p for p in ("80", "443", "8080", "9090")
                if v("rsttrace_tcp_listen_overflows_total", {"kind": "ack", "port": p})]
    assert len(labelled) == 2
    assert v("rsttrace_tcp_listen_overflows_total", {"kind": "ack", "port": "other"}) == 2
    assert cap.port(int(labelled[0])) == labelled[0]  # a labelled port keeps its label


def test_port_scan_keeps_series_bounded(proc_net: str) -> None:
    """A scan's shape: resets to thousands of peers and ports; series stay a handful."""
    counts = {sent("NO_SOCKET", 1): 100000, sent("TCP_FLAGS", 1): 5}
    counts.update({CountKey("listen_overflow_syn", "ListenOverflows", "kernel", None, None, 1, p): 1
                   for p in range(1000, 6000)})
    r = registry(FakeSession(counts), proc_net, SeriesCap(64, 2000))
    samples = [s for m in r.collect() for s in m.samples if m.name == "rsttrace_tcp_listen_overflows"]
    assert len(samples) <= 65 + 1


def test_global_series_cap_folds_into_other(proc_net: str) -> None:
    counts = {sent("R%d" % i, 1): 1 for i in range(10)}
    r = registry(FakeSession(counts), proc_net, SeriesCap(64, 4))
    total = r.get_sample_value("rsttrace_tcp_resets_sent_total",
                               {"reason": "other", "reason_source": "other", "state": "other", "family": "other"})
    assert total == 6  # 4 series kept, 6 folded, nothing lost


def test_netns_label_seam(proc_net: str) -> None:
    r = registry(FakeSession({sent("NO_SOCKET", 11): 2, sent("NO_SOCKET", 12): 3}), proc_net, SeriesCap(64, 100),
                 netns_labels=lambda ns: {"netns": str(ns)}, extra_label_names=("netns",))
    assert r.get_sample_value("rsttrace_tcp_resets_sent_total", {"reason": "NO_SOCKET", "reason_source": "kernel",
                                                                "state": "", "family": "ipv4", "netns": "12"}) == 3


def test_log_limiter() -> None:
    now = [0.0]
    lim = LogLimiter(5, clock=lambda: now[0])
    assert sum(lim.allow() for _ in range(20)) == 5
    assert lim.take_suppressed() == 15 and lim.take_suppressed() == 0
    now[0] = 1.0
    assert sum(lim.allow() for _ in range(20)) == 5
    assert lim.suppressed_total == 30
    off = LogLimiter(0)
    assert not off.allow()


@pytest.mark.parametrize("value,want", [("127.0.0.1:10793", ("127.0.0.1", 10793)), ("[::1]:9", ("::1", 9)),
                                        (":10793", ("0.0.0.0", 10793)), ("[::]:1", ("::", 1))])
def test_parse_listen(value: str, want: tuple) -> None:  # type: ignore[type-arg]
    assert parse_listen(value) == want


@pytest.mark.parametrize("value", ["10793", "::1:80", "host:http", "1.2.3.4:70000", "[1.2.3.4]:80"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


def test_restricted_scrape_returns_the_family_asked_for(proc_net: str) -> None:
    """`/metrics?name[]=rsttrace_tcp_resets_sent_total`: the registry finds the collector by the
    families its describe() names, and the answer holds that family alone."""
    r = registry(FakeSession({sent("NO_SOCKET", 1): 4}), proc_net, SeriesCap(8, 100))
    text = generate_latest(r.restricted_registry(["rsttrace_tcp_resets_sent_total"])).decode()
    assert 'rsttrace_tcp_resets_sent_total{family="ipv4",reason="NO_SOCKET"' in text
    assert "rsttrace_tcp_resets_received" not in text and "rsttrace_build_info" not in text
