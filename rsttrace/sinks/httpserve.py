"""The exporter's HTTP side: ``/metrics`` and ``/healthz`` on a bounded server.

Why waitress (PyPI, pure Python, no dependencies, Python 3.9+) and not cheroot: waitress reads
requests in one asynchronous I/O thread and hands only *complete* requests to a fixed pool of
worker threads, so a slow or idle client costs a socket and a small buffer, never a thread.
cheroot reads each request in a worker thread (a socket timeout per ``recv``), so a client that
trickles a byte now and then holds a worker. Around waitress this module adds what an exporter
reachable by a whole pod network needs, all in the I/O thread:

- a connection limit derived from ``RLIMIT_NOFILE`` (at most a quarter of it, at most 100), so
  HTTP clients can never take the file descriptors the tracer and the overflow poller need: if
  descriptors run out, scrapes fail first and counting goes on;
- at the limit, the idlest connections are closed to admit new ones (those with nothing to
  read first, oldest first, then requests still being received after a second), so idle or
  slow clients cannot lock scrapers out as waitress's own "stop accepting at the limit" would;
- an idle timeout (``IDLE_TIMEOUT``) and a deadline for receiving a whole request, headers and
  body (``REQUEST_TIMEOUT``), however slowly its bytes trickle in;
- ``EMFILE``/``ENFILE`` (and ``ENOBUFS``/``ENOMEM``) on ``accept()`` logged as one line, then
  accepting pauses for a second instead of spinning; nothing the server meets logs a traceback,
  and an exception in the I/O loop restarts the loop;
- concurrent identical scrapes share one collection begun after they all arrived
  (:class:`rsttrace.sinks.webapp.Coalescer`), so a burst of scrapers costs a few collections;
- the listening socket bound by :func:`bind` before anything else starts (the CLI binds before
  bcc's compile), with a backlog of ``BACKLOG`` for a fleet's scrapers, IPv6 in brackets (dual
  stack as the system's ``bindv6only`` says, as before: waitress alone would force v6-only).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import resource
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from waitress import wasyncore  # type: ignore[import-untyped]
from waitress.adjustments import Adjustments  # type: ignore[import-untyped]
from waitress.channel import HTTPChannel  # type: ignore[import-untyped]
from waitress.server import TcpWSGIServer  # type: ignore[import-untyped]
from waitress.task import ThreadedTaskDispatcher  # type: ignore[import-untyped]

from rsttrace import log
from rsttrace.sinks.exporter import DEFAULT_PORT

THREADS = 4  # workers; a scrape takes a few ms and scrapes are serialised by the collector anyway
MAX_CONNECTIONS = 100  # waitress's default; lowered to a quarter of RLIMIT_NOFILE when that is small
BACKLOG = 1024  # listen(): above 128 for a fleet's scrapers; the kernel caps it at net.core.somaxconn
IDLE_TIMEOUT = 15  # s: a connection with nothing to do is closed (Prometheus reconnects at its next scrape)
REQUEST_TIMEOUT = 10  # s: from a request's first byte to its last, headers and body
EVICT_IDLE_AFTER = 0.1  # s: at the limit, connections silent this long may be closed (a scraper sends at once)
EVICT_PARTIAL_AFTER = 1.0  # s: at the limit, requests still being received after this may be dropped
MAX_HEADER = 16384
MAX_BODY = 65536  # only GET is served; nothing needs a body
STARVED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

WSGIApp = Callable[[Dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def parse_listen(value: str) -> Tuple[str, int]:
    """host:port, [v6]:port, or :port (all IPv4 addresses). Raises ValueError with the rule."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError("--listen takes HOST:PORT, e.g. 127.0.0.1:%d or [::1]:%d" % (DEFAULT_PORT, DEFAULT_PORT))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError("brackets are for IPv6 addresses: %r" % value)
    elif ":" in host:
        raise ValueError("put IPv6 addresses in brackets: [%s]:%s" % (host, port))
    host = host or "0.0.0.0"
    try:
        p = int(port)
    except ValueError:
        raise ValueError("bad port in --listen %r" % value) from None
    if not 0 < p < 65536:
        raise ValueError("bad port in --listen %r" % value)
    return host, p


def connection_limit(nofile: Optional[int] = None) -> int:
    """Connections the HTTP side may hold: a quarter of the descriptor limit, 8 to 100."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile < 0:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, nofile // 4))


class _Once:
    """One log line per kind of trouble per ``every`` seconds, with how often it happened."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self.last: Dict[str, float] = {}
        self.seen: Dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, key: str, level: str, msg: str, **kw: Any) -> None:
        now = time.monotonic()
        with self.lock:
            self.seen[key] = self.seen.get(key, 0) + 1
            if now - self.last.get(key, -self.every) < self.every:
                return
            self.last[key] = now
            times, self.seen[key] = self.seen[key], 0
        getattr(log.get(), level)(msg, times=times, **kw)


log_once = _Once()


class _WaitressLog(logging.Handler):
    """waitress's own log records as one structlog line each, rate-limited, without tracebacks."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            exc = record.exc_info[1] if record.exc_info else None
            extra = {"error": "%s: %s" % (type(exc).__name__, exc)} if exc is not None else {}
            log_once("waitress:" + str(record.msg)[:60], "warning", "http server: " + msg.splitlines()[0][:200],
                     **extra)
        except Exception:  # logging must never raise into the server
            pass


def _quiet_waitress() -> None:
    for name in ("waitress", "waitress.queue"):
        lg = logging.getLogger(name)
        lg.handlers = [_WaitressLog()]
        lg.propagate = False
    logging.getLogger("waitress").setLevel(logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth": expected under bursts


class _Channel(HTTPChannel):  # type: ignore[misc]
    request_started = 0.0

    def received(self, data: bytes) -> bool:
        if self.request is None:
            self.request_started = time.time()  # the first byte of a request
        return bool(super().received(data))


def _has_input(ch: Any) -> bool:
    """Bytes wait in the connection's receive queue (read in this loop pass)."""
    try:
        return bool(ch.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing to read (EAGAIN), or the connection is gone
        return False


class _Server(TcpWSGIServer):  # type: ignore[misc]
    channel_class = _Channel

    def __init__(self, app: WSGIApp, sock: socket.socket, max_connections: int, threads: int,
                 idle_timeout: float, request_timeout: float) -> None:
        adj = Adjustments(sockets=[sock], threads=threads, backlog=BACKLOG, connection_limit=max_connections,
                          channel_timeout=int(idle_timeout), cleanup_interval=1, asyncore_use_poll=True,
                          log_socket_errors=False, ident="rsttrace", max_request_header_size=MAX_HEADER,
                          max_request_body_size=MAX_BODY, expose_tracebacks=False)
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.paused_until = 0.0
        self.next_cleanup = 0.0
        self.wake_soon = False
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(threads)
        super().__init__(app, map={}, _start=True, _sock=sock, dispatcher=dispatcher, adj=adj,
                         sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()), bind_socket=False)

    # -- in the I/O thread ----------------------------------------------------------------------
    def readable(self) -> bool:
        now = time.time()
        if now >= self.next_cleanup:
            self.next_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        if not self.accepting or time.monotonic() < self.paused_until:
            return False
        if len(self.active_channels) >= self.max_connections:
            self.make_room(now)
            return False  # the marked channels close in this loop pass; accept on the next
        return True

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle past channel_timeout
        for ch in list(self.active_channels.values()):
            if ch.request is not None and not ch.requests and now - ch.request_started > self.request_timeout:
                ch.will_close = True  # a request still arriving after REQUEST_TIMEOUT: slowloris

    def make_room(self, now: float) -> None:
        """At the limit: close the idlest connections (about an eighth of the limit)."""
        idle: List[Tuple[float, Any]] = []
        partial: List[Tuple[float, Any]] = []
        for ch in self.active_channels.values():
            if ch.will_close or ch.requests or ch.total_outbufs_len:
                continue  # closing already, or a request being served or answered
            if ch.request is None:
                if now - ch.last_activity >= EVICT_IDLE_AFTER:
                    idle.append((ch.last_activity, ch))
            elif now - ch.request_started > EVICT_PARTIAL_AFTER:
                partial.append((ch.request_started, ch))
        victims = [ch for _, ch in sorted(idle, key=lambda t: t[0])]
        victims += [ch for _, ch in sorted(partial, key=lambda t: t[0])]
        n = max(1, self.max_connections // 8)
        closed = 0
        self.wake_soon = True  # look again shortly, not at the loop's 1 s timeout
        for ch in victims:
            if closed >= n:
                break
            if _has_input(ch):
                continue  # a request waiting to be read (a scraper sends at once): not idle
            ch.will_close = True
            closed += 1
        log_once("limit", "warning", "http connection limit reached: closing the idlest connections",
              limit=self.max_connections, closed=closed)

    def handle_accept(self) -> None:
        # Everything waiting, up to the limit: one accept per loop pass (waitress's way) lets a
        # flood in the backlog delay scrapers queued behind it.
        while len(self.active_channels) < self.max_connections:
            try:
                v = self.accept()
            except OSError as e:
                if e.errno in STARVED:
                    # Out of descriptors (or kernel memory): scrapes are refused for a second, the
                    # tracer keeps what it holds. The connection waits in the backlog meanwhile.
                    self.paused_until = time.monotonic() + 1.0
                    log_once("starved", "warning", "http: cannot accept a connection, refusing scrapes for now; "
                          "counting goes on", error=e.strerror or str(e))
                return
            if v is None:
                return  # nothing more waiting
            conn, addr = v
            try:
                self.set_socket_options(conn)
                self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)
            except OSError:
                conn.close()  # the client left already

    def handle_error(self) -> None:
        # wasyncore's default logs a traceback and closes the listening socket: neither here.
        exc = sys.exc_info()[1]
        log_once("error", "warning", "http server error", error="%s: %s" % (type(exc).__name__, exc))


class HttpServer:
    """A bound, listening socket; :meth:`start` serves an app on it in daemon threads."""

    def __init__(self, host: str, port: int, max_connections: Optional[int] = None, threads: int = THREADS,
                 idle_timeout: float = IDLE_TIMEOUT, request_timeout: float = REQUEST_TIMEOUT) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.max_connections = max_connections if max_connections is not None else connection_limit()
        self.threads = threads
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.server: Optional[_Server] = None
        self.thread: Optional[threading.Thread] = None
        self.stopping = False

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self, app: WSGIApp) -> None:
        _quiet_waitress()
        self.server = _Server(app, self.sock, self.max_connections, self.threads, self.idle_timeout,
                              self.request_timeout)
        self.thread = threading.Thread(target=self._loop, name="rsttrace-http", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        assert self.server is not None
        m = self.server._map
        srv = self.server
        while m and not self.stopping:
            try:
                # at the limit, look again shortly (young idle connections become closable)
                full = srv.wake_soon or len(srv.active_channels) >= srv.max_connections
                timeout, srv.wake_soon = (0.02 if full else 1.0), False
                wasyncore.poll2(timeout, m)
            except Exception as e:  # never let the HTTP side die of one bad moment
                log_once("loop", "warning", "http server loop error, restarting it",
                      error="%s: %s" % (type(e).__name__, e))
                time.sleep(0.5)

    def close(self) -> None:
        """Stop serving and close every connection; a second call does nothing."""
        srv, self.server = self.server, None
        if srv is None:
            self.sock.close()
            return
        m = srv._map
        try:
            srv.trigger.pull_trigger(lambda: wasyncore.close_all(m))  # closed by the I/O thread itself
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(timeout=5)  # the loop ends when its map is empty
        self.stopping = True
        if m:  # the thread was stuck, or the trigger never ran: close from here
            wasyncore.close_all(m, ignore_all=True)
        srv.task_dispatcher.shutdown(timeout=5)


def bind(host: str, port: int) -> HttpServer:
    """Bind and listen now (raises OSError); serve later with :meth:`HttpServer.start`."""
    return HttpServer(host, port)
