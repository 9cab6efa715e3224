"""bpf/rsttrace.h and its ctypes mirror agree on every size and offset."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile

import pytest

from rsttrace.capture import contract
from tests.testpaths import ROOT

STRUCTS = [("rsttrace_event", contract.RawEvent), ("rsttrace_counter_key", contract.CounterKey),
           ("rsttrace_top_key", contract.TopKey)]


def c_layout() -> dict:  # type: ignore[type-arg]
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed (apt-get install gcc)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/types.h>",
             '#include "%s"' % os.path.join(ROOT, "bpf", "rsttrace.h"), "int main(void) {"]
    for cname, py in STRUCTS:
        lines.append('printf("%s.__size %%zu\\n", sizeof(struct %s));' % (cname, cname))
        for fname, _t in py._fields_:
            lines.append('printf("%s.%s %%zu\\n", offsetof(struct %s, %s));' % (cname, fname, cname, fname))
    for name in ("RSTTRACE_KIND_SENT", "RSTTRACE_KIND_RECEIVED", "RSTTRACE_KIND_LISTEN_OVERFLOW_SYN",
                 "RSTTRACE_KIND_LISTEN_OVERFLOW_ACK", "RSTTRACE_KIND_SYN_QUEUE_OVERFLOW", "RSTTRACE_KIND_MAX",
                 "RSTTRACE_KIND_LISTEN_DROP", "RSTTRACE_F_LOCAL_ABORT", "RSTTRACE_F_REQUEST_SOCK",
                 "RSTTRACE_F_SYNCOOKIE",
                 "RSTTRACE_F_PROCESS", "RSTTRACE_F_ACTIVE", "RSTTRACE_F_PEER_FROM_SKB",
                 "RSTTRACE_F_NETNS_FROM_DEV", "RSTTRACE_F_KPROBE", "RSTTRACE_STAT_EVENTS", "RSTTRACE_STAT_BUFFER_FULL",
                 "RSTTRACE_STAT_COUNTER_FULL", "RSTTRACE_STAT_SUPPRESSED", "RSTTRACE_STAT_MAX", "RSTTRACE_REASON_NONE",
                 "RSTTRACE_TOP_ENTRIES_DEFAULT"):
        lines.append('printf("%s %%llu\\n", (unsigned long long)%s);' % (name, name))
    lines.append("return 0; }")
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "t.c"), os.path.join(d, "t")
        with open(src, "w") as fh:
            fh.write("\n".join(lines))
        subprocess.run([cc, "-Wall", "-Werror", "-o", exe, src], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_structs_match() -> None:
    c = c_layout()
    for cname, py in STRUCTS:
        assert c["%s.__size" % cname] == ctypes.sizeof(py), cname
        for fname, _t in py._fields_:
            assert c["%s.%s" % (cname, fname)] == getattr(py, fname).offset, (cname, fname)


def test_constants_match() -> None:
    c = c_layout()
    assert c["RSTTRACE_KIND_SENT"] == contract.KIND_SENT
    assert c["RSTTRACE_KIND_RECEIVED"] == contract.KIND_RECEIVED
    assert c["RSTTRACE_KIND_LISTEN_OVERFLOW_SYN"] == contract.KIND_LISTEN_OVERFLOW_SYN
    assert c["RSTTRACE_KIND_LISTEN_OVERFLOW_ACK"] == contract.KIND_LISTEN_OVERFLOW_ACK
    assert c["RSTTRACE_KIND_SYN_QUEUE_OVERFLOW"] == contract.KIND_SYN_QUEUE_OVERFLOW
    assert c["RSTTRACE_KIND_MAX"] == contract.KIND_MAX
    assert c["RSTTRACE_KIND_LISTEN_DROP"] == contract.KIND_LISTEN_DROP
    assert c["RSTTRACE_F_LOCAL_ABORT"] == contract.F_LOCAL_ABORT
    assert c["RSTTRACE_F_REQUEST_SOCK"] == contract.F_REQUEST_SOCK
    assert c["RSTTRACE_F_SYNCOOKIE"] == contract.F_SYNCOOKIE
    assert c["RSTTRACE_F_PROCESS"] == contract.F_PROCESS and c["RSTTRACE_F_ACTIVE"] == contract.F_ACTIVE
    assert c["RSTTRACE_F_PEER_FROM_SKB"] == contract.F_PEER_FROM_SKB
    assert c["RSTTRACE_F_NETNS_FROM_DEV"] == contract.F_NETNS_FROM_DEV
    assert c["RSTTRACE_F_KPROBE"] == contract.F_KPROBE
    assert c["RSTTRACE_STAT_BUFFER_FULL"] == contract.STAT_BUFFER_FULL
    assert c["RSTTRACE_STAT_COUNTER_FULL"] == contract.STAT_COUNTER_FULL
    assert c["RSTTRACE_STAT_SUPPRESSED"] == contract.STAT_SUPPRESSED
    assert c["RSTTRACE_STAT_MAX"] == contract.STAT_MAX and c["RSTTRACE_STAT_EVENTS"] == contract.STAT_EVENTS
    assert c["RSTTRACE_REASON_NONE"] == contract.REASON_NONE
    assert c["RSTTRACE_TOP_ENTRIES_DEFAULT"] == contract.TOP_ENTRIES_DEFAULT
