"""structlog set-up: console renderer on a terminal, one JSON object per line otherwise.

Diagnostics go to stderr so that ``rsttrace trace --json`` keeps stdout for events only.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, List, MutableMapping, Optional, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "auto", stream: Optional[TextIO] = None) -> None:
    """structlog for rsttrace's own lines and, through the same renderer, the standard library's
    ``logging`` records of any library (a ProcessorFormatter on the root logger): one format on
    stderr, and in JSON an exception is a ``exception`` list of frames in the line
    (``dict_tracebacks``), never a multi-line traceback in the middle of the stream."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    node = os.environ.get("NODE_NAME")  # the DaemonSet sets it from the downward API

    def add_node(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if node:
            event.setdefault("node", node)
        return event

    shared: List[Any] = [structlog.processors.add_log_level, add_node,
                         structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        # dict_tracebacks, without frame locals: a log line must not carry a process's memory
        shared.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        # loggers are fetched where used (log.get()), so a later configure() still applies
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))


def get(name: str = "rsttrace") -> Any:
    return structlog.get_logger(name)
