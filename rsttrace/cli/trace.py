"""``rsttrace trace``: every event live, one line (or JSON object) each."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from rsttrace import log
from rsttrace.capture.tracer import TraceOptions
from rsttrace.cli import argcheck, common
from rsttrace.cli.common import COUNT, DURATION, EVENT_RATE, UsageError, say, seconds
from rsttrace.pipeline.events import Event
from rsttrace.sinks import output, pcapng


def add_parser(sub: Any, examples: str) -> None:
    t = sub.add_parser("trace", help="print events live", epilog=examples,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_filters(t)
    common.event_filter_args(t)
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.add_argument("-w", "--write", metavar="FILE",
                   help="write every event as a packet to a pcapng file (- for stdout) that Wireshark, tshark "
                        "and tcpdump -r open: IP+TCP headers reconstructed from the event, its reason and JSON in "
                        "the packet comment, run totals at the end; nothing on stdout unless --json")
    t.add_argument("--duration", type=seconds(DURATION), metavar="SECONDS",
                   help="stop after this long (%s)" % say(DURATION, "s"))
    t.add_argument("--count", type=argcheck.integer(*COUNT), metavar="N",
                   help="stop after N events (%s)" % say(COUNT))
    t.add_argument("--log-events", action="store_true", help="also log each event as a structlog line (stderr)")
    common.session_args(t)
    rate = t.add_mutually_exclusive_group()
    rate.add_argument("--max-event-rate", type=argcheck.integer(*EVENT_RATE), default=1000, metavar="N",
                      help="at most about N events a second reach user space; the kernel counts and reports "
                           "the rest, and every counter stays exact (%s, default 1000)" % say(EVENT_RATE))
    rate.add_argument("--all-events", action="store_true",
                      help="deliver every event (a storm then costs the traced workload more)")
    t.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    common.hook_args(t)
    common.attribution_args(t)


def cmd_trace(args: argparse.Namespace) -> int:
    filt = common.event_filter(args)
    if args.write == "-" and args.json:
        raise UsageError("-w - writes the capture to stdout: --json has nowhere to go (write to a file, or read "
                         "the capture with `rsttrace read - --json`)")
    facts = common.prepare(need_root=not args.ebpf)
    common.check_against_kernel(args, facts)
    options = TraceOptions(events=True, kinds=filt.kinds, netns=args.netns, ring_pages=args.ring_pages,
                           max_event_rate=None if args.all_events else args.max_event_rate,
                           raw_tracepoints=not args.no_raw_tracepoints)
    logger = log.get()
    out = sys.stdout
    as_json = args.json

    # Lines are written in batches (256, or what a poll brought), not one write per event: the
    # call cost ~1.7 us an event in the every-event storm's profile. Every poll ends with a flush.
    pending: List[str] = []
    line = output.json_line if as_json else output.human

    def write_pending() -> None:
        if pending:
            out.write("\n".join(pending) + "\n")
            pending.clear()

    def sink(ev: Event) -> None:
        pending.append(line(ev))
        if len(pending) >= 256:  # one poll can run on for as long as a storm keeps the ring fed
            write_pending()
        if args.log_events:
            logger.info("tcp_reset_event", **ev.to_dict())

    # -w FILE: lines on stdout only with --json (as tcpdump -w prints nothing)
    lines = not args.write or as_json
    capture: Optional[pcapng.Capture] = None

    def drain() -> None:
        write_pending()
        out.flush()
        if capture is not None:
            capture.flush()

    if args.write and not args.ebpf:
        try:  # before the compile: a path that cannot be written is one error line at once
            capture = pcapng.Capture(args.write)
        except OSError as e:
            raise UsageError("cannot write %s: %s" % (args.write, e.strerror or e)) from e
    session = common.new_session(facts, options, args, sink=sink, event_filter=filt,
                                 overflow_interval=args.overflow_interval)
    if args.ebpf:
        out.write(session.tracer.source())
        return 0
    if capture is not None:
        capture.set_clock(session.clock.offset_ns)  # packet times equal the events' time
        session.sink = _capture_sink(capture, sink if lines else None, logger if args.log_events else None)
    totals: Optional[Dict[str, Any]] = None
    run = None
    try:
        with common.running(session, args) as run:
            if lines and not as_json:
                out.write(output.HEADER + "\n")
            out.flush()
            held = [0, time.monotonic() + 5.0]

            def after_poll() -> None:
                drain()
                if time.monotonic() >= held[1]:  # say it when the budget holds events back
                    held[1] = time.monotonic() + 5.0
                    if capture is not None:  # totals so far: a capture cut short still says what it lacks
                        capture.stats(pcapng.run_totals(session, capture.packets, filt))
                    n = session.lost()["suppressed"]
                    if n > held[0]:
                        logger.warning("events held back by the rate limit", held_back=n - held[0], total=n,
                                       limit_per_s=args.max_event_rate, hint="counters include them; --all-events")
                        held[0] = n

            try:
                session.run(run.stopper.event, duration=args.duration, max_events=args.count,
                            after_poll=after_poll)
                if not (args.count and session.delivered >= args.count):
                    session.finish()  # the last seconds' counter-derived events, and held events
                drain()
            finally:  # while the maps are open: what the capture does not contain
                totals = pcapng.run_totals(session, capture.packets, filt) if capture is not None else None
    finally:
        if capture is not None and totals is not None:
            try:
                capture.stats(totals, final=True)
                capture.close()
            except OSError as e:  # a reader that left (-w - | head) or a full disk
                logger.warning("capture not completed", file=args.write, error=e.strerror or str(e))
        if run is not None:  # started: say what came through and what did not
            lost = run.lost
            logger.info("stopped", delivered=session.delivered, held_back=lost["suppressed"],
                        lost_kernel=lost["lost_kernel"], lost_user=lost["lost_user"],
                        counter_map_full=lost["counter_map_full"])
    return 0


def _capture_sink(capture: pcapng.Capture, lines: Optional[Callable[[Event], None]],
                  logger: Any) -> Callable[[Event], None]:
    """Every event into the capture; also to the line sink (``--json`` beside ``-w``) or the log."""
    add = capture.add
    if lines is not None:
        def tee(ev: Event) -> None:
            add(ev)
            lines(ev)
        return tee
    if logger is not None:
        def add_and_log(ev: Event) -> None:
            add(ev)
            logger.info("tcp_reset_event", **ev.to_dict())
        return add_and_log
    return add  # the capture alone: no call in between
