"""``rsttrace read FILE.pcapng``: capture now (``trace -w``), inspect later.

``read`` renders a capture as ``trace`` printed it (human lines or ``--json``, the same filters):
each packet's comment holds the event's ``--json`` object (rsttrace/sinks/pcapng.py), so ``read --json``
prints the very lines ``trace --json`` printed in the same run. Packets without an rsttrace
comment (another tool's capture) are counted and skipped.
"""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any, List, Optional

from rsttrace import log
from rsttrace.cli import argcheck, common
from rsttrace.cli.common import COUNT, UsageError, say
from rsttrace.pipeline.filters import EventFilter
from rsttrace.sinks import output, pcapread


class ReadError(Exception):
    """A file that cannot be read as a capture: one line for the user."""


def read(path: str, filt: EventFilter, as_json: bool, count: Optional[int] = None,
         out: Optional[IO[str]] = None) -> int:
    """Print the capture's events; returns how many were printed."""
    out = out or sys.stdout
    logger = log.get()
    try:
        f: IO[bytes] = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ReadError("cannot read %s: %s" % (path, e.strerror or e)) from e
    line = output.json_line if as_json else output.human
    shown = packets = foreign = 0
    reader = pcapread.Reader(f)
    # the human header goes out with the first lines (or at the end): a file that is not a
    # capture leaves stdout empty, as every bad input does
    pending: List[str] = [] if as_json else [output.HEADER]
    try:
        try:
            for pkt in reader.packets():
                packets += 1
                ev = pcapread.event_of(pkt.comments)
                if ev is None:
                    foreign += 1
                    continue
                if not filt.match(ev):
                    continue
                pending.append(line(ev))
                shown += 1
                if len(pending) >= 256:
                    out.write("\n".join(pending) + "\n")
                    pending.clear()
                if count is not None and shown >= count:
                    break
        except pcapread.FormatError as e:
            raise ReadError("%s: %s" % (path, e)) from e
        except OSError as e:
            raise ReadError("reading %s: %s" % (path, e.strerror or e)) from e
        if pending:
            out.write("\n".join(pending) + "\n")
        out.flush()
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    if reader.truncated:
        logger.warning("capture ends inside a block (the writer was stopped mid-write): read up to the last "
                       "whole block", file=path, packets=packets)
    if foreign:
        logger.warning("packets without an rsttrace event skipped", skipped=foreign)
    totals = pcapread.totals_of(reader.stats)
    if count is None or shown < count:
        if totals is None:
            logger.info("read", file=path, packets=packets, shown=shown, totals="none in the file (the writer did "
                        "not reach its first statistics block)")
        else:
            logger.info("read", file=path, packets=packets, shown=shown,
                        run={k: v for k, v in totals.items() if k != "kernel_counters"})
    return shown


def add_parser(sub: Any) -> None:
    rd = sub.add_parser("read", help="print a capture written by trace -w, as trace printed it",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  rsttrace read resets.pcapng\n"
                               "  rsttrace read resets.pcapng --json --reason NO_SOCKET --port 443\n"
                               "  rsttrace trace -w - --all-events | rsttrace read - --json\n")
    rd.add_argument("file", metavar="FILE", help="a pcapng file from rsttrace trace -w (- for stdin)")
    common.common_filters(rd, check_netns=False)
    common.event_filter_args(rd, live=False)
    rd.add_argument("--json", action="store_true", help="one JSON object per line, as trace --json printed it")
    rd.add_argument("--count", type=argcheck.integer(*COUNT), metavar="N",
                    help="stop after N events (%s)" % say(COUNT))


def cmd_read(args: argparse.Namespace) -> int:
    filt = common.event_filter(args)
    try:
        read(args.file, filt, as_json=args.json, count=args.count)
    except ReadError as e:
        raise UsageError(str(e)) from e
    return 0
