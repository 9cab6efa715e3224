"""`rsttrace reasons` lists every reason name the tracer can print, on every saved kernel layout."""

from __future__ import annotations

import json
from typing import Any, Set

import pytest

from rsttrace import cli
from rsttrace.capture import contract as c
from rsttrace.cli import common
from rsttrace.kernel import facts as kernel
from rsttrace.kernel import read as kernel_read
from rsttrace.pipeline.events import name_reason
from rsttrace.pipeline.overflow import DERIVED
from tests.testpaths import KERNEL_ROOTS

STATES = ["TCP_ESTABLISHED", "TCP_SYN_SENT", "TCP_SYN_RECV", "TCP_FIN_WAIT1", "TCP_FIN_WAIT2", "TCP_TIME_WAIT",
          "TCP_CLOSE", "TCP_CLOSE_WAIT", "TCP_LAST_ACK", "TCP_LISTEN", "TCP_CLOSING", "TCP_NEW_SYN_RECV", None]


def printable(facts: kernel.KernelFacts) -> Set[str]:
    """Every reason the decoder (events and counters) and the poller can produce on ``facts``."""
    out: Set[str] = set()
    ack: list = [None]  # type: ignore[type-arg]
    if facts.listen_overflow_reason is not None:
        ack.append(facts.listen_overflow_reason)
    if facts.kfree_cookie_overflow:
        ack.append(facts.drop_reason("NO_SOCKET"))
    raws = {"sent": list(facts.rst_reasons) or [None], "received": [None], "listen_overflow_ack": ack,
            "listen_overflow_syn": [None]}
    for kind, values in raws.items():
        for raw in values:
            for state in STATES:
                for flags in range(256):
                    name, _src = name_reason(facts, kind, raw, state, flags)
                    if name is not None:
                        out.add(name)
    out.update(reason for _kind, reason, _state in DERIVED.values())
    return out


@pytest.mark.parametrize("version", sorted(KERNEL_ROOTS))
def test_reasons_lists_every_printable_name(version: str, monkeypatch: Any, capsys: Any) -> None:
    facts = kernel_read.gather(KERNEL_ROOTS[version], btf_path=None, release=version)
    monkeypatch.setattr(common, "prepare", lambda need_root=True: facts)
    assert cli.main(["reasons", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    listed = {r["name"] for r in rows}
    missing = printable(facts) - listed
    assert not missing, "rsttrace reasons on %s does not list %s" % (version, sorted(missing))
    assert all(r["cause"] and r["check"] for r in rows), [r["name"] for r in rows if not r["cause"]]
    if not facts.send_has_reason:  # before 6.10 the inferred names the tracer prints
        assert {"NO_SOCKET", "TCP_TIMEWAIT_SOCKET", "TCP_ABORT_ON_DATA"} <= listed
    assert c.KIND_NAMES  # the kinds the rows name exist
    assert {r["kind"] for r in rows} <= set(c.KIND_NAMES.values())
