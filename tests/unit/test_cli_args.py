"""Bad input gets one clear line and exit 2, never a traceback; help shows examples."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rsttrace import cli


def run(*args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run([sys.executable, "-m", "rsttrace", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,msg", [
    (["trace", "--port", "http"], "bad port"),
    (["trace", "--addr", "10.0.0.0/40"], "bad address"),
    (["trace", "--kind", "sendt"], "unknown kind"),
    (["trace", "--ring-pages", "3"], "power of 2"),
    (["summary", "--kind", "nope"], "unknown kind"),
])
def test_bad_values_exit_2_one_line(args: list, msg: str) -> None:  # type: ignore[type-arg]
    p = run(*args)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0] and lines[0].startswith("rsttrace: error:")
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args", [["trace", "--count", "0"], ["trace", "--duration", "x"],
                                  ["trace", "--netns", "abc"], ["trace", "-4", "-6"], ["nosuch"]])
def test_argparse_errors_exit_2(args: list) -> None:  # type: ignore[type-arg]
    p = run(*args)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("rsttrace: error: argument")
    assert "--help`)" in p.stderr  # names where the full text is


def test_help_has_examples_and_hides_ebpf() -> None:
    out = cli.build_parser().format_help()
    assert "examples:" in out and "rsttrace summary --interval 10" in out
    sub = run("trace", "--help").stdout
    assert "--reason" in sub and "-4" in sub and "--ebpf" not in sub


def test_netns_accepts_readlink_form() -> None:
    ns = cli.build_parser().parse_args(["trace", "--netns", "net:[4026532281]"]).netns
    assert ns == 4026532281


def test_no_command_is_one_line_naming_the_commands() -> None:
    p = run()
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("rsttrace: error: no command given")
    assert "trace, summary, reasons, doctor, export" in p.stderr and "rsttrace --help" in p.stderr
