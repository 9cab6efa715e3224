"""The generated tracepoint structs lay out every field where the kernel's format says.

Checked by compiling the generated C with the system compiler and printing offsetof() of each
field: what bcc's clang will see is what the format file describes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Dict

import pytest

from rsttrace.capture import codegen
from rsttrace.kernel import facts as kernel
from rsttrace.kernel import read as kernel_read
from rsttrace.kernel.tracefs import Tracefs
from tests.testpaths import KERNEL_FORMATS

KERNELS = sorted(d for d in os.listdir(KERNEL_FORMATS) if os.path.isdir(os.path.join(KERNEL_FORMATS, d)))


def compiled_offsets(struct: str, name: str, fields: list) -> Dict[str, int]:  # type: ignore[type-arg]
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed to check generated layouts (apt-get install gcc)")
    prog = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/types.h>", struct,
            "int main(void) {"]
    for f in fields:
        prog.append('printf("%s %%zu\\n", offsetof(struct %s, %s));' % (f, name, f))
    prog.append('printf("__size %%zu\\n", sizeof(struct %s)); return 0; }' % name)
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "t.c"), os.path.join(d, "t")
        with open(src, "w") as fh:
            fh.write("\n".join(prog))
        subprocess.run([cc, "-o", exe, src], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("release", KERNELS)
@pytest.mark.parametrize("system,event", [("tcp", "tcp_send_reset"), ("tcp", "tcp_receive_reset"),
                                          ("skb", "kfree_skb")])
def test_generated_struct_matches_format(release: str, system: str, event: str) -> None:
    fmt = Tracefs(os.path.join(KERNEL_FORMATS, release)).format(system, event)
    assert fmt is not None
    text = codegen.tp_struct("tp", fmt)
    assert "enum" not in text  # no kernel type names leak into the C
    offs = compiled_offsets(text, "tp", [f.name for f in fmt.fields])
    for f in fmt.fields:
        assert offs[f.name] == f.offset, (release, event, f.name)
    assert offs["__size"] == max(f.offset + f.size for f in fmt.fields)


def facts_for(release: str) -> kernel.KernelFacts:
    return kernel_read.gather(os.path.join(KERNEL_FORMATS, release), btf_path=None, release=release)


def test_macros_618() -> None:
    m = facts_for("6.18.44-fc-v657").macros()
    assert {"HAVE_TP_SEND_RESET", "SEND_HAS_REASON", "SEND_ADDR_SOCKADDR", "HAVE_TP_RECEIVE_RESET",
            "RECV_HAS_FAMILY", "RECV_HAS_COOKIE", "HAVE_TP_LISTEN_OVERFLOW_ACK"} <= set(m)
    assert m["DROP_REASON_LISTEN_OVERFLOW"] == "40"
    # rx_sk: RSTs on request sockets and cookie-path ACK overflows, by the kernel's reason numbers
    assert (m["HAVE_TP_KFREE_SKB"], m["KFREE_HAS_RX_SK"]) == ("1", "1")
    assert (m["DROP_REASON_NOT_SPECIFIED"], m["DROP_REASON_NO_SOCKET"]) == ("2", "3")


def test_macros_612_kfree_skb_for_request_resets_only() -> None:
    m = facts_for("6.12.107+deb13-amd64").macros()
    assert "HAVE_TP_LISTEN_OVERFLOW_ACK" not in m  # TCP_LISTEN_OVERFLOW is 6.15+
    assert m["HAVE_TP_KFREE_SKB"] == "1" and m["KFREE_HAS_RX_SK"] == "1"


def test_macros_61_no_reason_no_overflow_drop_reason() -> None:
    m = facts_for("6.1.0-50-amd64").macros()
    assert "HAVE_TP_SEND_RESET" in m and "SEND_HAS_FAMILY" in m
    assert "SEND_HAS_REASON" not in m and "SEND_ADDR_SOCKADDR" not in m
    assert "HAVE_TP_LISTEN_OVERFLOW_ACK" not in m
    assert "HAVE_TP_KFREE_SKB" not in m  # reason but no rx_sk: nothing to see there


def test_macros_510_no_family() -> None:
    m = facts_for("5.10.0-32-amd64").macros()
    assert "HAVE_TP_SEND_RESET" in m and "SEND_HAS_FAMILY" not in m and "RECV_HAS_FAMILY" not in m


def test_program_text_is_self_contained() -> None:
    text = codegen.program(facts_for("6.18.44-fc-v657"))
    assert '#include "rsttrace.h"' not in text and "struct rsttrace_event {" in text
    assert "#define OFF_SK_NET -1" in text  # no BTF given: every offset unknown, reads compiled out


def test_netns_generation_follows_btf_layout() -> None:
    """The id counters are keyed by, beside the recycled inode: ns_id where one read takes it with
    inum (6.18: inum at 176, ns_id at 184), else net_cookie, else none; the C and the poller both
    follow KernelFacts.netns_gen."""
    f = facts_for("6.18.44-fc-v657")
    assert f.netns_gen is None and "NETNS_GEN_NS_ID" not in f.macros()  # no BTF given
    f.offsets.update({"OFF_NET_INUM": 176, "OFF_NET_NS_ID": 184, "OFF_NET_COOKIE": 4160})
    assert f.netns_gen == "ns_id" and f.macros()["NETNS_GEN_NS_ID"] == "1"
    f.offsets["OFF_NET_NS_ID"] = 600  # elsewhere in struct net: a second read would be needed
    assert f.netns_gen == "net_cookie" and "NETNS_GEN_COOKIE" in f.macros()
    del f.offsets["OFF_NET_NS_ID"], f.offsets["OFF_NET_COOKIE"]
    assert f.netns_gen is None
