"""``rsttrace top``: who is resetting whom, right now, ranked from an exact in-kernel map."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

from rsttrace.capture.contract import TOP_ENTRIES_DEFAULT
from rsttrace.capture.tracer import TraceOptions
from rsttrace.cli import argcheck, common
from rsttrace.cli.common import COUNT, UsageError, say, seconds
from rsttrace.pipeline import top as topmod
from rsttrace.pipeline import tophints
from rsttrace.pipeline.filters import FilterError, parse_kinds
from rsttrace.pipeline.topsample import Sampler
from rsttrace.sinks import toptext

TOP_EXAMPLES = """examples:
  rsttrace top                                   # pods and ports, busiest first; q quits, s sorts
  rsttrace top --by peer --peer-prefix 24        # which networks get resets (IPv6 peers fold to /64)
  rsttrace top --by reason -d 5
  rsttrace top -b -n 3 -d 2 --by pod,port        # batch: three tables, two seconds apart
  rsttrace top -b -n 1 -d 10 --json --by port    # one JSON object per interval, for scripts
  kubectl -n rsttrace exec ds/rsttrace -it -- rsttrace top --proc-root /host/proc --by pod,reason

Every reset the kernel traces is counted in the kernel by its tuple, whatever the event budget:
rows are exact since start. The map holds --max-keys tuples; past that, resets are counted by kind
in a "map full" line and the rows' tail is incomplete (totals stay exact). Kinds derived from the
kernel's counters (listen_overflow_syn, syn_queue_overflow, listen_drop; see the README) appear as
rows with the listener's port where the kernel names one, and never with a peer or process. The
process (PID/COMM) is known only where the owner held the socket (close, abort): a closed-port
reset has none. Hints state what the counts show and name the reason to read in `rsttrace reasons`.
"""
TOP_DELAY = (0.2, 3600.0)
TOP_KEYS = (16, 1 << 20)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("top", help="who resets whom, right now: ranked groups, refreshing (or -b batch)",
                       epilog=TOP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--delay", type=seconds(TOP_DELAY), default=2.0, metavar="SECONDS",
                   help="seconds between samples; rates are over this interval (%s, default 2)" % say(TOP_DELAY, "s"))
    p.add_argument("-b", "--batch", action="store_true", help="print tables instead of drawing a screen")
    p.add_argument("-n", "--iterations", type=argcheck.integer(*COUNT), metavar="N",
                   help="stop after N samples (%s)" % say(COUNT))
    p.add_argument("--json", action="store_true", help="batch, one JSON object per sample (implies -b)")
    p.add_argument("--by", action="append", metavar="LIST",
                   help="group rows by these, comma list: %s (default pod,port; pod is the network "
                        "namespace, named as a pod when attributed; port is the local port, or peer:N for a client "
                        "on an ephemeral port talking to the peer's port N)" % ", ".join(topmod.DIMENSIONS))
    p.add_argument("--sort", choices=topmod.SORTS, default="rate",
                   help="rank by rate over the last interval (default), total since start, or a column")
    p.add_argument("--peer-prefix", default="32", metavar="V4[,V6]",
                   help="fold peers to their network: 24 folds IPv4 peers to /24 and IPv6 ones to /64; "
                        "24,56 sets both (default 32: addresses as they are)")
    p.add_argument("--rows", type=argcheck.integer(0, 10**6), default=0, metavar="N",
                   help="at most N rows per sample in batch output (0, the default: all)")
    p.add_argument("--max-keys", type=argcheck.integer(*TOP_KEYS), default=None, metavar="N",
                   help="tuples the kernel map holds (%s, default %d); past it resets are counted in a "
                        "\"map full\" line" % (say(TOP_KEYS), TOP_ENTRIES_DEFAULT))
    common.common_filters(p, many_netns=True)
    common.hook_args(p)
    common.attribution_args(p)


def cmd_top(args: argparse.Namespace) -> int:
    try:
        by = topmod.parse_by(args.by)
        prefix = topmod.parse_prefix(args.peer_prefix)
        kinds = parse_kinds(args.kind)
        netns = {argcheck.netns_inode(part.strip()) for v in args.netns for part in v.split(",")} \
            if args.netns else None
    except (topmod.TopError, FilterError, argparse.ArgumentTypeError) as e:
        raise UsageError(str(e)) from e
    batch = args.batch or args.json
    if not batch and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("the top screen needs a terminal: use -b (tables) or --json for a pipe or a file")
    if not batch and not os.environ.get("TERM"):
        os.environ["TERM"] = "xterm"  # `kubectl exec -it` gives a terminal but no TERM; curses needs one
    facts = common.prepare()
    args.netns = None  # checked below, each one
    common.check_against_kernel(args, facts)
    for ino in sorted(netns or ()):
        if not argcheck.netns_exists(ino, args.proc_root):
            raise UsageError("--netns %d: no network namespace has that inode now (see `lsns -t net`)" % ino)
    max_keys = args.max_keys or TOP_ENTRIES_DEFAULT
    options = TraceOptions(events=False, top_entries=max_keys, raw_tracepoints=not args.no_raw_tracepoints,
                           top_netns=sorted(netns) if netns else None)
    session = common.new_session(facts, options, args, overflow_interval=min(1.0, args.delay))
    model = topmod.TopModel(by, prefix, max_keys, kinds=set(kinds) if kinds else None, netns=netns,
                            family=common.family(args), hinter=tophints.hints)
    with common.running(session, args) as run:
        enricher = run.enricher

        def pod_of(ino: int) -> Optional[str]:
            info = enricher.lookup_netns(ino) if enricher is not None else None
            return "%s/%s" % (info.namespace, info.pod) if info is not None and info.pod else None

        labels = toptext.Labels(pod_of if enricher is not None else None, args.proc_root)
        sampler = Sampler(session, model, run.stopper.event, overflow_interval=min(1.0, args.delay))
        model.started = model._last = time.monotonic()  # rates from the moment counting began
        if batch:
            toptext.run_batch(sampler, args.delay, args.iterations, labels, args.json, args.rows or None, args.sort)
        else:
            from rsttrace.sinks.topscreen import run_screen  # curses only for the screen

            run_screen(sampler, args.delay, labels, args.sort, args.iterations)
    return 0
