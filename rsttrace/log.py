"""structlog set-up: console renderer on a terminal, one JSON object per line otherwise.

Diagnostics go to stderr so that ``rsttrace trace --json`` keeps stdout for events only.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, MutableMapping, Optional, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "auto", stream: Optional[TextIO] = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    node = os.environ.get("NODE_NAME")  # the DaemonSet sets it from the downward API

    def add_node(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if node:
            event.setdefault("node", node)
        return event

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            add_node,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(name: str = "rsttrace") -> Any:
    return structlog.get_logger(name)
