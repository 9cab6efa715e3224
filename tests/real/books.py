"""The books: every kernel counter of a namespace against the rsttrace kinds that sum to it.

The identities are the README's table ("The books balance"); each real scenario calls
``balance()`` with the namespace's counters and rsttrace's exact counts before and after, so a
scenario written for one counter is checked against all of them. An identity is an equality
where the kernel counts exactly what rsttrace sees, else a pair of bounds whose slack is named
(connection timeouts, allocation failures: things that move the counter without any reset).

With ``RSTTRACE_BOOKS_OUT`` set (the rig sets it to its output directory), each call appends one
JSON line: scenario, kernel, the counters' deltas and rsttrace's sums, for the closing tables.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from rsttrace.kernel import procnet
from tests.real.netlab import Netns

KERNEL = (("Tcp", "OutRsts"), ("Tcp", "EstabResets"), ("Tcp", "AttemptFails"), ("TcpExt", "EmbryonicRsts"),
          ("TcpExt", "ListenOverflows"), ("TcpExt", "ListenDrops"), ("TcpExt", "TCPReqQFullDrop"),
          ("TcpExt", "TCPReqQFullDoCookies"), ("TcpExt", "SyncookiesRecv"), ("TcpExt", "TCPAbortOnData"),
          ("TcpExt", "TCPAbortOnClose"), ("TcpExt", "TCPAbortOnMemory"), ("TcpExt", "TCPAbortOnTimeout"),
          ("TcpExt", "TCPAbortOnLinger"), ("TcpExt", "TCPAbortFailed"))

Key = Tuple[str, Optional[str], Optional[str]]  # (kind, reason, state)


@dataclass
class Snapshot:
    kernel: procnet.Counters
    counts: Dict[Key, int]


def counts_of(tracing: Any, ns: Netns) -> Dict[Key, int]:
    out: Dict[Key, int] = {}
    for k, n in tracing.counts().items():
        if k.netns == ns.inode:
            key = (k.kind, k.reason, k.state)
            out[key] = out.get(key, 0) + n
    return out


def snapshot(tracing: Any, ns: Netns) -> Snapshot:
    # a poll first: a namespace on a recycled inode has the old one's counts retired by it
    tracing.poll_overflows()
    return Snapshot(ns.counters(), counts_of(tracing, ns))


def forget_deleted(tracing: Any) -> None:
    """Let the session see a namespace a test just deleted go, before the next test's namespace
    can take its inode: the kernel hands a freed inode out again at once, and on kernels without
    namespace ids (before 5.12) a namespace that dies and is replaced between two polls is one
    namespace to rsttrace (README, the books), its counts carried into the new one's. One poll
    with it gone retires its counts. (Seen on 5.10: RST to a request socket counted EmbryonicRsts
    4 in the kernel and 1 in rsttrace, 3 traced in the previous test's namespace on that inode.)"""
    tracing.poll_overflows()


def settle_derived(tracing: Any, tries: int = 20) -> None:
    """Poll the counter-derived kinds until two readings agree (what the exit path does)."""
    for _ in range(tries):
        tracing.poll_overflows()
        if tracing.poller is None or tracing.poller.settled:
            tracing.poll_overflows()
            return
        time.sleep(0.1)


def quiet(ns: Netns, every: float = 0.2, at_most: float = 10.0) -> None:
    """Wait until the namespace's own counters stop moving (two readings ``every`` s apart
    agree): packets injected from outside are processed in softirq, which a loaded (emulated)
    CPU can run seconds late; the books are read after the kernel has counted all of them."""
    end = time.monotonic() + at_most
    last = ns.counters()
    while time.monotonic() < end:
        time.sleep(every)
        now = ns.counters()
        if now == last:
            return
        last = now


def balance(tracing: Any, ns: Netns, before: Snapshot, scenario: str, injected_rsts: int = 0,
            after: Optional[Snapshot] = None) -> Dict[str, Any]:
    """Assert every identity for what happened in ``ns`` since ``before``.

    ``injected_rsts``: RSTs that came from outside the namespace's own stack (pktlab), which
    its sockets may receive on top of the ones it sent itself.
    """
    if after is None:
        quiet(ns)
        settle_derived(tracing)
        after = snapshot(tracing, ns)
    k = {name: procnet.get(after.kernel, sec, name) - procnet.get(before.kernel, sec, name) for sec, name in KERNEL}
    d: Dict[Key, int] = {key: after.counts.get(key, 0) - before.counts.get(key, 0)
                         for key in set(after.counts) | set(before.counts)}
    d = {key: n for key, n in d.items() if n}

    def s(kind: str, reasons: Optional[Tuple[str, ...]] = None, states: Optional[Tuple[Optional[str], ...]] = None,
          ) -> int:
        return sum(n for (kd, r, st), n in d.items()
                   if kd == kind and (reasons is None or r in reasons) and (states is None or st in states))

    f = tracing.facts
    sent = s("sent")
    checks: List[Tuple[str, bool, str]] = []

    def eq(name: str, lhs: int, rhs: int, how: str) -> None:
        checks.append((name, lhs == rhs, "%s: kernel %d, rsttrace %d (%s)" % (name, lhs, rhs, how)))

    def within(name: str, lo: int, value: int, hi: int, how: str) -> None:
        checks.append((name, lo <= value <= hi, "%s: %d <= kernel %d <= %d (%s)" % (name, lo, value, hi, how)))

    # OutRsts: every RST the namespace sent. tcp_send_active_reset counts it before allocating,
    # and a failed allocation (TCPAbortFailed) sends and traces nothing.
    within("OutRsts", sent, k["OutRsts"], sent + k["TCPAbortFailed"], "sent [+ TCPAbortFailed]")
    # Every RST a socket here accepted was sent by this namespace's stack or injected from outside:
    # a reset the local kernel decided is never `received`.
    recv_est = s("received", states=("TCP_ESTABLISHED", "TCP_CLOSE_WAIT"))
    within("received <= OutRsts + injected", 0, s("received"), k["OutRsts"] + injected_rsts,
           "no received reset without a sender")
    # EstabResets: ESTABLISHED/CLOSE_WAIT -> CLOSE (tcp_set_state): a RST accepted there, an active
    # reset from there (state CLOSE when sent), or a timeout.
    active = s("sent", states=("TCP_CLOSE",))
    within("EstabResets", recv_est, k["EstabResets"], recv_est + active + k["TCPAbortOnTimeout"],
           "received{EST,CLOSE_WAIT} [+ active resets + timeouts]")
    # AttemptFails: tcp_done() in SYN_SENT/SYN_RECV, and tcp_check_req() for RST/SYN on a request.
    recv_syn = s("received", states=("TCP_SYN_SENT", "TCP_SYN_RECV"))
    invalid_syn = s("sent", reasons=("INVALID_SYN",))
    within("AttemptFails", recv_syn, k["AttemptFails"], recv_syn + invalid_syn + k["TCPAbortOnTimeout"],
           "received{SYN_SENT,SYN_RECV} [+ INVALID_SYN resets + timeouts]")
    # EmbryonicRsts: tcp_check_req's embryonic_reset: a RST that hit a request socket (received,
    # TCP_SYN_RECV) or a reset sent for a request (INVALID_SYN; before 6.10, a listener's passive
    # reset, which rsttrace infers as INVALID_SYN).
    eq("EmbryonicRsts", k["EmbryonicRsts"], s("received", states=("TCP_SYN_RECV",)) + invalid_syn,
       "received{SYN_RECV} + sent{INVALID_SYN}")
    overflows = s("listen_overflow_syn") + s("listen_overflow_ack")
    eq("ListenOverflows", k["ListenOverflows"], overflows, "listen_overflow_syn + listen_overflow_ack")
    qdrop = s("syn_queue_overflow", reasons=("TCPReqQFullDrop",))
    eq("TCPReqQFullDrop", k["TCPReqQFullDrop"], qdrop, "syn_queue_overflow{TCPReqQFullDrop}")
    eq("TCPReqQFullDoCookies", k["TCPReqQFullDoCookies"], s("syn_queue_overflow", reasons=("TCPReqQFullDoCookies",)),
       "syn_queue_overflow{TCPReqQFullDoCookies}")
    eq("ListenDrops", k["ListenDrops"], overflows + qdrop + s("listen_drop"),
       "listen_overflow_* + syn_queue_overflow{TCPReqQFullDrop} + listen_drop")
    on_data = s("sent", reasons=("TCP_ABORT_ON_DATA",))
    # TCPAbortOnData: a local abort on data (TCP_ABORT_ON_DATA), and every SO_LINGER 0 close
    # (tcp_close), which sends a RST (TCP_STATE) only where tcp_need_reset() says so: a SYN_SENT
    # client closed that way counts here and sends nothing. So a lower bound only.
    within("TCPAbortOnData", on_data, k["TCPAbortOnData"], max(k["TCPAbortOnData"], on_data),
           "sent{TCP_ABORT_ON_DATA} [+ SO_LINGER 0 closes, with or without a RST]")
    on_close = s("sent", reasons=("TCP_ABORT_ON_CLOSE",))
    if f.send_has_reason:
        within("TCPAbortOnClose", on_close, k["TCPAbortOnClose"], on_close + s("sent", reasons=("NOT_SPECIFIED",)),
               "sent{TCP_ABORT_ON_CLOSE} (6.10/6.11 pass NOT_SPECIFIED)")
    else:
        within("TCPAbortOnClose", 0, k["TCPAbortOnClose"], on_close, "sent{TCP_ABORT_ON_CLOSE, inferred}")
    for counter, reason in (("TCPAbortOnMemory", "TCP_ABORT_ON_MEMORY"), ("TCPAbortOnLinger", "TCP_ABORT_ON_LINGER")):
        within(counter, s("sent", reasons=(reason,)), k[counter], k[counter], "sent{%s} at most" % reason)

    row = {"scenario": scenario, "kernel": platform.release(), "kernel_counters": {n: v for n, v in k.items() if v},
           "rsttrace": {"%s/%s%s" % (kd, r, "/" + st if st and kd == "received" else ""): n
                        for (kd, r, st), n in sorted(d.items(), key=str)},
           "failed": [msg for _n, ok, msg in checks if not ok]}
    out = os.environ.get("RSTTRACE_BOOKS_OUT")
    if out:
        with open(os.path.join(out, "books.jsonl"), "a") as fh:
            fh.write(json.dumps(row) + "\n")
    assert not row["failed"], "the books do not balance in %s:\n  %s\n(rsttrace: %s)" % (
        scenario, "\n  ".join(row["failed"]), row["rsttrace"])
    return row
