"""``rsttrace read FILE.pcapng`` and the run totals ``trace -w`` writes: capture now, inspect later.

``read`` renders a capture as ``trace`` printed it (human lines or ``--json``, the same filters):
each packet's comment holds the event's ``--json`` object (rsttrace/pcapng.py), so ``read --json``
prints the very lines ``trace --json`` printed in the same run. Packets without an rsttrace
comment (another tool's capture) are counted and skipped.
"""

from __future__ import annotations

import sys
from typing import IO, Any, Dict, List, Optional

from rsttrace.sinks import pcapng
from rsttrace.sinks import log
from rsttrace.sinks import output
from rsttrace.pipeline.filters import EventFilter
from rsttrace.pipeline.session import Session, group


def run_totals(session: Session, packets: int, filt: Optional[EventFilter] = None) -> Dict[str, Any]:
    """What a capture does not contain, for its statistics blocks: events delivered (written),
    held back by the event budget, lost, and the in-kernel counters (kind, reason, state) within
    the trace's kind, namespace and family filters, as ``summary`` shows them (the counters
    always count everything; reasons, ports and addresses are not filtered in them)."""
    lost = session.lost()
    f = filt or EventFilter()
    counts = {k: n for k, n in session.counts().items()
              if (f.kinds is None or k.kind in f.kinds) and (f.netns is None or k.netns == f.netns)
              and (f.family is None or k.family in (f.family, None))}
    counters: List[Dict[str, Any]] = [
        {"kind": k, "reason": r, "state": s, "total": n} for (k, r, s), n in sorted(group(counts).items())]
    scope = {"netns": f.netns, "kinds": f.kinds, "family": f.family}
    return {"delivered": session.delivered, "packets": packets, "held_back": lost["suppressed"],
            "lost_kernel": lost["lost_kernel"], "lost_user": lost["lost_user"],
            "counter_map_full": lost["counter_map_full"], "kernel_counters": counters,
            "kernel_counters_scope": {k: v for k, v in scope.items() if v is not None}}


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
    reader = pcapng.Reader(f)
    # the human header goes out with the first lines (or at the end): a file that is not a
    # capture leaves stdout empty, as every bad input does
    pending: List[str] = [] if as_json else [output.HEADER]
    try:
        try:
            for pkt in reader.packets():
                packets += 1
                ev = pcapng.event_of(pkt.comments)
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
        except pcapng.FormatError as e:
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
    totals = pcapng.totals_of(reader.stats)
    if count is None or shown < count:
        if totals is None:
            logger.info("read", file=path, packets=packets, shown=shown, totals="none in the file (the writer did "
                        "not reach its first statistics block)")
        else:
            logger.info("read", file=path, packets=packets, shown=shown,
                        run={k: v for k, v in totals.items() if k != "kernel_counters"})
    return shown
