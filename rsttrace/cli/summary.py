"""``rsttrace summary``: counts by kind, reason and state every interval, from the counters only."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict

from rsttrace.capture.tracer import TraceOptions
from rsttrace.cli import common
from rsttrace.cli.common import DURATION, INTERVAL, UsageError, say, seconds
from rsttrace.pipeline.filters import EventFilter, FilterError, parse_kinds
from rsttrace.pipeline.session import group
from rsttrace.sinks import output


def add_parser(sub: Any) -> None:
    s = sub.add_parser("summary", help="counts by kind/reason/state every interval",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  rsttrace summary --interval 10\n  rsttrace summary --kind sent --json\n")
    common.common_filters(s)
    s.add_argument("--interval", type=seconds(INTERVAL), default=5.0, metavar="SECONDS",
                   help="%s, default 5" % say(INTERVAL, "s"))
    s.add_argument("--duration", type=seconds(DURATION), metavar="SECONDS",
                   help="stop after this long (%s)" % say(DURATION, "s"))
    s.add_argument("--json", action="store_true", help="one JSON object per interval")
    common.hook_args(s)
    common.proc_root_arg(s)


def cmd_summary(args: argparse.Namespace) -> int:
    try:
        filt = EventFilter(kinds=parse_kinds(args.kind), netns=args.netns, family=common.family(args))
    except FilterError as e:
        raise UsageError(str(e)) from e
    facts = common.prepare()
    common.check_against_kernel(args, facts)
    # Counters only: nothing crosses the ring buffer, so a summary costs the traced
    # workload as little as rsttrace can.
    session = common.new_session(facts, TraceOptions(events=False, raw_tracepoints=not args.no_raw_tracepoints),
                                 args, overflow_interval=min(1.0, args.interval))
    prev: Dict[Any, int] = {}
    started = time.monotonic()
    with common.running(session) as run:
        stop = run.stopper.event
        while not stop.is_set():
            end = time.monotonic() + args.interval
            if args.duration:
                end = min(end, started + args.duration)
            session.run(stop, duration=max(0.0, end - time.monotonic()))
            if stop.is_set() or (args.duration and time.monotonic() - started >= args.duration):
                session.finish()  # the last interval includes the last seconds' overflows
            counts = {k: n for k, n in session.counts().items() if filt.match_count(k.kind, k.netns, k.family)}
            totals = group(counts)
            rows = {k: (n - prev.get(k, 0), n) for k, n in totals.items()}
            prev = totals
            lost = session.lost()
            if args.json:
                sys.stdout.write(json.dumps({
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "rows": [{"kind": k[0], "reason": k[1], "state": k[2], "interval": d, "total": t}
                             for k, (d, t) in sorted(rows.items())],
                    "lost": lost,
                }) + "\n")
            else:
                sys.stdout.write(output.summary_table(rows, lost, time.strftime("%H:%M:%S")) + "\n\n")
            sys.stdout.flush()
            if args.duration and time.monotonic() - started >= args.duration:
                break
    return 0
