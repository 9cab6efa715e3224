"""Hook selection from what a kernel offers (format files, probe-able functions), per version."""

from __future__ import annotations

import os
from typing import Dict

import pytest

from rsttrace.capture.tracer import TraceOptions, Tracer
from rsttrace.kernel import facts as kernel
from rsttrace.kernel import read as kernel_read
from tests import saved
from tests.testpaths import KERNEL_ROOTS

KERNELS = KERNEL_ROOTS


def facts(version: str) -> kernel.KernelFacts:
    root = KERNELS[version]
    f = kernel_read.gather(root, btf_path=None, release=version,
                      functions=saved.functions_fixture(os.path.join(root, "functions.txt")))
    f.tcp_states = {6: "TCP_TIME_WAIT", 10: "TCP_LISTEN", 12: "TCP_NEW_SYN_RECV"}
    return f


def planned(version: str) -> Dict[str, str]:
    """program -> hook, for what this kernel gets."""
    f = facts(version)
    m = f.macros()
    return {fn + ("" if "v6" not in hook else "@v6"): hook for fn, hook, macro in Tracer(f, TraceOptions()).plan()
            if macro in m}


# (tracepoint + kprobe for the missing resets?, final-ACK overflow source, SYN overflow source)
EXPECTED = {
    "5.4": (True, "kprobe tcp_v4_syn_recv_sock", "kprobe tcp_conn_request"),
    "5.10": (True, "kprobe tcp_v4_syn_recv_sock", "kprobe tcp_conn_request"),
    "5.15": (True, "kprobe tcp_v4_syn_recv_sock", "kprobe tcp_conn_request"),
    "6.1": (True, "kprobe tcp_v4_syn_recv_sock", "kprobe tcp_conn_request"),
    "6.8": (True, "kprobe tcp_v4_syn_recv_sock", "kprobe tcp_conn_request"),
    "6.12": (False, "kprobe tcp_v4_syn_recv_sock", "kprobe tcp_conn_request"),
    "6.12-cloud": (False, "kprobe tcp_v4_syn_recv_sock", "kprobe tcp_conn_request"),
    "6.18": (False, "tracepoint skb:kfree_skb", None),  # no kprobes on this node type
    "7.2": (False, "tracepoint skb:kfree_skb", "kprobe tcp_conn_request"),  # Debian unstable
}


@pytest.mark.parametrize("version", sorted(EXPECTED))
def test_hook_plan(version: str) -> None:
    kp_reset, ack, syn = EXPECTED[version]
    p = planned(version)
    assert p["rsttrace_send_reset"] == "tracepoint tcp:tcp_send_reset"
    assert p["rsttrace_receive_reset"] == "tracepoint tcp:tcp_receive_reset"
    assert ("rsttrace_kp_send_reset" in p) is kp_reset
    if kp_reset:
        assert p["rsttrace_kp_send_reset@v6"] == "kprobe tcp_v6_send_reset"
    ack_prog = "rsttrace_kfree_skb" if ack.startswith("tracepoint") else "rsttrace_kp_syn_recv"
    assert p[ack_prog] == ack
    if syn is None:
        assert "rsttrace_kp_conn_request" not in p
    else:
        assert p["rsttrace_kp_conn_request"] == syn


@pytest.mark.parametrize("version", sorted(EXPECTED))
def test_doctor_says_why(version: str) -> None:
    hooks = {h.kind: h for h in facts(version).hooks()}
    if EXPECTED[version][0]:
        assert "kprobe" in hooks["sent"].source and "inferred" in hooks["sent"].detail
    elif version == "6.18":
        assert "with the kernel's reason" in hooks["sent"].detail
    assert hooks["syn_queue_overflow"].source.startswith("kernel counters")


def test_no_kprobes_and_no_reason_says_what_is_missed() -> None:
    f = facts("6.1")
    f.kprobes = False
    sent = {h.kind: h for h in f.hooks()}["sent"]
    assert "NOT traced" in sent.detail and "closed port" in sent.detail
    assert "HAVE_KP_SEND_RESET" not in f.macros()


def test_live_probeable_functions_read_kallsyms(tmp_path: str) -> None:
    ks = os.path.join(tmp_path, "kallsyms")
    with open(ks, "w") as fh:
        fh.write("ffffffff82031a30 t tcp_v4_send_reset\nffffffff82022080 T tcp_conn_request\n"
                 "ffffffff82022090 d tcp_v4_syn_recv_sock\n")
    got = kernel_read.probeable_functions(None, kallsyms=ks)
    assert got["tcp_v4_send_reset"] and got["tcp_conn_request"]
    assert not got["tcp_v4_syn_recv_sock"]  # a data symbol is no function
