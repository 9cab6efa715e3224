"""The ``rsttrace`` command line, in the manner of bcc's tools: one module per command.

Each command module has ``add_parser(sub)`` and ``cmd_<name>(args)``; what they share (usage
errors, flag groups, start-up against the kernel, a session's life) is :mod:`rsttrace.cli.common`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, Optional, Sequence

from rsttrace import __version__, log
from rsttrace.capture.tracer import TracerError
from rsttrace.cli import doctor, export, read, reasons, summary, top, trace
from rsttrace.cli.common import ArgumentParser, UsageError, fail

EXAMPLES = """examples:
  rsttrace trace                         # every reset sent or received, one line each
  rsttrace trace --json                  # one JSON object per line (keys in the README)
  rsttrace trace --reason NO_SOCKET      # only resets for closed ports / unknown connections
  rsttrace trace --kind sent -4 --port 443,8443
  rsttrace trace --addr 10.0.0.0/8 --count 100
  rsttrace trace --netns 4026532281      # one network namespace (a pod); see `lsns -t net`
  rsttrace trace -w resets.pcapng --all-events  # every event as a packet, for Wireshark/tshark
  rsttrace read resets.pcapng --json     # a capture as trace printed it (same filters)
  rsttrace summary --interval 10         # counts by kind/reason/state every 10 s
  rsttrace top --by pod,port             # who resets whom, ranked by rate, refreshing (q quits)
  rsttrace reasons                       # the running kernel's reason table, explained
  rsttrace doctor                        # what this node has and lacks, with fixes
  rsttrace export --listen 0.0.0.0:10793 # Prometheus /metrics and /healthz, events to the log
"""



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
    trace.add_parser(sub, EXAMPLES)
    summary.add_parser(sub)
    export.add_parser(sub)
    read.add_parser(sub)
    top.add_parser(sub)
    reasons.add_parser(sub)
    doctor.add_parser(sub)
    return p


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "trace": trace.cmd_trace, "summary": summary.cmd_summary, "reasons": reasons.cmd_reasons,
    "doctor": doctor.cmd_doctor, "export": export.cmd_export, "read": read.cmd_read, "top": top.cmd_top,
}


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
