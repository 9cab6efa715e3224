"""Diagnostics: one line per record on stderr, structlog's and the standard library's alike."""

from __future__ import annotations

import io
import json
import logging

from rsttrace import log


def test_stdlib_records_and_exceptions_are_single_json_lines() -> None:
    buf = io.StringIO()
    log.configure("info", "json", buf)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logging.getLogger("rsttrace.enrich").exception("enrichment refresh failed")
        log.get().exception("ours failed", netns=7)
    logging.getLogger("some.library").warning("queue depth %d", 3)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3  # no traceback text between them
    a, b, c = (json.loads(x) for x in lines)
    assert (a["event"], a["level"], a["logger"]) == ("enrichment refresh failed", "error", "rsttrace.enrich")
    assert a["exception"][0]["exc_type"] == "ZeroDivisionError"
    assert "locals" not in a["exception"][0]["frames"][0]  # no process memory in logs
    assert (b["event"], b["netns"], b["exception"][0]["exc_value"]) == ("ours failed", 7, "division by zero")
    assert (c["event"], c["level"]) == ("queue depth 3", "warning")


def test_level_applies_to_stdlib_records_too() -> None:
    buf = io.StringIO()
    log.configure("warning", "json", buf)
    logging.getLogger("x").info("hidden")
    log.get().info("hidden too")
    logging.getLogger("x").error("shown")
    assert [json.loads(x)["event"] for x in buf.getvalue().splitlines()] == ["shown"]


def test_lines_held_while_a_screen_owns_the_terminal_come_out_in_order_after() -> None:
    buf = io.StringIO()
    log.configure("info", "json", buf)
    log.get().info("before")
    with log.held() as lines:
        log.get().warning("namespace gone", netns=7)
        logging.getLogger("some.library").warning("from a library")
        assert [json.loads(x)["event"] for x in buf.getvalue().splitlines()] == ["before"]  # nothing drawn over
        assert "".join(lines).count("\n") == 2  # what the screen's status line counts
    log.get().info("after")
    assert [json.loads(x)["event"] for x in buf.getvalue().splitlines()] == [
        "before", "namespace gone", "from a library", "after"]
