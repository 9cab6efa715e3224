"""The ``rsttrace`` command line, in the manner of bcc's tools."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from rsttrace import __version__
from rsttrace.capture.contract import KIND_BY_NAME
from rsttrace.capture.tracer import TraceOptions, TracerError
from rsttrace.cli import argcheck, doctor
from rsttrace.enrich import Enricher
from rsttrace.kernel.facts import KernelFacts, gather
from rsttrace.kernel.tracefs import TracefsError, ensure_tracefs
from rsttrace.pipeline import names
from rsttrace.pipeline.attribution import event_attributor, metric_labeler
from rsttrace.pipeline.events import Event
from rsttrace.pipeline.filters import EventFilter, FilterError, parse_addrs, parse_kinds, parse_ports
from rsttrace.pipeline.reasons_text import explain
from rsttrace.pipeline.session import Session, group
from rsttrace.sinks import log, output
from rsttrace.sinks.exporter import DEFAULT_PORT

EXAMPLES = """examples:
  rsttrace trace                         # every reset sent or received, one line each
  rsttrace trace --json                  # one JSON object per line (keys in the README)
  rsttrace trace --reason NO_SOCKET      # only resets for closed ports / unknown connections
  rsttrace trace --kind sent -4 --port 443,8443
  rsttrace trace --addr 10.0.0.0/8 --count 100
  rsttrace trace --netns 4026532281      # one network namespace (a pod); see `lsns -t net`
  rsttrace summary --interval 10         # counts by kind/reason/state every 10 s
  rsttrace reasons                       # the running kernel's reason table, explained
  rsttrace doctor                        # what this node has and lacks, with fixes
  rsttrace export --listen 0.0.0.0:10793 # Prometheus /metrics and /healthz, events to the log
"""


class UsageError(Exception):
    """Bad input: reported as one line, exit 2."""


def fail(msg: str) -> NoReturn:
    # one line whatever the message held, and nothing a terminal would act on (paths, values as typed)
    sys.stderr.write("rsttrace: error: %s\n" % output.terminal_safe(" ".join(msg.split())))
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's errors as rsttrace's: one line naming the fix and exit 2 (not a usage block)."""

    def error(self, message: str) -> NoReturn:
        if message.endswith("expected one argument"):  # "--count -1": -1 reads as an option (there is -4)
            message += " (a value that starts with - is written --flag=VALUE)"
        fail("%s (see `%s --help`)" % (message, self.prog))


# Bounds of every number a flag takes; each flag's help states its own.
DURATION = (0.1, 31536000.0)  # a year
INTERVAL = (0.1, 86400.0)
OVERFLOW_INTERVAL = (0.1, 3600.0)
COUNT = (1, 10**12)
EVENT_RATE = (1, 10**7)
RING_PAGES = (1, 16384)  # 64 MiB (per CPU for the perf buffer)
LOG_RATE = (0, 10**6)
PORT_LABELS = (0, 65535)
SERIES = (1, 10**6)


def _seconds(b: Tuple[float, float]) -> Callable[[str], float]:
    return argcheck.seconds(*b)


def _say(b: Tuple[float, float], unit: str = "") -> str:
    return argcheck.bounds(b[0], b[1], unit)


def _common_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", action="append", metavar="KIND",
                   help="%s (comma list or repeated)" % ", ".join(KIND_BY_NAME))
    p.add_argument("--netns", type=argcheck.netns_inode, metavar="INODE",
                   help="only this network namespace, which must exist: its inode number (1 to %d) or net:[N] as "
                        "readlink prints it" % argcheck.NETNS_MAX)
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", action="store_true", help="IPv4 only")
    fam.add_argument("-6", "--ipv6", action="store_true", help="IPv6 only")


def _session_args(p: argparse.ArgumentParser) -> None:
    """What trace and export both tune: the counter poll and the event buffer."""
    p.add_argument("--overflow-interval", type=_seconds(OVERFLOW_INTERVAL), default=1.0, metavar="SECONDS",
                   help="how often counter-derived overflows are checked (%s, default 1)"
                        % _say(OVERFLOW_INTERVAL, "s"))
    p.add_argument("--ring-pages", type=argcheck.integer(*RING_PAGES, power_of_two=True), default=64, metavar="N",
                   help="ring buffer size in pages (a power of 2, %s, default 64)" % _say(RING_PAGES))


def _hook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-raw-tracepoints", action="store_true",
                   help="attach to perf tracepoints even where raw ones can be used: costs the traced workload "
                        "more, and received resets always carry a socket cookie (raw: only sockets that have one)")


def _attribution_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pod attribution (events gain namespace, pod, container, container_id)")
    g.add_argument("--no-attribution", action="store_true", help="do not look up pods")
    g.add_argument("--proc-root", default="/proc", metavar="DIR",
                   help="the host's /proc (in a container: where it is mounted; default /proc)")
    g.add_argument("--pods-dir", default="/var/log/pods", metavar="DIR",
                   help="kubelet's pod log directory: names pods without API access (default /var/log/pods)")
    g.add_argument("--containers-dir", default="/var/log/containers", metavar="DIR",
                   help="kubelet's container log links: names containers (default /var/log/containers)")
    g.add_argument("--cgroup-root", default="/sys/fs/cgroup", metavar="DIR",
                   help="cgroup mount; v2 is found there or under unified/ (default /sys/fs/cgroup)")


def _enricher(args: argparse.Namespace) -> Optional[Enricher]:
    if args.no_attribution:
        return None
    if not os.path.isdir(args.proc_root):
        raise UsageError("--proc-root %s: no such directory" % args.proc_root)
    e = Enricher(proc_root=args.proc_root, cgroup_root=args.cgroup_root, pods_dir=args.pods_dir,
                 containers_dir=args.containers_dir)
    e.start()
    return e


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="rsttrace",
        description="Trace TCP resets sent and received and listen-queue overflows, with the kernel's reason.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version="rsttrace " + __version__)
    p.add_argument("--log-level", choices=sorted(log.LEVELS), default="info", help="diagnostics level (stderr)")
    p.add_argument("--log-format", choices=["auto", "console", "json"], default="auto",
                   help="diagnostics format: console on a terminal, JSON otherwise (default auto)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("trace", help="print events live", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_filters(t)
    t.add_argument("--reason", action="append", metavar="NAME",
                   help="only these reason names (comma list, case-insensitive): the running kernel's and "
                        "rsttrace's own; an unknown one is refused with the list (explained: `rsttrace reasons`)")
    t.add_argument("--port", action="append", metavar="PORT", help="local or remote port, 1 to 65535 (comma list)")
    t.add_argument("--addr", action="append", metavar="CIDR", help="local or remote address or network")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.add_argument("--duration", type=_seconds(DURATION), metavar="SECONDS",
                   help="stop after this long (%s)" % _say(DURATION, "s"))
    t.add_argument("--count", type=argcheck.integer(*COUNT), metavar="N",
                   help="stop after N events (%s)" % _say(COUNT))
    t.add_argument("--log-events", action="store_true", help="also log each event as a structlog line (stderr)")
    _session_args(t)
    rate = t.add_mutually_exclusive_group()
    rate.add_argument("--max-event-rate", type=argcheck.integer(*EVENT_RATE), default=1000, metavar="N",
                      help="at most about N events a second reach user space; the kernel counts and reports "
                           "the rest, and every counter stays exact (%s, default 1000)" % _say(EVENT_RATE))
    rate.add_argument("--all-events", action="store_true",
                      help="deliver every event (a storm then costs the traced workload more)")
    t.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    _hook_args(t)
    _attribution_args(t)

    s = sub.add_parser("summary", help="counts by kind/reason/state every interval",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  rsttrace summary --interval 10\n  rsttrace summary --kind sent --json\n")
    _common_filters(s)
    s.add_argument("--interval", type=_seconds(INTERVAL), default=5.0, metavar="SECONDS",
                   help="%s, default 5" % _say(INTERVAL, "s"))
    s.add_argument("--duration", type=_seconds(DURATION), metavar="SECONDS",
                   help="stop after this long (%s)" % _say(DURATION, "s"))
    s.add_argument("--json", action="store_true", help="one JSON object per interval")
    _hook_args(s)

    e = sub.add_parser("export", help="serve Prometheus metrics (/metrics, /healthz) and log events",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  rsttrace export                                # 127.0.0.1:10793\n"
                              "  rsttrace export --listen 0.0.0.0:10793 --log-rate 50\n"
                              "  rsttrace export --listen [::]:10793 --log-rate 0  # counters only, no event log\n")
    e.add_argument("--listen", default="127.0.0.1:%d" % DEFAULT_PORT, metavar="HOST:PORT",
                   help="address to serve on, IPv6 in brackets (default 127.0.0.1:%d: nothing exposed "
                        "by accident)" % DEFAULT_PORT)
    e.add_argument("--log-rate", type=argcheck.integer(*LOG_RATE), default=20, metavar="N",
                   help="at most N event log lines per second, 0 = no event log (%s, default 20)" % _say(LOG_RATE))
    e.add_argument("--log-interval", type=_seconds(INTERVAL), default=10.0, metavar="SECONDS",
                   help="how often the number of suppressed event lines is logged (%s, default 10)"
                        % _say(INTERVAL, "s"))
    e.add_argument("--max-port-labels", type=argcheck.integer(*PORT_LABELS), default=64, metavar="N",
                   help="listening ports that get their own label; later ones are port=\"other\" (%s, default 64)"
                        % _say(PORT_LABELS))
    e.add_argument("--max-series", type=argcheck.integer(*SERIES), default=2000, metavar="N",
                   help="series per exporter beyond which label sets fold into \"other\" (%s, default 2000)"
                        % _say(SERIES))
    e.add_argument("--netns-label", action="store_true",
                   help="add a netns label (the namespace inode) to the reset and overflow counters")
    _session_args(e)
    e.add_argument("--metric-pod-labels", action="store_true",
                   help="add namespace and pod labels to the reset and overflow counters (capped by --max-series)")
    _hook_args(e)
    _attribution_args(e)

    r = sub.add_parser("reasons", help="the running kernel's reason table, explained")
    r.add_argument("--json", action="store_true", help="as a JSON array")

    d = sub.add_parser("doctor", help="what this node has and lacks for tracing, with fixes")
    d.add_argument("--no-load", action="store_true", help="skip compiling and attaching the programs")
    d.add_argument("--json", action="store_true", help="as a JSON array")
    return p


# --- shared start-up ---------------------------------------------------------------------
def prepare(need_root: bool = True) -> KernelFacts:
    logger = log.get()
    if need_root:
        prob = doctor.privilege_problem()
        if prob:
            raise UsageError(prob)
    try:
        root, mounted = ensure_tracefs()
    except TracefsError as e:
        raise UsageError(str(e)) from e  # it names the fix
    except OSError as e:
        raise UsageError("%s (mount -t tracefs nodev /sys/kernel/tracing as root)" % e) from e
    for m in mounted:
        logger.info("mounted", what=m)
    try:
        facts = gather(root)
    except (TracefsError, OSError) as e:
        fix = "run as root" if os.geteuid() else "see `rsttrace doctor`"
        raise UsageError("reading the kernel's tracepoint formats failed: %s (%s)" % (e, fix)) from e
    for w in facts.warnings:
        logger.warning("degraded", detail=w)
    return facts


def check_against_kernel(args: argparse.Namespace, facts: KernelFacts) -> None:
    """What only the running system can judge, checked before anything is compiled: reason names
    (the kernel's table and rsttrace's own, names.valid_reasons), --proc-root, that --netns exists."""
    try:
        names.check_reasons(getattr(args, "reason", None), facts)
    except names.ReasonError as e:
        raise UsageError(str(e)) from e
    proc_root = getattr(args, "proc_root", "/proc")
    if not os.path.isdir(proc_root):
        raise UsageError("--proc-root %s: no such directory (the host's /proc, as mounted here)" % proc_root)
    if args.netns is not None and not argcheck.netns_exists(args.netns, proc_root):
        raise UsageError("--netns %d: no network namespace has that inode now (see `lsns -t net`, `ip netns list`; "
                         "a pod's: readlink /proc/PID/ns/net)" % args.netns)


def _family(args: argparse.Namespace) -> Optional[str]:
    return "ipv4" if args.ipv4 else "ipv6" if args.ipv6 else None


class Stopper:
    """SIGINT/SIGTERM set an event; the loops notice within 100 ms and detach cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, _sig: int, _frame: Optional[FrameType]) -> None:
        self.event.set()


def cmd_trace(args: argparse.Namespace) -> int:
    try:
        filt = EventFilter(
            kinds=parse_kinds(args.kind),
            reasons=names.check_reasons(args.reason, None),  # names checked once the kernel is read
            ports=parse_ports(args.port),
            addrs=parse_addrs(args.addr),
            netns=args.netns,
            family=_family(args),
        )
    except (FilterError, names.ReasonError) as e:
        raise UsageError(str(e)) from e
    facts = prepare(need_root=not args.ebpf)
    check_against_kernel(args, facts)
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

    def drain() -> None:
        write_pending()
        out.flush()

    session = Session(facts, options, sink=sink, event_filter=filt, overflow_interval=args.overflow_interval,
                      proc_root=args.proc_root)
    if args.ebpf:
        out.write(session.tracer.source())
        return 0
    enricher = _enricher(args)
    if enricher is not None:
        session.attribute = event_attributor(enricher)
    stopper = Stopper()
    session.start()
    try:
        _log_attach(session)
        if not as_json:
            out.write(output.HEADER + "\n")
        out.flush()
        held = [0, time.monotonic() + 5.0]

        def after_poll() -> None:
            drain()
            if time.monotonic() >= held[1]:  # say it when the budget holds events back
                held[1] = time.monotonic() + 5.0
                n = session.lost()["suppressed"]
                if n > held[0]:
                    logger.warning("events held back by the rate limit", held_back=n - held[0], total=n,
                                   limit_per_s=args.max_event_rate, hint="counters include them; --all-events")
                    held[0] = n

        session.run(stopper.event, duration=args.duration, max_events=args.count, after_poll=after_poll)
        if not (args.count and session.delivered >= args.count):
            session.finish()  # the last seconds' counter-derived events, and held events
        drain()
    finally:
        lost = session.lost()
        session.close()
        if enricher is not None:
            enricher.stop()
        logger.info("stopped", delivered=session.delivered, held_back=lost["suppressed"],
                    lost_kernel=lost["lost_kernel"],
                    lost_user=lost["lost_user"], counter_map_full=lost["counter_map_full"])
    return 0


def _log_attach(session: Session) -> None:
    logger = log.get()
    for m in session.tracer.mounted:
        logger.info("mounted", what=m, why="this bcc looks up tracepoints under debugfs")
    for note in session.tracer.notes:
        logger.warning("degraded", detail=note)
    for a in session.tracer.attachments:
        if a.attached:
            logger.info("attached", program=a.program, hook=a.hook)
        else:
            logger.warning("not attached", program=a.program, hook=a.hook, reason=a.detail)
    for hook in session.facts.hooks():
        if hook.source.startswith("kernel counters"):
            logger.info("counter-derived", kind=hook.kind, source=hook.source, detail=hook.detail)
    logger.info("ready", buffer="ring" if session.tracer.ringbuf else "perf", headers=session.tracer.headers,
                bcc=session.tracer.bcc_version)


def cmd_summary(args: argparse.Namespace) -> int:
    try:
        kinds = parse_kinds(args.kind)
    except FilterError as e:
        raise UsageError(str(e)) from e
    facts = prepare()
    check_against_kernel(args, facts)
    family = _family(args)
    # Counters only: nothing crosses the ring buffer, so a summary costs the traced
    # workload as little as rsttrace can.
    session = Session(facts, TraceOptions(events=False, raw_tracepoints=not args.no_raw_tracepoints),
                      overflow_interval=min(1.0, args.interval))
    stopper = Stopper()
    session.start()
    _log_attach(session)
    prev: dict = {}  # type: ignore[type-arg]
    started = time.monotonic()
    try:
        while not stopper.event.is_set():
            end = time.monotonic() + args.interval
            if args.duration:
                end = min(end, started + args.duration)
            session.run(stopper.event, duration=max(0.0, end - time.monotonic()))
            if stopper.event.is_set() or (args.duration and time.monotonic() - started >= args.duration):
                session.finish()  # the last interval includes the last seconds' overflows
            counts = {k: n for k, n in session.counts().items()
                      if (kinds is None or k.kind in kinds)
                      and (args.netns is None or k.netns == args.netns)
                      and (family is None or k.family in (family, None))}
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
    finally:
        session.close()
    return 0


def cmd_reasons(args: argparse.Namespace) -> int:
    facts = prepare(need_root=False)
    rows: List[dict] = []  # type: ignore[type-arg]
    source = "tcp:tcp_send_reset format (enum sk_rst_reason)"
    for raw, name in sorted(facts.rst_reasons.items()):
        rows.append({"kind": "sent", "raw": raw, "name": name, "source": source})
    drop = "skb:kfree_skb format (enum skb_drop_reason)"
    if facts.listen_overflow_reason is not None:
        rows.append({"kind": "listen_overflow_ack", "raw": facts.listen_overflow_reason,
                     "name": "TCP_LISTEN_OVERFLOW", "source": drop})
    if facts.kfree_cookie_overflow:
        rows.append({"kind": "listen_overflow_ack", "raw": facts.drop_reason("NO_SOCKET"), "name": "NO_SOCKET",
                     "source": drop + ", the SYN-cookie path (syncookie: true)", "by_kind": True})
    # every name rsttrace itself gives, on this kernel (names.OWN_REASONS says which kinds)
    for name, (kind, where) in names.own_reasons(facts).items():
        rows.append({"kind": kind, "raw": None, "name": name, "source": where})
    for row in rows:
        by_kind = row.pop("by_kind", False)  # a name that means something else for this kind
        ex = (None if by_kind else explain(row["name"])) or explain("kind:" + row["kind"])
        row["cause"] = ex.cause if ex else ""
        row["check"] = ex.check if ex else ""
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return 0
    sys.stdout.write("Reasons reported by this kernel (%s), numbers as it numbers them:\n\n" % facts.release)
    for row in rows:
        number = "" if row["raw"] is None else str(row["raw"])
        sys.stdout.write("%-19s %4s  %s\n" % (row["kind"], number, row["name"]))
        if row["cause"]:
            sys.stdout.write("%25s why:   %s\n%25s check: %s\n" % ("", row["cause"], "", row["check"]))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = doctor.run(load=not args.no_load)
    if args.json:
        sys.stdout.write(json.dumps([c.as_dict() for c in checks], indent=1) + "\n")
    else:
        sys.stdout.write(doctor.render(checks) + "\n")
    return 0 if doctor.ok(checks) else 1


def cmd_export(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from rsttrace.sinks.exporter import LogLimiter, SeriesCap, SessionCollector
    from rsttrace.sinks.httpserve import StartingApp, bind, parse_listen

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
    facts = prepare()
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
    session = Session(facts, options, sink=sink, overflow_interval=args.overflow_interval, proc_root=args.proc_root)
    enricher = _enricher(args)
    if enricher is not None:
        session.attribute = event_attributor(enricher)
    stopper = Stopper()
    session.start()
    try:
        _log_attach(session)
        registry = CollectorRegistry()
        netns_labels: Optional[Callable[[Optional[int]], Dict[str, str]]] = None
        extra: Tuple[str, ...] = ()
        if args.netns_label:
            netns_labels, extra = (lambda ns: {"netns": str(ns) if ns else ""}), ("netns",)
        elif args.metric_pod_labels and enricher is not None:
            netns_labels, extra = metric_labeler(enricher), ("namespace", "pod")
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

        session.run(stopper.event, after_poll=report)
        session.finish()  # a scrape racing the shutdown sees the last seconds too
    finally:
        httpd.close()
        lost = session.lost()
        session.close()
        if enricher is not None:
            enricher.stop()
        logger.info("stopped", lost_kernel=lost["lost_kernel"], lost_user=lost["lost_user"],
                    suppressed_total=lost["suppressed"] + limiter.suppressed_total)
    return 0


COMMANDS = {"trace": cmd_trace, "summary": cmd_summary, "reasons": cmd_reasons, "doctor": cmd_doctor,
            "export": cmd_export}


def _standard_streams() -> None:
    """A closed fd 0, 1 or 2 (`rsttrace trace >&-`) gets /dev/null in its place, so that nothing
    rsttrace opens later (a BPF map, bcc's output capture) takes that number; a closed stdout
    is then a usage error rather than a traceback."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
    if sys.stderr is None:  # Python found fd 2 closed at start
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    if sys.stdout is None:
        fail("standard output is closed: give rsttrace somewhere to write (a file, a pipe or /dev/null)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    _standard_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        fail("no command given: one of %s (see `rsttrace --help`)" % ", ".join(COMMANDS))
    log.configure(args.log_level, args.log_format)
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        fail(str(e))
    except TracerError as e:
        fail(str(e))
    except BrokenPipeError:
        # `rsttrace trace | head`: the reader left; that is a normal end.
        try:
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 0
    except PermissionError as e:
        fail("permission denied: %s (run as root)" % e)


if __name__ == "__main__":
    sys.exit(main())
