"""What happened in the last second before exit is still reported (issue 10, item 8).

Counter-derived overflows are emitted once two readings agree, so a tracer stopped right after an
overflow used to exit without it, while its exit line said nothing was lost. `trace` and
`summary` read the counters until two readings agree at exit.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
from typing import List, Tuple

from tests.real.netlab import Netns, delta, overflow_accept_queue
from tests.real.test_cli import run_rsttrace


def _overflow_then_quiet(ns: Netns) -> Tuple[int, List[socket.socket]]:
    """SYN-side accept-queue overflows, then every client reset so no SYN is retried: returns
    the namespace's ListenOverflows for them."""
    before = ns.counters()
    with ns.inside():
        _port, socks = overflow_accept_queue("127.0.0.1", clients=6, backlog=1)
        time.sleep(0.2)
        for s in socks[1:]:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    time.sleep(0.1)
    n = delta(before, ns.counters(), "TcpExt", "ListenOverflows")
    assert n >= 3
    return n, socks[:1]


def test_trace_reports_the_last_seconds_overflows(ns: Netns) -> None:
    # SIGTERM well before the next 5 s poll
    rc, out, err, (expected, keep) = run_rsttrace(
        ("trace", "--json", "--netns", str(ns.inode), "--overflow-interval", "5"),
        lambda _proc: _overflow_then_quiet(ns), stop=signal.SIGTERM)
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    got = sum(e["count"] for e in events if e["kind"].startswith("listen_overflow"))
    assert got == expected, (events, err[-2000:])
    keep[0].close()


def test_summary_last_interval_has_them(ns: Netns) -> None:
    rc, out, err, (expected, keep) = run_rsttrace(
        ("summary", "--json", "--interval", "60", "--netns", str(ns.inode)),
        lambda _proc: _overflow_then_quiet(ns), stop=signal.SIGINT)
    assert rc == 0, err
    last = json.loads(out.splitlines()[-1])
    got = sum(r["total"] for r in last["rows"] if r["kind"].startswith("listen_overflow"))
    assert got == expected, (last, err[-2000:])
    keep[0].close()
