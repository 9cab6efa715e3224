"""Real resets in private namespaces, traced, and checked against that namespace's own counters.

Each test makes resets the way users meet them (closed port, abort on close, linger 0, full
accept queue, TIME_WAIT) and asserts what a user would check: the kind, the kernel's reason
name, the state, both endpoints, the namespace, the owner process where there is one, and that
rsttrace counted exactly what the kernel counted (Tcp OutRsts, TcpExt ListenOverflows, ...).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Dict, List, Tuple

import pytest

from tests.real.books import balance, snapshot
from tests.real.netlab import (
    Netns,
    closed_port,
    connect_refused,
    delta,
    linger0,
    now_ns,
    overflow_accept_queue,
    overflow_on_ack,
    pair,
    wait_for,
)

Ev = Dict[str, Any]


def evs(tracing: Any, ns: Netns, start: int, kind: str) -> List[Ev]:
    return [e for e in tracing.recorder.since(start, ns.inode) if e["kind"] == kind]


def map_counts(tracing: Any, ns: Netns) -> Dict[Tuple[str, Any], int]:
    """The exact BPF-map counters of one namespace, by (kind, reason)."""
    out: Dict[Tuple[str, Any], int] = {}
    for k, n in tracing.counts().items():
        if k.netns == ns.inode:
            out[(k.kind, k.reason)] = out.get((k.kind, k.reason), 0) + n
    return out


def counted(before: Dict[Tuple[str, Any], int], after: Dict[Tuple[str, Any], int], kind: str) -> int:
    return sum(n for (k, _r), n in after.items() if k == kind) - sum(n for (k, _r), n in before.items() if k == kind)


def my_comm() -> str:
    with open("/proc/self/comm") as f:
        return f.read().strip()


FAMILIES = [
    pytest.param(socket.AF_INET, "127.0.0.1", "ipv4", id="ipv4"),
    pytest.param(socket.AF_INET6, "::1", "ipv6", id="ipv6"),
]


@pytest.mark.parametrize("family,addr,fname", FAMILIES)
def test_connect_to_closed_port(tracing: Any, ns: Netns, family: int, addr: str, fname: str) -> None:
    n = 5
    books = snapshot(tracing, ns)
    before, mc0, start = ns.counters(), map_counts(tracing, ns), now_ns()
    with ns.inside():
        port = closed_port(family, addr)
        cookies: Dict[int, int] = {}
        clients = connect_refused(family, addr, port, n, cookies)
    assert wait_for(lambda: len(evs(tracing, ns, start, "sent")) >= n and len(evs(tracing, ns, start, "received")) >= n)
    after, mc1 = ns.counters(), map_counts(tracing, ns)

    sent = evs(tracing, ns, start, "sent")
    assert len(sent) == n == delta(before, after, "Tcp", "OutRsts") == counted(mc0, mc1, "sent")
    for e in sent:
        assert e["reason"] == "NO_SOCKET"
        if tracing.facts.send_has_reason:
            assert (e["reason_source"], e["reason_raw"], e["source"]) == ("kernel", _raw(tracing, "NO_SOCKET"),
                                                                         "tracepoint")
        else:  # before 6.10 the tracepoint misses no-socket resets: the kprobe has them
            assert (e["reason_source"], e["reason_raw"], e["source"]) == ("inferred", None, "kprobe")
        assert e["state"] is None  # no socket: the kernel passes state 0
        assert (e["family"], e["laddr"], e["lport"], e["raddr"]) == (fname, addr, port, addr)
        assert e["pid"] is None and e["comm"] is None  # softirq: no bystander attribution
    assert sorted(e["rport"] for e in sent) == sorted(clients)

    received = evs(tracing, ns, start, "received")
    assert len(received) == n
    for e in received:
        assert (e["state"], e["reason"], e["reason_source"]) == ("TCP_SYN_SENT", "ECONNREFUSED", "inferred")
        assert (e["laddr"], e["raddr"], e["rport"]) == (addr, addr, port)
        assert e["cookie"] == cookies[e["lport"]]  # the cookie the application sees (SO_COOKIE)
    assert sorted(e["lport"] for e in received) == sorted(clients)
    balance(tracing, ns, books, "closed port " + fname)


def _raw(tracing: Any, name: str) -> int:
    return next(raw for raw, n in tracing.facts.rst_reasons.items() if n == name)


def test_close_with_unread_data(tracing: Any, ns: Netns) -> None:
    books = snapshot(tracing, ns)
    before, start = ns.counters(), now_ns()
    with ns.inside():
        srv, cl, acc = pair()
        cl.sendall(b"unread")
        wait_for(lambda: _readable(acc))
        server_port, client_port = acc.getsockname()[1], cl.getsockname()[1]
        acc.close()  # data never read: the kernel aborts with a RST
    assert wait_for(lambda: len(evs(tracing, ns, start, "sent")) >= 1 and len(evs(tracing, ns, start, "received")) >= 1)
    after = ns.counters()
    sent = evs(tracing, ns, start, "sent")
    assert len(sent) == 1 == delta(before, after, "Tcp", "OutRsts")
    assert delta(before, after, "TcpExt", "TCPAbortOnClose") == 1
    e = sent[0]
    assert e["reason"] == "TCP_ABORT_ON_CLOSE"
    assert (e["lport"], e["rport"]) == (server_port, client_port)
    # close() runs in our process holding the socket lock: the owner is known
    assert e["pid"] == os.getpid() and e["comm"] == my_comm()
    r = evs(tracing, ns, start, "received")[0]
    assert (r["state"], r["reason"]) == ("TCP_ESTABLISHED", "ECONNRESET")
    assert (r["lport"], r["rport"]) == (client_port, server_port)
    balance(tracing, ns, books, "close() with unread data")
    srv.close()
    cl.close()


def _readable(s: socket.socket) -> bool:
    import select

    return bool(select.select([s], [], [], 0)[0])


@pytest.mark.parametrize("linger_secs,expect_rst", [(0, True), (1, False)], ids=["linger0", "linger1"])
def test_close_with_so_linger(tracing: Any, ns: Netns, linger_secs: int, expect_rst: bool) -> None:
    books = snapshot(tracing, ns)
    before, start = ns.counters(), now_ns()
    with ns.inside():
        srv, cl, acc = pair()
        if linger_secs == 0:
            linger0(acc)
        else:
            import struct

            acc.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, linger_secs))
        acc.close()
    if expect_rst:
        assert wait_for(lambda: len(evs(tracing, ns, start, "sent")) >= 1)
    else:
        time.sleep(0.5)
    after = ns.counters()
    sent = evs(tracing, ns, start, "sent")
    assert len(sent) == delta(before, after, "Tcp", "OutRsts") == (1 if expect_rst else 0)
    if expect_rst:
        # SO_LINGER 0: tcp_close -> tcp_disconnect; counted as TCPAbortOnData by the kernel
        assert delta(before, after, "TcpExt", "TCPAbortOnData") == 1
        if tracing.facts.send_has_reason:
            assert sent[0]["reason"] == "TCP_STATE"  # the reason tcp_disconnect passes
        else:
            assert (sent[0]["reason"], sent[0]["reason_source"]) == ("TCP_ABORT_ON_CLOSE", "inferred")
        assert sent[0]["pid"] == os.getpid()
    balance(tracing, ns, books, "SO_LINGER {1,%d}" % linger_secs)
    srv.close()
    cl.close()


def test_rst_received_by_established_connection(tracing: Any, ns: Netns) -> None:
    books = snapshot(tracing, ns)
    before, start = ns.counters(), now_ns()
    with ns.inside():
        srv, cl, acc = pair(socket.AF_INET6, "::1")
        linger0(acc)
        acc.close()
        client_port = cl.getsockname()[1]
    assert wait_for(lambda: len(evs(tracing, ns, start, "received")) >= 1)
    after = ns.counters()
    r = evs(tracing, ns, start, "received")
    assert len(r) == 1
    assert delta(before, after, "Tcp", "EstabResets") >= 1
    e = r[0]
    assert (e["state"], e["reason"], e["family"], e["lport"]) == ("TCP_ESTABLISHED", "ECONNRESET", "ipv6", client_port)
    assert e["pid"] is None  # delivered in softirq, not by the owner
    with pytest.raises(ConnectionResetError):
        cl.recv(1)
    balance(tracing, ns, books, "RST to an established connection (IPv6)")
    srv.close()
    cl.close()


def time_wait(port: int) -> bool:
    """Whether this thread's namespace has a TIME_WAIT mini-socket on local port ``port``: in
    /proc/net/tcp its timer is 3 (the time-wait timer) and its state the substate it came from
    (FIN_WAIT2 05 for an orphan, TIME_WAIT 06) (net/ipv4/tcp_ipv4.c, get_timewait4_sock)."""
    with open("/proc/thread-self/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in ("05", "06")
                    and fields[5].startswith("03:")):
                return True
    return False


def test_data_to_time_wait_socket(tracing: Any, ns: Netns) -> None:
    """An orphaned FIN_WAIT2 socket becomes a TIME_WAIT mini-socket; new data to it is reset
    (tcp_timewait_state_process -> TCP_TW_RST). Before 6.10 the tracepoint cannot see it."""
    if not tracing.facts.send_has_reason and not tracing.facts.kp_send_reset:
        pytest.skip("before 6.10 tcp_send_reset does not fire for TIME_WAIT sockets, and this kernel has no "
                    "kprobes to see them")
    books = snapshot(tracing, ns)
    before, start = ns.counters(), now_ns()
    with ns.inside():
        srv, cl, acc = pair()
        client_port = cl.getsockname()[1]
        cl.close()  # FIN; the peer ACKs; the orphan turns into a TIME_WAIT socket
        # only once that ACK is processed: before it the orphan is in FIN_WAIT1 and the data is
        # a local abort (TCP_ABORT_ON_DATA, state CLOSE), as a slow emulated CPU showed (rig 7.2)
        assert wait_for(lambda: time_wait(client_port), timeout=10), "the client never reached TIME_WAIT"
        acc.send(b"late data")
    assert wait_for(lambda: len(evs(tracing, ns, start, "sent")) >= 1 and len(evs(tracing, ns, start, "received")) >= 1)
    after = ns.counters()
    sent = evs(tracing, ns, start, "sent")
    assert len(sent) == 1 == delta(before, after, "Tcp", "OutRsts")
    assert (sent[0]["reason"], sent[0]["state"]) == ("TCP_TIMEWAIT_SOCKET", "TCP_TIME_WAIT")
    assert sent[0]["lport"] == client_port
    assert sent[0]["pid"] is None
    r = evs(tracing, ns, start, "received")[0]
    assert (r["state"], r["reason"]) == ("TCP_CLOSE_WAIT", "EPIPE")
    balance(tracing, ns, books, "data to a TIME_WAIT socket")
    srv.close()
    acc.close()


def _settle(ns: Netns, socks: List[socket.socket]) -> Tuple[Any, int]:
    """Close the scenario's sockets and wait until the namespace is quiet: closing exchanges
    last segments (and resets) of its own, later on a slow machine. Returns the counters then
    and the time they were read, to compare with the events up to that time."""
    with ns.inside():
        for i, s in enumerate(socks):
            if i:  # clients (socks[0] is the listener): a RST, not a FIN the kernel would keep
                linger0(s)  # retransmitting with backoff, each try overflowing the queue again
            s.close()
    prev = ns.counters()
    for _ in range(30):
        time.sleep(0.3)
        cur = ns.counters()
        if cur == prev:
            break
        prev = cur
    end = now_ns()
    time.sleep(0.3)  # let events sent up to `end` arrive
    return prev, end


def _overflow_total(tracing: Any, ns: Netns, start: int) -> int:
    for _ in range(2):  # derived overflows are emitted once two readings agree
        tracing.poll_overflows()
    return sum(e["count"] for e in tracing.recorder.since(start, ns.inode) if e["kind"].startswith("listen_overflow"))


def test_accept_queue_overflow_on_syn(tracing: Any, ns: Netns) -> None:
    books = snapshot(tracing, ns)
    before, start = ns.counters(), now_ns()
    with ns.inside():
        port, socks = overflow_accept_queue("127.0.0.1", clients=6, backlog=1)
        time.sleep(1.5)  # the first SYNs are dropped and retransmitted once
    assert wait_for(lambda: len(evs(tracing, ns, start, "listen_overflow_syn")) >= 1)
    after, _end = _settle(ns, socks)
    expected = delta(before, after, "TcpExt", "ListenOverflows")
    assert expected > 0
    assert _overflow_total(tracing, ns, start) == expected
    syn = evs(tracing, ns, start, "listen_overflow_syn")
    assert all(e["reason"] == "ListenOverflows" for e in syn)
    # a kprobe on tcp_conn_request where the kernel has kprobes, else the counters
    assert {e["source"] for e in syn} == ({"kprobe"} if tracing.facts.kp_conn_request else {"counters"})
    # the listener was full at poll time: it is named, with its queue
    assert syn[0]["lport"] == port and syn[0]["laddr"] == "127.0.0.1"
    assert syn[0]["backlog"] > syn[0]["max_backlog"] == 1
    balance(tracing, ns, books, "accept queue full on SYN")


@pytest.mark.parametrize("abort_on_overflow", [0, 1])
def test_accept_queue_overflow_on_final_ack(tracing: Any, ns: Netns, abort_on_overflow: int) -> None:
    ns.sysctl("net.ipv4.tcp_abort_on_overflow", str(abort_on_overflow))
    books = snapshot(tracing, ns)
    before, start = ns.counters(), now_ns()
    with ns.inside():
        port, socks = overflow_on_ack("127.0.0.1", clients=5, backlog=1)
        clients = {s.getsockname()[1] for s in socks[1:]}
        time.sleep(0.5)
    after, end = _settle(ns, socks)
    overflows = delta(before, after, "TcpExt", "ListenOverflows")
    assert overflows >= 3  # five ACKs, room for two
    assert _overflow_total(tracing, ns, start) == overflows
    if tracing.facts.listen_overflow_reason is not None or tracing.facts.kp_syn_recv:
        acks = evs(tracing, ns, start, "listen_overflow_ack")
        assert acks, "kfree_skb TCP_LISTEN_OVERFLOW or the syn_recv_sock kprobe should see each dropped final ACK"
        for e in acks:
            if tracing.facts.listen_overflow_reason is not None:
                assert (e["reason"], e["reason_source"], e["source"]) == ("TCP_LISTEN_OVERFLOW", "kernel", "tracepoint")
            else:
                assert (e["reason"], e["reason_source"], e["source"]) == ("ListenOverflows", "inferred", "kprobe")
            assert e["state"] == "TCP_LISTEN"
            assert (e["laddr"], e["lport"], e["raddr"]) == ("127.0.0.1", port, "127.0.0.1")
            assert e["rport"] in clients  # the real peer, from the packet
            assert e["max_backlog"] == 1 and e["backlog"] >= 1
    sent = [e for e in evs(tracing, ns, start, "sent") if e["ktime_ns"] <= end]
    assert len(sent) == delta(before, after, "Tcp", "OutRsts")
    if abort_on_overflow:
        listener_resets = [e for e in sent if e["state"] == "TCP_LISTEN"]
        assert len(listener_resets) >= 1
        for e in listener_resets:
            if tracing.facts.send_has_reason:
                assert e["reason"] == "INVALID_SYN"
            # the kernel passes the listener; rsttrace reports the peer from the packet
            assert e["rport"] in clients and e["lport"] == port and e["peer_from_packet"] is True
    balance(tracing, ns, books, "accept queue full on final ACK, abort_on_overflow=%d" % abort_on_overflow)


@pytest.mark.parametrize("syncookies,counter", [(0, "TCPReqQFullDrop"), (1, "TCPReqQFullDoCookies")])
def test_syn_queue_overflow(tracing: Any, ns: Netns, syncookies: int, counter: str) -> None:
    """TCP_DEFER_ACCEPT keeps handshakes in the SYN queue; with backlog 1 the third SYN finds it
    full: dropped without syncookies, answered with a cookie with them (tcp_syn_flood_action)."""
    ns.sysctl("net.ipv4.tcp_syncookies", str(syncookies))
    books = snapshot(tracing, ns)
    before, start = ns.counters(), now_ns()
    with ns.inside():
        srv = socket.socket()
        srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        socks = [srv]
        for _ in range(5):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(srv.getsockname())
            except BlockingIOError:
                pass
            socks.append(c)
        time.sleep(0.3)
    after, _end = _settle(ns, socks)
    expected = delta(before, after, "TcpExt", counter)
    assert expected >= 1
    tracing.poll_overflows()
    got = [e for e in evs(tracing, ns, start, "syn_queue_overflow") if e["reason"] == counter]
    assert sum(e["count"] for e in got) == expected, (got, before, after)
    assert all(e["source"] == "counters" for e in got)
    balance(tracing, ns, books, "SYN queue full (DEFER_ACCEPT), syncookies=%d" % syncookies)
