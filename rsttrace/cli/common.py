"""What every command shares: one-line usage errors, flag groups and bounds, start-up against the
running kernel, and a tracing session's life (start, log what attached, stop, say what was lost)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Dict, Iterator, NoReturn, Optional, Tuple

from rsttrace import log
from rsttrace.capture.contract import KIND_BY_NAME
from rsttrace.capture.tracer import TraceOptions
from rsttrace.cli import argcheck, doctor
from rsttrace.enrich import Enricher
from rsttrace.kernel.facts import KernelFacts
from rsttrace.kernel.read import gather
from rsttrace.kernel.tracefs import TracefsError, ensure_tracefs
from rsttrace.pipeline import names
from rsttrace.pipeline.attribution import event_attributor
from rsttrace.pipeline.events import Event
from rsttrace.pipeline.filters import EventFilter, FilterError, parse_addrs, parse_kinds, parse_ports
from rsttrace.pipeline.session import Session
from rsttrace.sinks import output


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


def seconds(b: Tuple[float, float]) -> Callable[[str], float]:
    return argcheck.seconds(*b)


def say(b: Tuple[float, float], unit: str = "") -> str:
    return argcheck.bounds(b[0], b[1], unit)


def common_filters(p: argparse.ArgumentParser, check_netns: bool = True, many_netns: bool = False) -> None:
    """--kind, --netns and -4/-6 for every command that filters; ``many_netns``: --netns takes a
    comma list and repeats (``top``, whose map filters up to 64 namespaces in the kernel), each
    item checked by the command."""
    p.add_argument("--kind", action="append", metavar="KIND",
                   help="%s (comma list or repeated)" % ", ".join(KIND_BY_NAME))
    if many_netns:
        p.add_argument("--netns", action="append", metavar="INODES",
                       help="only these network namespaces: inode numbers or net:[N], comma list (see `lsns -t net`)")
    else:
        p.add_argument("--netns", type=argcheck.netns_inode, metavar="INODE",
                       help="only this network namespace%s: its inode number (1 to %d) or net:[N] as readlink prints "
                            "it" % (", which must exist" if check_netns else "", argcheck.NETNS_MAX))
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", action="store_true", help="IPv4 only")
    fam.add_argument("-6", "--ipv6", action="store_true", help="IPv6 only")


def event_filter_args(p: argparse.ArgumentParser, live: bool = True) -> None:
    """The filters only events have (counters have no reason name, peer or address). ``live``:
    reason names are checked against the running kernel's (trace); a capture's are its own."""
    p.add_argument("--reason", action="append", metavar="NAME",
                   help="only these reason names (comma list, case-insensitive): "
                        + ("the running kernel's and rsttrace's own; an unknown one is refused with the list "
                           "(explained: `rsttrace reasons`)" if live else
                           "as the capture names them (the tracing kernel's, not this one's)"))
    p.add_argument("--port", action="append", metavar="PORT", help="local or remote port, 1 to 65535 (comma list)")
    p.add_argument("--addr", action="append", metavar="CIDR", help="local or remote address or network")


def event_filter(args: argparse.Namespace) -> EventFilter:
    try:
        return EventFilter(
            kinds=parse_kinds(args.kind),
            reasons=names.check_reasons(args.reason, None),  # names checked once the kernel is read
            ports=parse_ports(args.port),
            addrs=parse_addrs(args.addr),
            netns=args.netns,
            family=family(args),
        )
    except (FilterError, names.ReasonError) as e:
        raise UsageError(str(e)) from e


def session_args(p: argparse.ArgumentParser) -> None:
    """What trace and export both tune: the counter poll and the event buffer."""
    p.add_argument("--overflow-interval", type=seconds(OVERFLOW_INTERVAL), default=1.0, metavar="SECONDS",
                   help="how often counter-derived overflows are checked (%s, default 1)"
                        % say(OVERFLOW_INTERVAL, "s"))
    p.add_argument("--ring-pages", type=argcheck.integer(*RING_PAGES, power_of_two=True), default=64, metavar="N",
                   help="ring buffer size in pages (a power of 2, %s, default 64)" % say(RING_PAGES))


def hook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-raw-tracepoints", action="store_true",
                   help="attach to perf tracepoints even where raw ones can be used: costs the traced workload "
                        "more, and received resets always carry a socket cookie (raw: only sockets that have one)")


def proc_root_arg(p: Any) -> None:
    p.add_argument("--proc-root", default="/proc", metavar="DIR",
                   help="the host's /proc (in a container: where it is mounted; default /proc)")


def attribution_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pod attribution (events gain namespace, pod, container, container_id)")
    g.add_argument("--no-attribution", action="store_true", help="do not look up pods")
    proc_root_arg(g)
    g.add_argument("--pods-dir", default="/var/log/pods", metavar="DIR",
                   help="kubelet's pod log directory: names pods without API access (default /var/log/pods)")
    g.add_argument("--containers-dir", default="/var/log/containers", metavar="DIR",
                   help="kubelet's container log links: names containers (default /var/log/containers)")
    g.add_argument("--cgroup-root", default="/sys/fs/cgroup", metavar="DIR",
                   help="cgroup mount; v2 is found there or under unified/ (default /sys/fs/cgroup)")


def enricher_for(args: argparse.Namespace) -> Optional[Enricher]:
    if args.no_attribution:
        return None
    if not os.path.isdir(args.proc_root):
        raise UsageError("--proc-root %s: no such directory" % args.proc_root)
    e = Enricher(proc_root=args.proc_root, cgroup_root=args.cgroup_root, pods_dir=args.pods_dir,
                 containers_dir=args.containers_dir)
    e.start()
    return e


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


def family(args: argparse.Namespace) -> Optional[str]:
    return "ipv4" if args.ipv4 else "ipv6" if args.ipv6 else None


class Stopper:
    """SIGINT/SIGTERM set an event; the loops notice within 100 ms and detach cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, _sig: int, _frame: Optional[FrameType]) -> None:
        self.event.set()


def log_attach(session: Session) -> None:
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


class Running:
    """A started session and what goes with it: the stop signal and the pod enricher."""

    def __init__(self, session: Session, stopper: Stopper, enricher: Optional[Enricher]) -> None:
        self.session = session
        self.stopper = stopper
        self.enricher = enricher
        self.lost: Dict[str, int] = {}  # session.lost() as it stood at close


def new_session(facts: KernelFacts, options: TraceOptions, args: argparse.Namespace,
                sink: Optional[Callable[[Event], None]] = None, event_filter: Optional[EventFilter] = None,
                overflow_interval: float = 1.0) -> Session:
    """The one place a command builds its Session (compiles nothing yet: that is start()).

    The host's /proc comes from the command's own ``--proc-root``: in a pod (``kubectl exec``)
    the session lists every namespace there, and a command that forgot to pass it would see only
    its container's and retire every other namespace's counts as gone (found so: ``top --netns``
    in the DaemonSet's container showed no totals)."""
    return Session(facts, options, sink=sink, event_filter=event_filter, overflow_interval=overflow_interval,
                   proc_root=getattr(args, "proc_root", "/proc"))


@contextmanager
def running(session: Session, args: Optional[argparse.Namespace] = None) -> Iterator[Running]:
    """Start ``session`` (with pod attribution when ``args`` asks for it), log what attached, and
    on the way out close it, stop the enricher and keep the final loss counts in ``.lost``."""
    enricher = enricher_for(args) if args is not None and hasattr(args, "no_attribution") else None
    if enricher is not None:
        session.attribute = event_attributor(enricher)
    run = Running(session, Stopper(), enricher)
    session.start()
    try:
        log_attach(session)
        yield run
    finally:
        run.lost = session.lost()
        session.close()
        if enricher is not None:
            enricher.stop()
