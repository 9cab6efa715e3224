"""``rsttrace export``: Prometheus metrics read from the BPF maps at scrape time, events to the log."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

from rsttrace import log
from rsttrace.capture.tracer import TraceOptions
from rsttrace.cli import argcheck, common
from rsttrace.cli.common import INTERVAL, LOG_RATE, PORT_LABELS, SERIES, UsageError, say, seconds
from rsttrace.pipeline.attribution import metric_labeler
from rsttrace.pipeline.events import Event
from rsttrace.sinks.exporter import DEFAULT_PORT


def add_parser(sub: Any) -> None:
    e = sub.add_parser("export", help="serve Prometheus metrics (/metrics, /healthz) and log events",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  rsttrace export                                # 127.0.0.1:10793\n"
                              "  rsttrace export --listen 0.0.0.0:10793 --log-rate 50\n"
                              "  rsttrace export --listen [::]:10793 --log-rate 0  # counters only, no event log\n")
    e.add_argument("--listen", default="127.0.0.1:%d" % DEFAULT_PORT, metavar="HOST:PORT",
                   help="address to serve on, IPv6 in brackets (default 127.0.0.1:%d: nothing exposed "
                        "by accident)" % DEFAULT_PORT)
    e.add_argument("--log-rate", type=argcheck.integer(*LOG_RATE), default=20, metavar="N",
                   help="at most N event log lines per second, 0 = no event log (%s, default 20)" % say(LOG_RATE))
    e.add_argument("--log-interval", type=seconds(INTERVAL), default=10.0, metavar="SECONDS",
                   help="how often the number of suppressed event lines is logged (%s, default 10)"
                        % say(INTERVAL, "s"))
    e.add_argument("--max-port-labels", type=argcheck.integer(*PORT_LABELS), default=64, metavar="N",
                   help="listening ports that get their own label; later ones are port=\"other\" (%s, default 64)"
                        % say(PORT_LABELS))
    e.add_argument("--max-series", type=argcheck.integer(*SERIES), default=2000, metavar="N",
                   help="series per exporter beyond which label sets fold into \"other\" (%s, default 2000)"
                        % say(SERIES))
    e.add_argument("--netns-label", action="store_true",
                   help="add a netns label (the namespace inode) to the reset and overflow counters")
    common.session_args(e)
    e.add_argument("--metric-pod-labels", action="store_true",
                   help="add namespace and pod labels to the reset and overflow counters (capped by --max-series)")
    common.hook_args(e)
    common.attribution_args(e)


def cmd_export(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from rsttrace.sinks.exporter import LogLimiter, SeriesCap, SessionCollector
    from rsttrace.sinks.httpserve import bind, parse_listen
    from rsttrace.sinks.webapp import StartingApp

    try:
        host, port = parse_listen(args.listen)
    except ValueError as e:
        raise UsageError(str(e)) from e
    # Bound before bcc's compile: a taken port is said at once, and probes meanwhile get a 503
    # ("starting") rather than a refused connection.
    try:
        httpd = bind(host, port)
    except OSError as e:
        raise UsageError("cannot listen on %s: %s" % (args.listen, e.strerror or e)) from e
    app = StartingApp()
    httpd.start(app)
    facts = common.prepare()
    logger = log.get()
    limiter = LogLimiter(args.log_rate)

    def sink(ev: Event) -> None:
        if limiter.allow():
            logger.info("tcp_reset_event", **ev.to_dict())

    # With no event log there is nothing to deliver: counters only, nothing crosses to user space.
    # The log's budget is applied in the kernel too: events beyond it never cross over.
    options = TraceOptions(events=args.log_rate > 0, ring_pages=args.ring_pages,
                           max_event_rate=args.log_rate if args.log_rate > 0 else None,
                           raw_tracepoints=not args.no_raw_tracepoints)
    if args.metric_pod_labels and args.no_attribution:
        raise UsageError("--metric-pod-labels needs attribution: drop --no-attribution")
    if args.metric_pod_labels and args.netns_label:
        raise UsageError("choose one of --metric-pod-labels and --netns-label")
    session = common.new_session(facts, options, args, sink=sink, overflow_interval=args.overflow_interval)
    run = None
    try:
        with common.running(session, args) as run:
            registry = CollectorRegistry()
            netns_labels: Optional[Callable[[Optional[int]], Dict[str, str]]] = None
            extra: Tuple[str, ...] = ()
            if args.netns_label:
                netns_labels, extra = (lambda ns: {"netns": str(ns) if ns else ""}), ("netns",)
            elif args.metric_pod_labels and run.enricher is not None:
                netns_labels, extra = metric_labeler(run.enricher), ("namespace", "pod")
            # The host's own counters: pid 1's namespace under --proc-root (in a pod, /proc/net would
            # be the pod's namespace).
            registry.register(SessionCollector(session, SeriesCap(args.max_port_labels, args.max_series),
                                               proc_net=os.path.join(args.proc_root, "1", "net"),
                                               netns_labels=netns_labels, extra_label_names=extra))

            def healthy() -> bool:
                attached = any(a.attached for a in session.tracer.attachments)
                return attached and time.monotonic() - session.last_loop < 5.0

            app.ready(registry, healthy)
            logger.info("serving", listen=args.listen, metrics="/metrics", health="/healthz",
                        max_connections=httpd.max_connections)
            next_report = time.monotonic() + args.log_interval
            held_before = 0

            def report() -> None:
                nonlocal next_report, held_before
                if time.monotonic() < next_report:
                    return
                next_report += args.log_interval
                lost = session.lost()
                # held back in the kernel (the budget is applied there first) plus any the Python
                # limiter still caught
                n = lost["suppressed"] - held_before + limiter.take_suppressed()
                held_before = lost["suppressed"]
                if n or lost["lost_kernel"] or lost["lost_user"]:
                    logger.info("event lines suppressed", suppressed=n,
                                suppressed_total=lost["suppressed"] + limiter.suppressed_total,
                                lost_kernel=lost["lost_kernel"], lost_user=lost["lost_user"])

            try:
                session.run(run.stopper.event, after_poll=report)
                session.finish()  # a scrape racing the shutdown sees the last seconds too
            finally:
                httpd.close()  # before the session closes: no scrape reads a closed map
    finally:
        httpd.close()
        if run is not None:
            logger.info("stopped", lost_kernel=run.lost["lost_kernel"], lost_user=run.lost["lost_user"],
                        suppressed_total=run.lost["suppressed"] + limiter.suppressed_total)
    return 0
