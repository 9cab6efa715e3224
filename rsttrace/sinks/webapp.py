"""What the exporter's HTTP server answers: ``/metrics`` (one shared collection per burst of
identical scrapes), ``/healthz``, and 503 "starting" until the tracer is attached."""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from rsttrace.sinks.httpserve import WSGIApp, log_once


class StartingApp:
    """The WSGI app: 503 until :meth:`ready` gives it the registry and the health check."""

    def __init__(self) -> None:
        self.app: Optional[WSGIApp] = None

    def ready(self, registry: Any, healthy: Callable[[], bool]) -> None:
        self.app = exporter_app(registry, healthy)

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        app = self.app
        if app is not None:
            return app(environ, start_response)
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"starting\n"]


Answer = Tuple[str, List[Tuple[str, str]], bytes]


class Coalescer:
    """Concurrent scrapes share one collection that began after each of them arrived.

    A burst of scrapers (a fleet, or the 200 at once of the resilience test) costs a few
    collections instead of one each: the collector reads every BPF counter and /proc file under
    its own lock anyway, so they would only queue, and the CPU they would take is the tracer's.
    Freshness is as without it: a scrape never gets an answer collected before it arrived.
    Only identical requests (query, Accept, Accept-Encoding) share an answer."""

    def __init__(self, produce: Callable[[Dict[str, Any]], Answer]) -> None:
        self.produce = produce
        self.cond = threading.Condition()
        self.started: Dict[Tuple[str, ...], int] = {}  # collections begun, per request kind
        self.running: Set[Tuple[str, ...]] = set()
        self.done: Dict[Tuple[str, ...], Tuple[int, Optional[Answer], Optional[BaseException]]] = {}

    def __call__(self, environ: Dict[str, Any]) -> Answer:
        key = tuple(str(environ.get(k, "")) for k in ("QUERY_STRING", "HTTP_ACCEPT", "HTTP_ACCEPT_ENCODING"))
        with self.cond:
            # needed: a collection that starts from now on (one running began too early)
            need = self.started.get(key, 0) + 1
            while True:
                gen, answer, error = self.done.get(key, (0, None, None))
                if gen >= need:
                    if error is not None:
                        raise error
                    assert answer is not None
                    return answer
                if key not in self.running:
                    break
                self.cond.wait()
            if len(self.started) > 32:  # distinct queries are not a way to grow this without bound
                for k in [k for k in self.started if k not in self.running and k != key]:
                    self.started.pop(k, None)
                    self.done.pop(k, None)
            self.running.add(key)
            gen = self.started[key] = self.started.get(key, 0) + 1
        answer, error = None, None
        try:
            answer = self.produce(environ)
        except Exception as e:
            error = e
        with self.cond:
            self.running.discard(key)
            self.done[key] = (gen, answer, error)
            self.cond.notify_all()
        if error is not None:
            raise error
        assert answer is not None
        return answer


def exporter_app(registry: Any, healthy: Callable[[], bool]) -> WSGIApp:
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def produce(environ: Dict[str, Any]) -> Answer:
        got: List[Any] = []

        def keep(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            got[:] = [status, headers]
            return lambda _b: None

        body = b"".join(metrics(environ, keep))
        return got[0], got[1], body

    shared = Coalescer(produce)

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            ok = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not tracing\n"]
        if path in ("/metrics", "/"):
            try:
                status, headers, body = shared(environ)
            except Exception as e:  # e.g. EMFILE reading /proc: one line, a 503, no traceback
                log_once("scrape", "warning", "scrape failed", error="%s: %s" % (type(e).__name__, e))
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
                return [b"scrape failed, see the exporter's log\n"]
            start_response(status, list(headers))
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"see /metrics and /healthz\n"]

    return app
