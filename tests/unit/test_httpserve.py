"""rsttrace.sinks.httpserve without a kernel: limits, descriptor starvation, the early bind, health."""

from __future__ import annotations

import errno
import io
import json
import resource
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from rsttrace import cli, log
from rsttrace.sinks.httpserve import HttpServer, connection_limit
from rsttrace.sinks.webapp import StartingApp


@pytest.mark.parametrize(("nofile", "want"), [(256, 64), (1024, 100), (1 << 20, 100), (16, 8),
                                              (resource.RLIM_INFINITY, 100)])
def test_connection_limit_is_a_quarter_of_the_fd_limit(nofile: int, want: int) -> None:
    assert connection_limit(nofile) == want


@pytest.fixture()
def logged() -> Iterator[Callable[[], List[Dict[str, Any]]]]:
    """The JSON log lines written so far."""
    buf = io.StringIO()
    log.configure("info", "json", stream=buf)
    yield lambda: [json.loads(ln) for ln in buf.getvalue().splitlines()]
    log.configure("info", "json")


def get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
            return "%d %s" % (r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return "%d %s" % (e.code, e.read().decode())


def test_starting_then_ready_then_unhealthy() -> None:
    from prometheus_client import CollectorRegistry

    h = HttpServer("127.0.0.1", 0)
    app = StartingApp()
    h.start(app)
    try:
        assert get(h.port, "/healthz") == "503 starting\n"  # bound before bcc's compile
        healthy = [True]
        app.ready(CollectorRegistry(), lambda: healthy[0])
        assert get(h.port, "/healthz") == "200 ok\n"
        healthy[0] = False
        assert get(h.port, "/healthz") == "503 not tracing\n"
        assert get(h.port, "/nope").startswith("404 ")
    finally:
        h.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", h.port), timeout=2).close()


def test_out_of_descriptors_on_accept_is_one_line_and_a_pause(logged: Callable[[], List[Dict[str, Any]]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    h = HttpServer("127.0.0.1", 0)
    h.start(lambda env, sr: [])
    try:
        srv = h.server
        assert srv is not None

        def starved() -> None:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(srv, "accept", starved)
        for _ in range(50):
            srv.handle_accept()
        assert not srv.readable()  # paused: no busy loop on a listening socket that stays readable
        lines = [ln for ln in logged() if "cannot accept" in ln["event"]]
        assert len(lines) == 1 and lines[0]["error"] == "Too many open files" and lines[0]["level"] == "warning"
        srv.paused_until = time.monotonic()  # the second passes
        assert srv.readable()
    finally:
        h.close()


def test_a_taken_port_is_one_line_and_exit_2_before_anything_else(capsys: pytest.CaptureFixture[str]) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(["export", "--listen", "127.0.0.1:%d" % port])  # no root needed to get this far
    finally:
        taken.close()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "rsttrace: error: cannot listen on 127.0.0.1:%d: Address already in use\n" % port


def test_concurrent_scrapes_share_collections_begun_after_they_arrived() -> None:
    import threading

    from rsttrace.sinks.webapp import Coalescer

    began: List[float] = []
    gate = threading.Event()

    def produce(environ: Dict[str, Any]) -> Tuple[str, List[Tuple[str, str]], bytes]:
        began.append(time.monotonic())
        gate.wait(5)
        return "200 OK", [], str(len(began)).encode()

    shared = Coalescer(produce)
    answers: Dict[int, bytes] = {}
    arrived: Dict[int, float] = {}

    def scrape(i: int) -> None:
        arrived[i] = time.monotonic()
        answers[i] = shared({"QUERY_STRING": ""})[2]

    first = threading.Thread(target=scrape, args=(0,))
    first.start()
    while not began:
        time.sleep(0.01)
    rest = [threading.Thread(target=scrape, args=(i,)) for i in range(1, 50)]
    for t in rest:
        t.start()
    time.sleep(0.2)  # all 49 wait: the running collection began before they arrived
    gate.set()
    for t in [first, *rest]:
        t.join(10)
    assert answers[0] == b"1" and {answers[i] for i in range(1, 50)} == {b"2"}
    assert len(began) == 2  # 50 scrapes, 2 collections
    assert all(began[1] >= arrived[i] for i in range(1, 50))  # none got older data than it asked for
    # a different request is not served another's answer
    assert shared({"QUERY_STRING": "name[]=x"})[2] == b"3"
