"""`rsttrace top`'s model without a kernel: grouping, peer folding, ranking, rates, hints, output."""

from __future__ import annotations

import io
import json
from typing import Dict, Optional

import pytest

from rsttrace.capture import contract as c
from rsttrace.cli import build_parser
from rsttrace.kernel.facts import KernelFacts
from rsttrace.pipeline import top, tophints
from rsttrace.pipeline.top import Row, TopModel
from rsttrace.sinks import toptext
from rsttrace.sinks.toptext import Labels


def sent(peer: str, port: int, reason: str = "NO_SOCKET", netns: int = 11, pid: Optional[int] = None,
         comm: str = "") -> Row:
    return Row("sent", reason, None, "ipv4", netns, "10.0.0.1", port, peer, pid, comm=comm)


def scenario() -> Dict[Row, int]:
    rows = {sent("192.0.2.7", p): 1 for p in range(1000, 1100)}  # one peer, 100 closed ports
    rows.update({sent("198.51.100.%d" % i, 8080): 4 for i in range(1, 51)})  # 50 peers, one port
    rows[sent("10.0.0.9", 443, "TCP_ABORT_ON_CLOSE", netns=22, pid=77, comm="app")] = 30
    return rows


def test_parse_by_and_prefix() -> None:
    assert top.parse_by(None) == top.DEFAULT_BY
    assert top.parse_by(["pod,port", "port", "PEER"]) == ("pod", "port", "peer")
    with pytest.raises(top.TopError, match="one or more of"):
        top.parse_by(["pods"])
    assert top.parse_prefix("24") == (24, 64)
    assert top.parse_prefix("32") == (32, 128)
    assert top.parse_prefix("16,48") == (16, 48)
    for bad in ("33", "24,129", "x", "24,64,1", "-1", "２４"):
        with pytest.raises(top.TopError):
            top.parse_prefix(bad)


def test_fold_peer() -> None:
    assert top.fold_peer("192.0.2.77", (24, 64)) == "192.0.2.0/24"
    assert top.fold_peer("192.0.2.77", (32, 128)) == "192.0.2.77"
    assert top.fold_peer("2001:db8:1:2:3::9", (24, 64)) == "2001:db8:1:2::/64"
    assert top.fold_peer("2001:db8::9", (32, 128)) == "2001:db8::9"
    assert top.fold_peer(None, (24, 64)) is None


def test_grouping_ranks_by_rate_then_total() -> None:
    m = TopModel(("port",))
    rows = scenario()
    s1 = m.snapshot(rows, {}, len(rows), {"sent": sum(rows.values())}, now=m.started + 2)
    assert [g.key for g in s1.groups[:2]] == [(8080,), (443,)]
    g8080 = s1.groups[0]
    assert (g8080.total, g8080.delta, g8080.rate) == (200, 200, 100.0)
    assert len(g8080.values["peer"]) == 50 and g8080.values["reason"] == {"NO_SOCKET"}
    # the next interval: only the scanned ports move, so they rank first by rate; totals stay
    later = dict(rows)
    for p in range(1000, 1005):
        later[sent("192.0.2.7", p)] = 11
    s2 = m.snapshot(later, {}, len(later), {"sent": sum(later.values())}, now=m.started + 4)
    assert [g.key[0] for g in s2.groups[:5]] == [1000, 1001, 1002, 1003, 1004]
    assert s2.groups[0].rate == 5.0 and s2.groups[0].total == 11
    assert {g.key: g.total for g in s2.groups}[(8080,)] == 200
    assert s2.totals["sent"] == (50, sum(later.values()))
    by_total = top.rank(s2.groups, "total", ("port",))
    assert by_total[0].key == (8080,)


def test_peer_prefix_collapses_many_sources() -> None:
    m = TopModel(("peer",), prefix=(24, 64))
    s = m.snapshot(scenario(), {}, 0, {}, now=m.started + 1)
    got = {g.key[0]: g.total for g in s.groups}
    assert got == {"198.51.100.0/24": 200, "192.0.2.0/24": 100, "10.0.0.0/24": 30}


def test_filters_and_spill() -> None:
    m = TopModel(("pod", "kind"), netns={22}, kinds={"sent"})
    s = m.snapshot(scenario(), {"sent": 7, "received": 3}, 151, {"sent": 337}, now=m.started + 1)
    assert [(g.key, g.total) for g in s.groups] == [((22, "sent"), 30)]
    assert s.spill == (7, 7) and s.spill_by_kind == {"sent": 7}


def test_hints_state_what_the_counts_show() -> None:
    hs = {h.what: h for h in tophints.hints(scenario())}
    assert hs["scan"].subject == {"netns": 11, "peer": "192.0.2.7", "ports": 100, "resets": 100}
    assert hs["scan"].reason == "NO_SOCKET"
    assert hs["port"].subject == {"netns": 11, "port": 8080, "peers": 50, "resets": 200}
    assert hs["aborts"].reason == "TCP_ABORT_ON_CLOSE" and hs["aborts"].subject["pids"] == [77]
    assert "unread data" in hs["aborts"].text
    assert hs["aborts"].as_dict()["read"] == "rsttrace reasons: TCP_ABORT_ON_CLOSE"
    # below the thresholds: nothing said
    few = {sent("192.0.2.7", p): 1 for p in range(5)}
    assert tophints.hints(few) == []
    flood = {Row("syn_queue_overflow", "TCPReqQFullDrop", None, None, 11, None, 80, None, None, "counters"): 500}
    (h,) = tophints.hints(flood)
    assert h.what == "synflood" and h.subject["port"] == 80 and h.reason == "TCPReqQFullDrop"


def test_namer_names_as_trace_does() -> None:
    facts = KernelFacts(release="6.18.0", tracefs=None, btf_path=None)
    facts.rst_reasons = {1: "NO_SOCKET"}
    facts.tcp_states = {1: "TCP_ESTABLISHED", 7: "TCP_CLOSE"}
    n = top.Namer(facts)
    r = n.row((c.KIND_SENT, 1, 0, c.AF_INET, 5, 80, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 0, 0, b"", False))
    assert (r.kind, r.reason, r.state, r.laddr, r.port, r.raddr, r.pid) == (
        "sent", "NO_SOCKET", None, "10.0.0.1", 80, "10.0.0.2", None)
    r = n.row((c.KIND_SENT, 99, 7, c.AF_INET6, 5, 80, bytes(16), bytes(15) + b"\1", 42, c.F_PROCESS, b"nginx",
               True))
    assert (r.reason, r.state, r.raddr, r.pid, r.comm) == ("unknown:99", "TCP_CLOSE", "::1", 42, "nginx")
    assert top.value_of(r, "port", (32, 128)) == ("peer", 80)


def test_client_rows_by_the_peers_port() -> None:
    """Rows the kernel keyed by the peer's port (a client on an ephemeral one) group apart from the
    local port of the same number, and print as peer:N (JSON: port_of)."""
    refused = Row("received", "ECONNREFUSED", "TCP_SYN_SENT", "ipv4", 11, "10.0.0.1", 8080, "10.0.0.2", None,
                  port_remote=True)
    m = TopModel(("port",))
    s = m.snapshot({refused: 500, sent("192.0.2.7", 8080): 3}, {}, 2, {}, now=m.started + 1)
    assert [g.key for g in s.groups] == [(("peer", 8080),), (8080,)]
    labels = Labels(proc_root="/nonexistent")
    assert any(line.startswith("peer:8080 ") for line in toptext.table(s, labels))
    d = toptext.as_json(s, labels)
    assert d["rows"][0]["port"] == 8080 and d["rows"][0]["port_of"] == "peer" and "port_of" not in d["rows"][1]


def test_batch_text_and_json() -> None:
    m = TopModel(("pid",), hinter=tophints.hints)
    s = m.snapshot(scenario(), {"sent": 2}, 151, {"sent": 330}, now=m.started + 2)
    labels = Labels(lambda ns: "shop/web-1" if ns == 22 else None, proc_root="/nonexistent")
    out = io.StringIO()
    toptext.batch([s], labels, True, rows=1, out=out)
    d = json.loads(out.getvalue())
    assert d["rows"] == [{"pid": None, "comm": None, "rate": 150.0, "interval": 300, "total": 300,
                          "distinct": {"pod": 1, "kind": 1, "reason": 1, "state": 0, "laddr": 1, "port": 101,
                                       "peer": 51},
                          "values": {"pod": 11, "kind": "sent", "reason": "NO_SOCKET", "laddr": "10.0.0.1"}}]
    assert d["more_rows"] == 1 and d["spill"]["total"] == 2 and d["keys"] == 151
    assert {h["hint"] for h in d["hints"]} == {"scan", "port", "aborts"}
    text = toptext.table(s, labels)
    assert any(line.startswith("PID/COMM") for line in text)
    assert any(line.startswith("77/app ") and "shop/web-1" in line for line in text)
    assert any("map full: 2 resets" in line for line in text)
    assert all(len(line) <= 60 for line in toptext.table(s, labels, width=60))


def test_cli_help_has_examples_and_refuses_bad_input() -> None:
    p = build_parser()
    helptext = p._subparsers._group_actions[0].choices["top"].format_help()  # type: ignore[union-attr]
    assert "examples:" in helptext and "--peer-prefix 24" in helptext and "map full" in helptext
    args = p.parse_args(["top", "-b", "-n", "2", "--json", "--by", "pod,port", "--max-keys", "64"])
    assert (args.batch, args.iterations, args.json, args.max_keys) == (True, 2, True, 64)
