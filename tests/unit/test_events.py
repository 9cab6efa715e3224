"""Decoding raw records into the --json contract, names from the kernel's own tables."""

from __future__ import annotations

import ctypes
import os
import socket

import pytest

from rsttrace.capture import contract as c
from rsttrace.kernel import facts as kernel
from rsttrace.kernel import read as kernel_read
from rsttrace.pipeline.events import Clock, decode, infer_sent_reason
from rsttrace.sinks.output import human, json_line
from tests.testpaths import KERNEL_FORMATS

STATES = {1: "TCP_ESTABLISHED", 2: "TCP_SYN_SENT", 6: "TCP_TIME_WAIT", 7: "TCP_CLOSE", 8: "TCP_CLOSE_WAIT",
          10: "TCP_LISTEN"}


def facts(release: str = "6.18.44-fc-v657") -> kernel.KernelFacts:
    f = kernel_read.gather(os.path.join(KERNEL_FORMATS, release), btf_path=None, release=release)
    f.tcp_states = dict(STATES)  # what BTF would give; BTF itself is tested elsewhere
    return f


def raw(**kw: object) -> c.RawEvent:
    r = c.RawEvent()
    r.reason = c.REASON_NONE
    for k, v in kw.items():
        if k in ("laddr", "raddr"):
            data = v if isinstance(v, bytes) else b""
            ctypes.memmove(getattr(r, k), data, len(data))
        elif k == "comm":
            r.comm = v  # type: ignore[assignment]
        else:
            setattr(r, k, v)
    return r


def test_sent_no_socket_ipv4() -> None:
    e = decode(raw(kind=c.KIND_SENT, reason=1, family=c.AF_INET, lport=80, rport=40000, netns=4026531840,
                   laddr=socket.inet_aton("10.0.0.1"), raddr=socket.inet_aton("10.0.0.2"), ktime_ns=1),
               facts(), Clock()).to_dict()
    assert (e["kind"], e["reason"], e["reason_raw"], e["reason_source"]) == ("sent", "NO_SOCKET", 1, "kernel")
    assert (e["laddr"], e["lport"], e["raddr"], e["rport"]) == ("10.0.0.1", 80, "10.0.0.2", 40000)
    assert e["state"] is None and e["pid"] is None and e["comm"] is None and e["cookie"] is None
    assert e["family"] == "ipv4" and e["netns"] == 4026531840


def test_unknown_reason_prints_unknown_n() -> None:
    e = decode(raw(kind=c.KIND_SENT, reason=99, family=c.AF_INET), facts(), Clock())
    assert e.reason == "unknown:99" and e.reason_raw == 99


def test_reason_numbers_follow_the_kernel() -> None:
    """The same raw number means different names on kernels whose format files differ."""
    f618, f612 = facts(), facts("6.12.107+deb13-amd64")
    diff = [n for n in f618.rst_reasons if f618.rst_reasons[n] != f612.rst_reasons.get(n)]
    for n in diff:
        assert decode(raw(kind=c.KIND_SENT, reason=n), f618, Clock()).reason == f618.rst_reasons[n]


def test_owner_only_in_process_context_ipv6() -> None:
    a = socket.inet_pton(socket.AF_INET6, "fd00::1")
    e = decode(raw(kind=c.KIND_SENT, reason=11, state=7, family=c.AF_INET6, laddr=a, raddr=a, pid=42,
                   comm=b"nginx", flags=c.F_PROCESS | c.F_ACTIVE), facts(), Clock())
    assert (e.pid, e.comm, e.state, e.laddr, e.reason) == (42, "nginx", "TCP_CLOSE", "fd00::1", "TCP_ABORT_ON_CLOSE")
    e2 = decode(raw(kind=c.KIND_SENT, reason=11, pid=42, comm=b"ksoftirqd/0"), facts(), Clock())
    assert e2.pid is None and e2.comm is None


def test_received_reason_is_inferred_from_state() -> None:
    f = facts()
    assert decode(raw(kind=c.KIND_RECEIVED, state=2), f, Clock()).reason == "ECONNREFUSED"
    assert decode(raw(kind=c.KIND_RECEIVED, state=1), f, Clock()).reason == "ECONNRESET"
    e = decode(raw(kind=c.KIND_RECEIVED, state=8), f, Clock())
    assert (e.reason, e.reason_source) == ("EPIPE", "inferred")


def test_pre_610_inference_is_marked() -> None:
    f = facts("6.1.0-50-amd64")
    e = decode(raw(kind=c.KIND_SENT, state=7, flags=c.F_ACTIVE | c.F_PROCESS), f, Clock())
    assert (e.reason, e.reason_source, e.reason_raw) == ("TCP_ABORT_ON_CLOSE", "inferred", None)
    assert infer_sent_reason("TCP_LISTEN", 0) == "INVALID_SYN"
    assert infer_sent_reason("TCP_ESTABLISHED", c.F_ACTIVE) == "NOT_SPECIFIED"


def test_listen_overflow_ack_names_drop_reason() -> None:
    e = decode(raw(kind=c.KIND_LISTEN_OVERFLOW_ACK, reason=40, state=10, backlog=5, max_backlog=4,
                   flags=c.F_PEER_FROM_SKB, family=c.AF_INET), facts(), Clock()).to_dict()
    assert (e["reason"], e["backlog"], e["max_backlog"], e["peer_from_packet"]) == ("TCP_LISTEN_OVERFLOW", 5, 4, True)


def test_unknown_state_and_time_format() -> None:
    e = decode(raw(kind=c.KIND_RECEIVED, state=55, ktime_ns=123), facts(), Clock())
    assert e.state == "unknown:55"
    assert e.time.endswith("Z") and e.time[10] == "T"


def test_output_lines() -> None:
    e = decode(raw(kind=c.KIND_SENT, reason=1, family=c.AF_INET, lport=8080, rport=54321, netns=4026532281,
                   laddr=socket.inet_aton("10.244.1.123"), raddr=socket.inet_aton("10.244.2.234")),
               facts(), Clock())
    line = human(e)
    assert len(line) < 100 and "10.244.1.123:8080 > 10.244.2.234:54321" in line and "NO_SOCKET" in line
    assert json_line(e).startswith('{"time":')


def test_readme_key_table_lists_every_json_key() -> None:
    """The README's `--json` table is the contract: every key the schema can print is in it."""
    import re

    from rsttrace.pipeline.events import json_keys
    from tests.testpaths import ROOT

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text.split("## Event keys", 1)[1].split("\n\n", 2)[1]
    listed = {name for row in table.splitlines() for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert {k for k, _doc in json_keys()} <= listed, sorted({k for k, _ in json_keys()} - listed)


def test_event_fields_are_keyword_only_for_mypy_and_py310() -> None:
    import sys

    from rsttrace.pipeline.events import Event

    if sys.version_info >= (3, 10):
        with pytest.raises(TypeError):
            Event("t", 1, "sent", None, None, None, None, None, None, None, None, None)  # type: ignore[misc]


def test_event_schema_builds_on_python_39() -> None:
    """Python 3.9 (the rig's Debian 11) has no kw_only dataclasses: there the class is a plain
    dataclass, where a field without a default may not follow one with a default."""
    from dataclasses import MISSING

    from rsttrace.pipeline.events import EVENT_FIELDS

    seen_default = False
    for f in EVENT_FIELDS:
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        assert has_default or not seen_default, "%s has no default but follows one that has" % f.name
        seen_default = seen_default or has_default
