"""structlog set-up: console renderer on a terminal, one JSON object per line otherwise.

Diagnostics go to stderr so that ``rsttrace trace --json`` keeps stdout for events only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any, Iterator, List, MutableMapping, Optional, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Out:
    """Where log lines go: the stream, or a list while something else owns the terminal (``held``).

    Loggers keep the file they were made with (structlog caches them on first use), so the stream
    they are given is this object, and holding switches what it writes to."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.held: Optional[List[str]] = None
        self._lock = threading.Lock()  # the enricher and HTTP threads log too

    def write(self, text: str) -> int:
        with self._lock:
            if self.held is not None:
                self.held.append(text)
            else:
                self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self.held is None:
                self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


_out: Optional[_Out] = None


@contextlib.contextmanager
def held() -> Iterator[List[str]]:
    """Keep log lines out of the terminal while a full-screen display owns it (``rsttrace top``'s
    curses screen, which they would draw over), and write them, in order, once it is gone. The
    list yielded grows with what was written (pieces of lines: count its newlines)."""
    out = _out
    if out is None:
        yield []
        return
    buf: List[str] = []
    with out._lock:
        out.held = buf
    try:
        yield buf
    finally:
        with out._lock:
            out.held = None
        for text in buf:
            out.write(text)
        out.flush()


def configure(level: str = "info", fmt: str = "auto", stream: Optional[TextIO] = None) -> None:
    """structlog for rsttrace's own lines and, through the same renderer, the standard library's
    ``logging`` records of any library (a ProcessorFormatter on the root logger): one format on
    stderr, and in JSON an exception is a ``exception`` list of frames in the line
    (``dict_tracebacks``), never a multi-line traceback in the middle of the stream."""
    global _out
    out = _out = _Out(stream or sys.stderr)
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any
    node = os.environ.get("NODE_NAME")  # the DaemonSet sets it from the downward API

    def add_node(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if node:
            event.setdefault("node", node)
        return event

    shared: List[Any] = [structlog.processors.add_log_level, add_node,
                         structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        # dict_tracebacks, without frame locals: a log line must not carry a process's memory
        shared.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        # loggers are fetched where used (log.get()), so a later configure() still applies
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)  # type: ignore[arg-type]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))


def get(name: str = "rsttrace") -> Any:
    return structlog.get_logger(name)
