"""Every reason name the kernels report must have a short, distinct explanation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import List, Set

import pytest

from rsttrace.pipeline.reasons_text import (
    MAX_LINE,
    Explanation,
    explain,
    known_names,
    rst_reason_names,
)

# Copied verbatim from the __print_symbolic(REC->reason, ...) list of
# events/tcp/tcp_send_reset/format on Debian 6.12.107 and this machine's 6.18.44 (identical).
SK_RST_REASONS_6_12_6_18 = (
    "NOT_SPECIFIED", "NO_SOCKET", "TCP_INVALID_ACK_SEQUENCE", "TCP_RFC7323_PAWS", "TCP_TOO_OLD_ACK",
    "TCP_ACK_UNSENT_DATA", "TCP_FLAGS", "TCP_OLD_ACK", "TCP_ABORT_ON_DATA", "TCP_TIMEWAIT_SOCKET",
    "INVALID_SYN", "TCP_ABORT_ON_CLOSE", "TCP_ABORT_ON_LINGER", "TCP_ABORT_ON_MEMORY", "TCP_STATE",
    "TCP_KEEPALIVE_TIMEOUT", "TCP_DISCONNECT_WITH_DATA", "MPTCP_RST_EUNSPEC", "MPTCP_RST_EMPTCP",
    "MPTCP_RST_ERESOURCE", "MPTCP_RST_EPROHIBIT", "MPTCP_RST_EWQ2BIG", "MPTCP_RST_EBADPERF",
    "MPTCP_RST_EMIDDLEBOX", "ERROR", "MAX",
)
DROP_REASONS = ("TCP_LISTEN_OVERFLOW",)
# Also asked for by `rsttrace reasons`: received-reset errnos and the TcpExt overflow counters.
RECEIVED_ERRORS = ("ECONNREFUSED", "ECONNRESET", "EPIPE")
COUNTERS = ("ListenOverflows", "TCPReqQFullDrop", "TCPReqQFullDoCookies")
KINDS = ("kind:received", "kind:listen_overflow_syn", "kind:listen_overflow_ack", "kind:syn_queue_overflow")

REPO = Path(__file__).resolve().parents[2]
# Format-file fixtures: the project's copy if someone added one, else the shared captures.
FORMAT_ROOTS = (REPO / "tests" / "fixtures", Path("/work/shared/kernel-formats"))

_SYMBOLIC = re.compile(r"__print_symbolic\(REC->reason,(?P<body>[^)]*)\)")
_ENTRY = re.compile(r'\{\s*-?\d+\s*,\s*"(?P<name>[A-Za-z0-9_]+)"\s*\}')


def parse_reason_names(format_text: str) -> List[str]:
    """Names in the __print_symbolic(REC->reason, {N, "NAME"}, ...) list of a tracefs format."""
    match = _SYMBOLIC.search(format_text)
    if match is None:
        return []
    return [m.group("name") for m in _ENTRY.finditer(match.group("body"))]


def _format_files(event: str) -> Iterator[Path]:
    seen: Set[str] = set()
    for root in FORMAT_ROOTS:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("%s/format" % (event,))):
            text = path.read_text()
            if text not in seen:  # the same capture copied into two places counts once
                seen.add(text)
                yield path


def test_parser_reads_symbolic_list() -> None:
    text = 'print fmt: "r=%s", __print_symbolic(REC->reason, { 0, "NOT_SPECIFIED" }, { 1, "NO_SOCKET" })'
    assert parse_reason_names(text) == ["NOT_SPECIFIED", "NO_SOCKET"]
    assert parse_reason_names('print fmt: "state=%s", REC->state') == []


@pytest.mark.parametrize("name", SK_RST_REASONS_6_12_6_18 + DROP_REASONS + RECEIVED_ERRORS + COUNTERS + KINDS)
def test_every_required_name_is_explained(name: str) -> None:
    explanation = explain(name)
    assert isinstance(explanation, Explanation), name
    assert explanation.cause.strip() and explanation.check.strip()


def test_module_covers_exactly_the_known_rst_reasons() -> None:
    assert set(rst_reason_names()) == set(SK_RST_REASONS_6_12_6_18)


def test_every_reason_in_fixture_format_files_is_explained() -> None:
    files = list(_format_files("tcp_send_reset"))
    if not files:
        pytest.skip("no tcp_send_reset format fixtures on this machine")
    with_reason = 0
    for path in files:
        names = parse_reason_names(path.read_text())
        if not names:  # < 6.10: no reason field
            continue
        with_reason += 1
        missing = [n for n in names if explain(n) is None]
        assert not missing, "%s: no explanation for %s" % (path, missing)
    assert with_reason >= 1, "expected at least one kernel (6.10+) with a reason field"


def test_listen_overflow_drop_reason_in_fixtures_is_explained() -> None:
    hits = [p for p in _format_files("kfree_skb") if "TCP_LISTEN_OVERFLOW" in parse_reason_names(p.read_text())]
    if not hits:
        pytest.skip("no kfree_skb format fixture with TCP_LISTEN_OVERFLOW (6.15+) on this machine")
    assert explain("TCP_LISTEN_OVERFLOW") is not None


def test_lines_are_single_and_short() -> None:
    for name in known_names():
        explanation = explain(name)
        assert explanation is not None
        for line in (explanation.cause, explanation.check):
            assert "\n" not in line, name
            assert len(line) <= MAX_LINE, "%s: %s chars: %s" % (name, len(line), line)
            assert line == line.strip(), name


def test_no_duplicate_texts() -> None:
    texts: List[str] = []
    for name in known_names():
        explanation = explain(name)
        assert explanation is not None
        texts += [explanation.cause, explanation.check]
    duplicates = {t for t in texts if texts.count(t) > 1}
    assert not duplicates, duplicates


def test_lookup_normalizes_prefixes_and_case() -> None:
    assert explain("SK_RST_REASON_NO_SOCKET") == explain("NO_SOCKET")
    assert explain("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW") == explain("TCP_LISTEN_OVERFLOW")
    assert explain(" no_socket ") == explain("NO_SOCKET")
    assert explain("KIND:Received") == explain("kind:received")
    assert explain("listenoverflows") == explain("ListenOverflows")
    assert explain("received") is None  # kinds must be asked for with the kind: prefix
    assert explain("NOT_A_REASON") is None
    assert explain("") is None


def test_seed_causes_are_covered_in_plain_words() -> None:
    """The causes in the seeds (Netdata guide, RST explainer) each show up somewhere."""
    corpus = " ".join(
        "%s %s" % (e.cause, e.check) for e in (explain(n) for n in known_names()) if e is not None
    ).lower()
    for phrase in ("closed port", "crashed service", "scan", "so_linger 0", "half-open", "reboot",
                   "time_wait assassination", "accept queue", "memory", "syn flood"):
        assert phrase in corpus, phrase
