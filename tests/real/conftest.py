"""One tracing session for all real-kernel scenarios (compiling once keeps the tier fast)."""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List

import pytest

from rsttrace.kernel.read import gather
from rsttrace.pipeline.events import Event
from tests.real.books import forget_deleted
from tests.real.netlab import Netns
from tests.real.realkernel import require_real_kernel


class Recorder:
    """Collects events from the session's thread; tests read them by netns and time."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, ev: Event) -> None:
        with self.lock:
            self.events.append(ev.to_dict())

    def since(self, start_ns: int, netns: int) -> List[Dict[str, Any]]:
        # Filter by time as well as netns: the kernel reuses a deleted namespace's inode number.
        with self.lock:
            return [e for e in self.events if e["netns"] == netns and e["ktime_ns"] >= start_ns]


@pytest.fixture(scope="session", params=["raw", "perf"])
def tracing(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A session tracing everything; every test runs once with raw tracepoints (the default)
    and once with perf tracepoints (the fallback where a kernel's BTF lacks prototypes)."""
    require_real_kernel()
    from rsttrace.capture.tracer import TraceOptions
    from rsttrace.kernel import tracefs
    from rsttrace.pipeline.session import Session

    root, _ = tracefs.ensure_tracefs()
    facts = gather(root)
    rec = Recorder()
    session = Session(facts, TraceOptions(raw_tracepoints=request.param == "raw"), sink=rec,
                      overflow_interval=0.5)
    session.start()
    stop = threading.Event()
    th = threading.Thread(target=session.run, args=(stop,), daemon=True)
    th.start()
    session.recorder = rec  # type: ignore[attr-defined]
    try:
        yield session
    finally:
        stop.set()
        th.join(timeout=5)
        session.close()


@pytest.fixture()
def ns(request: pytest.FixtureRequest) -> Iterator[Netns]:
    require_real_kernel()
    n = Netns()
    if "tracing" in request.fixturenames:
        # The kernel may have given this namespace the inode of one a test just deleted: one poll
        # finds that out and retires the old one's counts before the scenario starts.
        request.getfixturevalue("tracing").poll_overflows()
    try:
        yield n
    finally:
        n.delete()
        if "tracing" in request.fixturenames:
            forget_deleted(request.getfixturevalue("tracing"))


