"""Which tracepoints run as raw tracepoints, and with which argument, per kernel layout.

The argument types come from each kernel's BTF prototype (saved in tracepoint-args.txt beside the
format files); the programs need struct sock_common's offsets, given here as 6.18 has them.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import pytest

from rsttrace.capture.tracer import TraceOptions, Tracer
from rsttrace.kernel import facts as kernel
from rsttrace.kernel import read as kernel_read
from tests import saved
from tests.testpaths import KERNEL_ROOTS as ROOTS

SKC_6_18 = {"OFF_SK_DADDR": 0, "OFF_SK_RCV_SADDR": 4, "OFF_SK_DPORT": 12, "OFF_SK_NUM": 14, "OFF_SK_FAMILY": 16,
            "OFF_SK_STATE": 18, "OFF_SK_NET": 48, "OFF_SK_V6_DADDR": 56, "OFF_SK_V6_RCV_SADDR": 72}


def facts(version: str, args_from: Optional[str] = None, offsets: Optional[Dict[str, int]] = None
          ) -> kernel.KernelFacts:
    root = ROOTS[version]
    tp_args = saved.tp_args_fixture(os.path.join(ROOTS[args_from or version], "tracepoint-args.txt"))
    f = kernel_read.gather(root, btf_path=None, release=version, tp_args=tp_args)
    f.offsets.update(SKC_6_18 if offsets is None else offsets)
    return f


def raw_macros(f: kernel.KernelFacts) -> Dict[str, str]:
    return {k: v for k, v in f.macros().items() if k.startswith("RAW_")}


# send: (sk, skb, reason) indexes or None; kfree_skb raw or not
EXPECTED = {
    "5.4": ((0, 1, None), False),
    "5.10": ((0, 1, None), False),
    "5.15": ((0, 1, None), False),
    "6.1": ((0, 1, None), False),
    "6.8": ((0, 1, None), False),
    # no TCP_LISTEN_OVERFLOW drop reason before 6.15, but rx_sk (6.11+): RSTs on request sockets
    # and cookie-path overflows are seen at kfree_skb
    "6.12": ((0, 1, 2), True),
    "6.12-cloud": ((0, 1, 2), True),
    "6.18": ((0, 1, 2), True),
    "7.2": ((0, 1, 2), True),
}


@pytest.mark.parametrize("version", sorted(ROOTS))
def test_raw_plan_per_kernel(version: str) -> None:
    m = raw_macros(facts(version))
    (sk, skb, reason), kfree = EXPECTED[version]
    assert (m["RAW_SEND_RESET_SK"], m["RAW_SEND_RESET_SKB"]) == (str(sk), str(skb))
    assert m.get("RAW_SEND_RESET_REASON") == (None if reason is None else str(reason))
    assert m["RAW_RECEIVE_RESET_SK"] == "0"
    assert ("RAW_KFREE_SKB" in m) == kfree
    if kfree:  # trace_kfree_skb(skb, location, reason, rx_sk)
        assert (m["RAW_KFREE_SKB_SKB"], m["RAW_KFREE_SKB_REASON"], m["RAW_KFREE_SKB_SK"]) == ("0", "2", "3")


def test_plan_names_raw_hooks_and_can_turn_them_off() -> None:
    f = facts("6.18")
    hooks = {fn: hook for fn, hook, _m in Tracer(f, TraceOptions()).plan()}
    assert hooks["rsttrace_send_reset"] == "raw_tracepoint tcp:tcp_send_reset"
    assert hooks["rsttrace_kfree_skb"] == "raw_tracepoint skb:kfree_skb"
    off = Tracer(f, TraceOptions(raw_tracepoints=False))
    assert not [k for k in off.macros() if k.startswith("RAW_")]
    assert {fn: hook for fn, hook, _m in off.plan()}["rsttrace_send_reset"] == "tracepoint tcp:tcp_send_reset"
    assert "#define RAW_" not in off.source() and "#define RAW_SEND_RESET 1" in Tracer(f, TraceOptions()).source()


def test_prototype_disagreeing_with_the_format_keeps_the_perf_tracepoint() -> None:
    """A 5.10 format (no reason) with 6.18's prototype (a reason): facts of two kernels."""
    m = raw_macros(facts("5.10", args_from="6.18"))
    assert "RAW_SEND_RESET" not in m and "RAW_RECEIVE_RESET" in m


def test_no_raw_without_prototypes_or_sock_common_offsets() -> None:
    f = kernel_read.gather(ROOTS["6.18"], btf_path=None, release="6.18")  # no BTF: no prototypes, no offsets
    assert not raw_macros(f)
    far = dict(SKC_6_18, OFF_SK_NET=4000)  # beyond one bounded read of sock_common
    assert not raw_macros(facts("6.18", offsets=far))
    missing = {k: v for k, v in SKC_6_18.items() if k != "OFF_SK_DPORT"}
    f = facts("6.18", offsets={})
    f.offsets = dict(missing)
    assert not raw_macros(f)
