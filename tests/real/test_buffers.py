"""Both event transports, and the accounting that says every lost event was counted.

The ring buffer is used where the kernel has one (5.8+), the perf buffer elsewhere; this
machine has both, so the perf path is forced here to prove it. Small buffers and a storm make
events drop on purpose: delivered + lost must equal what the kernel counted.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, List

import pytest

from rsttrace.kernel.read import gather
from tests.real.netlab import Netns, closed_port, connect_refused, delta, wait_for


def run_session(ns: Netns, force_perf: bool, pages: int, resets: int, slow: bool) -> Any:
    from rsttrace.capture.tracer import TraceOptions
    from rsttrace.kernel import tracefs
    from rsttrace.pipeline.session import Session

    root, _ = tracefs.ensure_tracefs()
    facts = gather(root)
    got: List[Any] = []
    stop = threading.Event()

    def sink(ev: Any) -> None:
        got.append(ev)
        if slow:
            stop.wait(0.002)  # a consumer slower than the storm: the buffer must overflow

    opts = TraceOptions(force_perf=force_perf, ring_pages=pages, netns=ns.inode)
    s = Session(facts, opts, sink=sink, poll_overflows=False)
    s.start()
    th = threading.Thread(target=s.run, args=(stop,))
    th.start()
    try:
        before = ns.counters()
        with ns.inside():
            connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), resets)
        sent = delta(before, ns.counters(), "Tcp", "OutRsts")
        counted = {k: n for k, n in s.counts().items() if k.netns == ns.inode}
        wait_for(lambda: len(got) + s.lost()["lost_kernel"] + s.lost()["lost_user"] >= 2 * sent, timeout=20)
    finally:
        stop.set()
        th.join()
    lost = s.lost()
    s.close()
    return s.tracer.ringbuf, sent, counted, len(got), lost


@pytest.mark.parametrize("force_perf", [False, True], ids=["ringbuf", "perf"])
def test_events_arrive_through_each_transport(ns: Netns, force_perf: bool) -> None:
    ring, sent, counted, delivered, lost = run_session(ns, force_perf, pages=64, resets=20, slow=False)
    assert ring is (not force_perf)
    assert sent == 20
    assert delivered == 40 and lost["lost_kernel"] == lost["lost_user"] == 0


@pytest.mark.parametrize("force_perf", [False, True], ids=["ringbuf", "perf"])
def test_every_lost_event_is_counted(ns: Netns, force_perf: bool) -> None:
    ring, sent, counted, delivered, lost = run_session(ns, force_perf, pages=1, resets=3000, slow=True)
    assert sent == 3000
    # the counters are exact whatever the event stream did
    assert sum(n for k, n in counted.items() if k.kind == "sent") == sent
    assert sum(n for k, n in counted.items() if k.kind == "received") == sent
    dropped = lost["lost_kernel"] + lost["lost_user"]
    assert dropped > 0, "the storm should have overflowed a one-page buffer"
    assert delivered + dropped == 2 * sent
