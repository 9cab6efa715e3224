"""The fast paths (struct decode, cached names/seconds/addresses, json_line without a dict) print
exactly what the plain ones did: the --json contract and the human lines, byte for byte."""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import socket
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from rsttrace.capture import contract as c
from rsttrace.kernel import facts as kernel
from rsttrace.kernel import read as kernel_read
from rsttrace.pipeline import events
from rsttrace.pipeline.events import Attribution, Clock, Event, decode, name_reason
from rsttrace.sinks.output import human, json_line
from tests.testpaths import KERNEL_FORMATS

STATES = {1: "TCP_ESTABLISHED", 2: "TCP_SYN_SENT", 6: "TCP_TIME_WAIT", 7: "TCP_CLOSE", 8: "TCP_CLOSE_WAIT",
          10: "TCP_LISTEN"}


def facts(release: str = "6.18.44-fc-v657") -> kernel.KernelFacts:
    f = kernel_read.gather(os.path.join(KERNEL_FORMATS, release), btf_path=None, release=release)
    f.tcp_states = dict(STATES)
    return f


def reference_decode(raw: c.RawEvent, f: kernel.KernelFacts, clock: Clock) -> Event:
    """decode() as it was before the fast path: one ctypes field read at a time, datetime."""
    def addr(family: int, a: Any) -> Optional[str]:
        if family == c.AF_INET:
            return socket.inet_ntop(socket.AF_INET, bytes(a[:4]))
        if family == c.AF_INET6:
            return socket.inet_ntop(socket.AF_INET6, bytes(a))
        return None

    kind = c.KIND_NAMES.get(raw.kind, "unknown:%d" % raw.kind)
    state = f.state_name(raw.state)
    reason_raw = None if raw.reason == c.REASON_NONE else int(raw.reason)
    reason, source = name_reason(f, kind, reason_raw, state, raw.flags)
    family = raw.family
    process = bool(raw.flags & c.F_PROCESS)
    ns = raw.ktime_ns + clock.offset_ns
    t = datetime.fromtimestamp(ns // 1000 / 1e6, tz=timezone.utc).isoformat(timespec="microseconds")
    return Event(
        time=t.replace("+00:00", "Z"), ktime_ns=raw.ktime_ns, kind=kind, reason=reason, reason_raw=reason_raw,
        reason_source=source, state=state, family={2: "ipv4", 10: "ipv6"}.get(family),
        laddr=addr(family, raw.laddr), lport=raw.lport if family else None,
        raddr=addr(family, raw.raddr), rport=raw.rport if family else None,
        netns=raw.netns or None, cookie=raw.cookie or None, pid=raw.pid if process else None,
        comm=raw.comm.decode("utf-8", "replace") if process else None,
        backlog=raw.backlog if raw.max_backlog else None, max_backlog=raw.max_backlog or None,
        cgroup_id=raw.cgroup_id or None, peer_from_packet=bool(raw.flags & c.F_PEER_FROM_SKB),
        source="kprobe" if raw.flags & c.F_KPROBE else "tracepoint",
    )


def raws() -> List[c.RawEvent]:
    v4 = [socket.inet_aton(a) for a in ("10.0.0.1", "0.0.0.0", "255.255.255.255")]
    v6 = [socket.inet_pton(socket.AF_INET6, a) for a in ("fd00::1", "::ffff:10.1.2.3", "::", "2001:db8::dead:beef")]
    comms = [b"nginx", b'a"b\\c', b"\\", b"\xff\xfe bad", b"tab\there", b"0123456789abcde", b""]
    out = []
    kinds = [c.KIND_SENT, c.KIND_RECEIVED, c.KIND_LISTEN_OVERFLOW_SYN, c.KIND_LISTEN_OVERFLOW_ACK,
             c.KIND_SYN_QUEUE_OVERFLOW, 9]
    reasons = [c.REASON_NONE, 1, 2, 11, 40, 99, 123456]
    for i, (kind, reason, state, flags) in enumerate(itertools.product(
            kinds, reasons, [0, 1, 2, 6, 7, 8, 10, 55], [0, c.F_PROCESS, c.F_ACTIVE | c.F_PROCESS, c.F_ACTIVE,
                                                       c.F_PEER_FROM_SKB | c.F_KPROBE, 0x1F])):
        r = c.RawEvent()
        r.kind, r.reason, r.state, r.flags = kind, reason, state, flags
        r.ktime_ns = (i * 7919 * 1000003) % (10**15)
        r.family = (c.AF_INET, c.AF_INET6, 0, 3)[i % 4]
        a, b = (v4[i % 3], v4[(i + 1) % 3]) if r.family == c.AF_INET else (v6[i % 4], v6[(i + 2) % 4])
        if r.family in (c.AF_INET, c.AF_INET6):
            ctypes.memmove(r.laddr, a, len(a))
            ctypes.memmove(r.raddr, b, len(b))
        r.lport, r.rport = (i * 31) % 65536, (65535 if i % 5 == 0 else 0)
        r.netns = 0 if i % 6 == 0 else 4026531840 + i
        r.cookie = 0 if i % 3 else 2**64 - 1 - i
        r.cgroup_id = 0 if i % 4 else 10000 + i
        r.pid = (i * 13) % 2**32
        r.comm = comms[i % len(comms)]
        r.backlog, r.max_backlog = i % 5, (0 if i % 2 else 4096)
        out.append(r)
    return out


def dumps(e: Event) -> str:
    return json.dumps(e.to_dict(), separators=(",", ":"))


def test_struct_matches_contract() -> None:
    assert events.RAW.size == ctypes.sizeof(c.RawEvent)


def test_decode_and_lines_equal_the_plain_path() -> None:
    f, clock = facts(), Clock()
    f61 = facts("6.1.0-50-amd64")
    n = 0
    for r in raws():
        for kf in (f, f61):
            want = reference_decode(r, kf, clock)
            got = decode(bytes(r), kf, clock)
            assert got == want
            assert decode(r, kf, clock) == want  # a RawEvent still decodes
            assert json_line(got) == dumps(want)
            assert human(got) == human(want)
            n += 1
    assert n > 4000


def test_tricky_comm_is_escaped() -> None:
    r = c.RawEvent()
    r.kind, r.reason, r.flags, r.pid, r.comm = c.KIND_SENT, 11, c.F_PROCESS, 7, b'x"y\\z\x01\xc3\xa9'
    e = decode(bytes(r), facts(), Clock())
    assert e.comm == 'x"y\\z\x01\xe9'
    line = json_line(e)
    assert line == dumps(e) and json.loads(line)["comm"] == e.comm
    assert '"comm":"x\\"y\\\\z\\u0001\\u00e9"' in line


def test_json_line_for_events_built_by_hand() -> None:
    """Events from the overflow poller, attribution, the marks, and odd values take the same text."""
    base: Dict[str, Any] = dict(time="2026-11-21T22:26:17.425840Z", ktime_ns=1, kind="listen_overflow_syn",
                                reason="ListenOverflows", reason_raw=None, reason_source="kernel", state=None,
                                family=None, laddr=None, lport=8080, raddr=None, rport=None, netns=4026532281,
                                cookie=None, pid=None, comm=None)
    variants: List[Dict[str, Any]] = [
        dict(source="counters", count=3, backlog=None, max_backlog=None),
        dict(source="counters", count=2, listeners=["10.0.0.1:80", "[::]:80 (5 requests)"], includes_ack=True),
        dict(kind="syn_queue_overflow", backlog=0, max_backlog=128, cgroup_id=5),
        dict(kind="listen_drop", backlog=None, max_backlog=None, listeners=[]),
        dict(kind="sent", attribution=Attribution(namespace="", pod="", container="podman1", container_id="ab")),
        dict(kind="sent", attribution=Attribution(namespace="ns\"1", pod="p\\od", container="c\u00e9",
                                                  container_id="x")),
        dict(kind="sent", local_abort=True, syncookie=True, reason="TCP_ABORT_ON_DATA"),
        dict(kind="received", reason_raw=True, count=True, peer_from_packet=True),
        dict(kind="received", reason_raw=1.0, count=1.0, lport=True),
        dict(kind="received", reason_raw=1, count=1),
        dict(kind="unknown:9", cgroup_id=0, state="unknown:55", comm="\u2603"),
    ]
    for v in variants:
        e = Event(**{**base, **v})
        assert json_line(e) == dumps(e), v
        human(e)


def test_iso_per_second_cache_equals_datetime() -> None:
    clock = Clock()
    for ktime in [0, 1, 999, 1000, 999_999_999, 1_000_000_000, 123_456_789_012_345, 10**15 + 999_999,
                  *range(5_000_000_000, 5_010_000_000, 999_983)]:
        ns = ktime + clock.offset_ns
        want = datetime.fromtimestamp(ns // 1000 / 1e6, tz=timezone.utc).isoformat(timespec="microseconds")
        assert clock.iso(ktime) == want.replace("+00:00", "Z")


def test_address_cache_stays_bounded_under_a_scan() -> None:
    f, clock = facts(), Clock()
    r = c.RawEvent()
    r.kind, r.reason, r.family = c.KIND_SENT, 1, c.AF_INET
    for i in range(3 * events.ADDR_CACHE_MAX):
        ctypes.memmove(r.raddr, i.to_bytes(4, "big"), 4)
        assert decode(bytes(r), f, clock).raddr == socket.inet_ntoa(i.to_bytes(4, "big"))
    assert len(events._addr_cache) <= events.ADDR_CACHE_MAX
