"""Every bad input rsttrace is known to get, and what it must answer: the place new ones go.

The contract (README, issue 13): one line ``rsttrace: error: … (fix)`` on stderr, nothing on
stdout, exit 2, and nothing touched first. Parse-level cases run ``cli.main`` in-process with
every command replaced by a tripwire, so a value that slipped through fails the test instead of
starting a tracer. Cases that need the running kernel's names run against a saved kernel (the
6.18 fixture) with ``Session`` as the tripwire; tests/real/test_bad_input_real.py runs them on
the real kernel, as a subprocess that may not call bpf(2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, List, Tuple

import pytest

from rsttrace import cli
from rsttrace.cli import argcheck, common
from rsttrace.kernel import facts as kernel
from rsttrace.kernel import read as kernel_read
from rsttrace.pipeline import events, names
from tests import saved
from tests.testpaths import KERNEL_ROOTS

BIG = "99999999999999999999999"

# (argv, a piece of the one error line). Add new bad inputs here.
PARSE_LEVEL: List[Tuple[List[str], str]] = [
    # no command, unknown command, global flags
    ([], "no command given: one of trace, summary, reasons, doctor, export"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["--log-level", "loud", "trace"], "argument --log-level: invalid choice"),
    (["--log-format", "xml", "trace"], "argument --log-format: invalid choice"),
    (["trace", "--nope"], "unrecognized arguments: --nope"),
    (["trace", "extra"], "unrecognized arguments: extra"),
    (["trace", "-4", "-6"], "not allowed with argument"),
    (["trace", "--all-events", "--max-event-rate", "5"], "not allowed with argument"),
    (["trace", "--count"], "expected one argument"),
    # intervals and durations: finite, positive, in bounds, ASCII decimal
    (["trace", "--overflow-interval", "nan"], "'nan' is not a number of seconds from 0.1 to 3600"),
    (["trace", "--overflow-interval", "NaN"], "not a number of seconds"),
    (["trace", "--overflow-interval", "inf"], "not a number of seconds"),
    (["trace", "--overflow-interval=-inf"], "not a number of seconds"),
    (["trace", "--overflow-interval", "1e-9"], "not a number of seconds"),
    (["trace", "--overflow-interval", "0"], "not a number of seconds"),
    (["trace", "--overflow-interval=-1"], "not a number of seconds"),
    (["trace", "--overflow-interval", "0.01"], "not a number of seconds"),
    (["trace", "--overflow-interval", "3601"], "not a number of seconds"),
    (["trace", "--overflow-interval", ""], "not a number of seconds"),
    (["trace", "--overflow-interval", "1_0"], "not a number of seconds"),
    (["trace", "--overflow-interval", "\uff11"], "not a number of seconds"),  # fullwidth 1
    (["trace", "--overflow-interval", "0x10"], "not a number of seconds"),
    (["trace", "--duration", "nan"], "'nan' is not a number of seconds from 0.1 to 31536000"),
    (["trace", "--duration", "inf"], "not a number of seconds"),
    (["trace", "--duration", "1e-9"], "not a number of seconds"),
    (["trace", "--duration", "0"], "not a number of seconds"),
    (["trace", "--duration=-5"], "not a number of seconds"),
    (["trace", "--duration", "x"], "not a number of seconds"),
    (["trace", "--duration", BIG], "not a number of seconds"),
    (["summary", "--interval", "nan"], "'nan' is not a number of seconds from 0.1 to 86400"),
    (["summary", "--interval", "inf"], "not a number of seconds"),
    (["summary", "--interval", "1e-9"], "not a number of seconds"),
    (["summary", "--interval", "0"], "not a number of seconds"),
    (["summary", "--interval", "86401"], "not a number of seconds"),
    (["summary", "--interval", "\u0661"], "not a number of seconds"),  # Arabic-Indic 1
    (["summary", "--duration", "nan"], "not a number of seconds"),
    (["summary", "--duration", "1e-9"], "not a number of seconds"),
    (["export", "--overflow-interval", "nan"], "not a number of seconds from 0.1 to 3600"),
    (["export", "--overflow-interval", "inf"], "not a number of seconds"),
    (["export", "--log-interval", "nan"], "'nan' is not a number of seconds from 0.1 to 86400"),
    (["export", "--log-interval", "inf"], "not a number of seconds"),
    (["export", "--log-interval", "1e-9"], "not a number of seconds"),
    (["export", "--log-interval", "0"], "not a number of seconds"),
    # whole numbers: ASCII digits, in bounds
    (["trace", "--count", "0"], "'0' is not a whole number from 1 to 1000000000000"),
    (["trace", "--count=-1"], "not a whole number"),
    (["trace", "--count", "1.5"], "not a whole number"),
    (["trace", "--count", "\uff18"], "not a whole number"),  # fullwidth 8
    (["trace", "--count", "10_0"], "not a whole number"),
    (["trace", "--count", BIG], "not a whole number"),
    (["trace", "--count", ""], "not a whole number"),
    (["trace", "--max-event-rate", "0"], "not a whole number from 1 to 10000000"),
    (["trace", "--max-event-rate", "nan"], "not a whole number"),
    (["trace", "--max-event-rate", "100000000"], "not a whole number"),
    (["trace", "--ring-pages", "3"], "'3' must be a power of 2 (1 to 16384)"),
    (["trace", "--ring-pages", "0"], "not a power of 2 from 1 to 16384"),
    (["trace", "--ring-pages", "2147483648"], "not a power of 2 from 1 to 16384"),  # 2^31
    (["trace", "--ring-pages", "32768"], "not a power of 2"),
    (["trace", "--ring-pages", "6\uff14"], "not a power of 2"),
    (["export", "--ring-pages", "3"], "'3' must be a power of 2"),
    (["export", "--ring-pages", "2147483648"], "not a power of 2 from 1 to 16384"),
    (["export", "--ring-pages=-64"], "not a power of 2"),
    (["export", "--log-rate=-1"], "not a whole number from 0 to 1000000"),
    (["export", "--log-rate", "\uff15"], "not a whole number"),
    (["export", "--log-rate", "10_0"], "not a whole number"),
    (["export", "--max-port-labels=-1"], "not a whole number from 0 to 65535"),
    (["export", "--max-port-labels", "65536"], "not a whole number"),
    (["export", "--max-series", "0"], "not a whole number from 1 to 1000000"),
    # --netns: a 32-bit inode in ASCII digits, or net:[N]
    (["trace", "--netns", "0"], "'0' is not a netns inode: a number from 1 to 4294967295"),
    (["trace", "--netns=-5"], "is not a netns inode"),
    (["trace", "--netns", "-5"], "expected one argument (a value that starts with - is written --flag=VALUE)"),
    (["trace", "--netns", "net:[-5]"], "is not a netns inode"),
    (["trace", "--netns", "net:[]"], "is not a netns inode"),
    (["trace", "--netns", BIG], "is not a netns inode"),
    (["trace", "--netns", "4294967296"], "is not a netns inode"),
    (["trace", "--netns", "\u0661\u0662"], "is not a netns inode"),  # Arabic-Indic 12
    (["trace", "--netns", "abc"], "is not a netns inode"),
    (["trace", "--netns", ""], "is not a netns inode"),
    (["trace", "--netns", "net:[4026531840]x"], "is not a netns inode"),
    (["trace", "--duration", "1e3"], "not a number of seconds"),  # decimal only, as --help says
    (["trace", "--overflow-interval", "."], "not a number of seconds"),
    (["trace", "--count", "1.0"], "not a whole number"),
    (["trace", "--count", "0x10"], "not a whole number"),
    (["reasons", "--json", "extra"], "unrecognized arguments: extra"),
    (["doctor", "--no-load", "--bogus"], "unrecognized arguments: --bogus"),
    (["export", "--max-series", "\u0661"], "not a whole number"),
    (["summary", "--netns", "0"], "is not a netns inode"),
    # captures: trace -w, read
    (["trace", "-w"], "argument -w/--write: expected one argument"),
    (["read"], "the following arguments are required: FILE"),
    (["read", "x.pcapng", "--count", "0"], "not a whole number"),
    (["read", "x.pcapng", "--duration", "5"], "unrecognized arguments: --duration"),
    (["top", "-d", "0.1"], "'0.1' is not a number of seconds from 0.2 to 3600"),
    (["top", "-d", "nan"], "not a number of seconds"),
    (["top", "--max-keys", "8"], "argument --max-keys"),
    (["top", "--max-keys", BIG], "argument --max-keys"),
    (["top", "-n", "0"], "argument -n/--iterations"),
    (["top", "--sort", "bogus"], "argument --sort: invalid choice"),
    (["top", "-4", "-6"], "not allowed with argument"),
]

# Caught by cmd_trace/cmd_summary before the kernel is read (filters, reason syntax).
BEFORE_KERNEL: List[Tuple[List[str], str]] = [
    (["trace", "--port", "\uff18\uff10"], "bad port '８０': a number from 1 to 65535"),
    (["trace", "--port", "8_0"], "bad port '8_0'"),
    (["trace", "--port", "0"], "bad port '0'"),
    (["trace", "--port", "65536"], "bad port '65536'"),
    (["trace", "--port=-1"], "bad port '-1'"),
    (["trace", "--port", ""], "bad port ''"),
    (["trace", "--port", ","], "bad port ''"),
    (["trace", "--port", "http"], "bad port 'http'"),
    (["trace", "--port", "80,"], "bad port ''"),
    (["trace", "--port", "1-100"], "bad port '1-100'"),
    (["trace", "--addr", "300.1.1.1"], "bad address '300.1.1.1'"),
    (["trace", "--addr", "10.0.0.1/33"], "bad address"),
    (["trace", "--kind", "SENT"], "unknown kind 'SENT'"),
    (["trace", "--kind", "\x1b[2J"], "unknown kind '\\x1b[2J'"),  # shown escaped, never acted on
    (["trace", "--addr", "10.0.0.0/40"], "bad address '10.0.0.0/40'"),
    (["trace", "--addr", ""], "bad address ''"),
    (["trace", "--addr", ","], "bad address ''"),
    (["trace", "--kind", "sendt"], "unknown kind 'sendt'"),
    (["trace", "--kind", ""], "unknown kind ''"),
    (["trace", "--kind", ","], "unknown kind ''"),
    (["summary", "--kind", "nope"], "unknown kind 'nope'"),
    (["trace", "--reason", ""], "--reason '': an empty name"),
    (["trace", "--reason", ","], "--reason ',': an empty name"),
    (["trace", "--reason", " , "], "an empty name"),
    (["trace", "--reason", "NO_SOCKET,"], "an empty name"),
    (["trace", "-w", "-", "--json"], "-w - writes the capture to stdout: --json has nowhere to go"),
    # read never reads the kernel: its filters and its file are judged alone
    (["read", "x.pcapng", "--port", "http"], "bad port 'http'"),
    (["read", "x.pcapng", "--reason", ","], "an empty name"),
    (["read", "/nonexistent/x.pcapng"], "cannot read /nonexistent/x.pcapng: No such file or directory"),
    (["read", "/etc/passwd"], "/etc/passwd: not a pcapng file (it must start with a section header block)"),
    (["read", "/x\x1b[2J"], "cannot read /x\\x1b[2J"),  # escaped
    (["top", "-b", "--by", "pods"], "--by 'pods': group by one or more of pod, kind"),
    (["top", "-b", "--by", "port,"], "--by '': group by one or more of"),
    (["top", "-b", "--peer-prefix", "33"], "--peer-prefix '33': IPv4 0 to 32"),
    (["top", "-b", "--peer-prefix", "24,64,8"], "--peer-prefix '24,64,8'"),
    (["top", "-b", "--netns", "x"], "'x' is not a netns inode"),
    (["top", "-b", "--kind", "nope"], "unknown kind 'nope'"),
    (["top", "--by", "port"], "the top screen needs a terminal: use -b"),  # stdin/stdout are not one here
]

# Need the kernel's names or what exists now: judged after the (fixture) kernel is read.
AGAINST_KERNEL: List[Tuple[List[str], str]] = [
    (["trace", "--reason", "NOPE"], "--reason: unknown reason 'NOPE' on this kernel (one of: "),
    (["trace", "--reason", "no_socket,bogus"], "unknown reason 'BOGUS'"),
    (["trace", "--reason", "sent"], "unknown reason 'SENT'"),  # a kind is not a reason
    (["trace", "--reason", "unknown:x"], "unknown reason 'UNKNOWN:X'"),
    (["trace", "--netns", "4294967295"], "--netns 4294967295: no network namespace has that inode now"),
    (["trace", "--netns", "net:[4294967295]"], "no network namespace has that inode now"),
    (["summary", "--netns", "4294967295"], "no network namespace has that inode now"),
    (["trace", "--proc-root", "/nonexistent/proc"], "--proc-root /nonexistent/proc: no such directory"),
    (["trace", "--proc-root", "/x\x1b[2J\x07"], "--proc-root /x\\x1b[2J\\x07: no such"),  # escaped
    (["trace", "--netns", " 4294967295 "], "--netns 4294967295: no network namespace"),
    # the capture file is opened before anything is compiled
    (["trace", "-w", "/nonexistent/dir/x.pcapng"], "cannot write /nonexistent/dir/x.pcapng: No such file or directory"),
    (["trace", "-w", "/etc"], "cannot write /etc: Is a directory"),
    (["top", "-b", "--netns", "%d,4294967295" % os.stat("/proc/self/ns/net").st_ino],
     "--netns 4294967295: no network namespace has that inode now"),
]


class Reached(Exception):
    """The tripwire: validation let the input through to where work starts."""


def one_error_line(capfd: pytest.CaptureFixture[str], argv: List[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capfd.readouterr()
    assert exc.value.code == 2, (argv, err)
    assert out == "", out
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("rsttrace: error: "), err
    return err.rstrip("\n")


@pytest.fixture()
def tripwired(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(_args: Any) -> int:
        raise Reached("a command ran with bad input")

    for name in list(cli.COMMANDS):
        monkeypatch.setitem(cli.COMMANDS, name, reached)


@pytest.fixture()
def saved_kernel(monkeypatch: pytest.MonkeyPatch) -> kernel.KernelFacts:
    facts = saved_facts()

    def session(*_a: Any, **_kw: Any) -> None:
        raise Reached("validation passed: a Session would compile now")

    monkeypatch.setattr(common, "prepare", lambda need_root=True: facts)
    monkeypatch.setattr(common, "Session", session)
    return facts


def saved_facts(version: str = "6.18") -> kernel.KernelFacts:
    root = KERNEL_ROOTS[version]
    return kernel_read.gather(root, btf_path=None, release=version,
                         functions=saved.functions_fixture(os.path.join(root, "functions.txt")))


@pytest.mark.parametrize("argv,msg", PARSE_LEVEL, ids=[" ".join(a) or "(none)" for a, _ in PARSE_LEVEL])
def test_parse_level(argv: List[str], msg: str, capfd: pytest.CaptureFixture[str], tripwired: None) -> None:
    line = one_error_line(capfd, argv)
    assert msg in line, line
    if argv:  # argparse's own errors say where the full text is
        assert "--help`)" in line, line


@pytest.mark.parametrize("argv,msg", BEFORE_KERNEL, ids=[" ".join(a) for a, _ in BEFORE_KERNEL])
def test_before_the_kernel_is_read(argv: List[str], msg: str, capfd: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def prepare(need_root: bool = True) -> None:
        raise Reached("the kernel was read before a syntax error was reported")

    monkeypatch.setattr(common, "prepare", prepare)
    assert msg in one_error_line(capfd, argv)


@pytest.mark.parametrize("argv,msg", AGAINST_KERNEL, ids=[" ".join(a) for a, _ in AGAINST_KERNEL])
def test_against_the_kernel(argv: List[str], msg: str, capfd: pytest.CaptureFixture[str],
                            saved_kernel: kernel.KernelFacts) -> None:
    assert msg in one_error_line(capfd, argv)


def test_unknown_reason_lists_every_valid_name(capfd: pytest.CaptureFixture[str],
                                               saved_kernel: kernel.KernelFacts) -> None:
    line = one_error_line(capfd, ["trace", "--reason", "NOPE"])
    listed = set(line.split("(one of: ", 1)[1].rstrip(")").split(", "))
    assert listed == set(names.valid_reasons(saved_kernel).values())
    assert {"NO_SOCKET", "TCP_ABORT_ON_CLOSE", "ECONNREFUSED", "ListenOverflows", "TCP_LISTEN_OVERFLOW"} <= listed


@pytest.mark.parametrize("argv", [
    ["trace", "--reason", "no_socket"],  # case-insensitive
    ["trace", "--reason", "NO_SOCKET,tcp_abort_on_close", "--reason", "ECONNREFUSED"],
    ["trace", "--reason", "ListenOverflows,TCPReqQFullDrop"],
    ["trace", "--reason", "unknown:77"],  # what an unnamed number prints as
    ["trace", "--netns", "net:[%d]" % os.stat("/proc/self/ns/net").st_ino],
    ["summary", "--netns", str(os.stat("/proc/self/ns/net").st_ino), "--interval", "0.1"],
    ["trace", "--overflow-interval", ".5", "--duration", "3600", "--count", "1000000000000", "--ring-pages", "16384"],
    ["trace", "--port", " 443,8443", "--max-event-rate", "10000000"],
    ["top", "-b", "--netns", "net:[%d]" % os.stat("/proc/self/ns/net").st_ino, "--by", "pod,PORT", "--by", "peer",
     "--peer-prefix", "24,64", "--max-keys", "16", "-d", "0.2", "-n", "1", "--json", "--kind", "sent"],
])
def test_good_input_passes(argv: List[str], saved_kernel: kernel.KernelFacts) -> None:
    """The other side of every row above: these reach the tracer (so the table can fail)."""
    with pytest.raises(Reached):
        cli.main(argv)


@pytest.mark.parametrize("version", sorted(KERNEL_ROOTS))
def test_every_name_rsttrace_prints_is_a_valid_reason(version: str, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """names.valid_reasons is the one list: `rsttrace reasons` and events' inferred names are in it."""
    facts = saved_facts(version)
    valid = names.valid_reasons(facts)
    monkeypatch.setattr(common, "prepare", lambda need_root=True: facts)
    assert cli.main(["reasons", "--json"]) == 0
    import json

    listed = {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert listed and {n.upper() for n in listed} <= set(valid)
    inferred = {events.infer_sent_reason(state, flags) for state in (None, "TCP_TIME_WAIT", "TCP_LISTEN",
                "TCP_ESTABLISHED") for flags in (0, 2, 3)}
    inferred |= {v for v in events.RECEIVED_ERRNO.values() if v} | {"ECONNRESET"}
    assert {n.upper() for n in inferred} <= set(valid)
    assert {n.upper() for n in facts.rst_reasons.values()} <= set(valid)


@pytest.mark.parametrize("text,ok", [("80", True), (" 80 ", True), ("\uff18\uff10", False), ("8_0", False),
                                     ("+8", False), ("8.0", False), ("\u00b2", False), ("", False)])
def test_ascii_int(text: str, ok: bool) -> None:
    assert (argcheck.ascii_int(text) is not None) == ok


def test_netns_that_exists_is_found() -> None:
    assert argcheck.netns_exists(os.stat("/proc/self/ns/net").st_ino)
    assert not argcheck.netns_exists(argcheck.NETNS_MAX)


def test_help_states_the_bounds() -> None:
    trace = subprocess.run([sys.executable, "-m", "rsttrace", "trace", "--help"], capture_output=True, text=True)
    assert trace.returncode == 0 and trace.stderr == ""
    flat = " ".join(trace.stdout.split())
    for piece in ("0.1 to 3600 s", "0.1 to 31536000 s", "1 to 1000000000000", "a power of 2, 1 to 16384",
                  "1 to 10000000", "1 to 4294967295", "1 to 65535"):
        assert piece in flat, piece
    export = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["export"]  # type: ignore[union-attr]
                      .format_help().split())
    for piece in ("0 to 1000000", "0 to 65535", "1 to 1000000", "0.1 to 86400 s", "a power of 2, 1 to 16384"):
        assert piece in export, piece


@pytest.mark.parametrize("argv,msg", [
    ([], "no command given"),
    (["trace", "--overflow-interval", "nan"], "not a number of seconds"),
    (["trace", "--netns", "\u0661\u0662"], "is not a netns inode"),
    (["trace", "--port", "\uff18\uff10"], "bad port"),
    (["export", "--ring-pages", "3"], "must be a power of 2"),
    (["summary", "--interval", "inf"], "not a number of seconds"),
])
def test_as_a_user_runs_it(argv: List[str], msg: str) -> None:
    """The same contract through `python -m rsttrace`, as a separate process."""
    p = subprocess.run([sys.executable, "-m", "rsttrace", *argv], capture_output=True, text=True, cwd="/")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("rsttrace: error: ") and msg in p.stderr, p.stderr


def test_closed_stdout_is_one_line_not_a_traceback() -> None:
    """`rsttrace reasons >&-`: Python leaves sys.stdout None; every write would be a traceback."""
    p = subprocess.run([sys.executable, "-m", "rsttrace", "reasons"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert p.returncode == 2
    assert p.stderr == "rsttrace: error: standard output is closed: give rsttrace somewhere to write (a file, " \
                       "a pipe or /dev/null)\n"


def test_closed_stderr_still_exits_2() -> None:
    p = subprocess.run([sys.executable, "-m", "rsttrace", "trace", "--count", "0"], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, preexec_fn=lambda: os.close(2))
    assert p.returncode == 2 and p.stdout == ""
