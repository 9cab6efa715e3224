"""The pcapng writer and reader (rsttrace/pcapng.py) without a kernel: what `trace -w` writes
reads back as the same events, the packets are well-formed IP+TCP headers with valid
checksums and the flags each kind stands for, and a file cut anywhere reads up to its last
whole block. Real captures, tshark and tcpdump: tests/real/test_capture.py."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from rsttrace.pipeline.events import Attribution, Event
from rsttrace.pipeline.filters import EventFilter
from rsttrace.sinks import pcapng, pcapread
from rsttrace.sinks.output import human, json_line
from tests.inet import checksum

OFFSET = 1_764_000_000 * 10**9  # CLOCK_MONOTONIC -> wall clock, as a Clock would have it


def ev(**kw: object) -> Event:
    base = dict(time="2026-12-03T14:00:00.000001Z", ktime_ns=5_000_000_001, kind="sent", reason="NO_SOCKET",
                reason_raw=1, reason_source="kernel", state=None, family="ipv4", laddr="127.0.0.1", lport=1,
                raddr="127.0.0.2", rport=47016, netns=4026531833)
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


EVENTS = [
    ev(),
    ev(kind="received", reason="ECONNREFUSED", reason_raw=None, reason_source="inferred", state="TCP_SYN_SENT",
       laddr="127.0.0.2", lport=47016, raddr="127.0.0.1", rport=1, pid=4242, comm="cur\x1bl", cgroup_id=77,
       cookie=12345),
    ev(family="ipv6", laddr="fd00::1", raddr="::1", lport=443, rport=65535, state="TCP_ESTABLISHED",
       reason="TCP_ABORT_ON_CLOSE", reason_raw=5, pid=1, comm="nginx",
       attribution=Attribution(namespace="shop", pod="web-0", container="nginx", container_id="abc")),
    ev(kind="listen_overflow_ack", reason="TCP_LISTEN_OVERFLOW", reason_raw=40, state="TCP_LISTEN",
       laddr="10.0.0.1", lport=80, raddr="10.9.8.7", rport=51000, backlog=2, max_backlog=1, peer_from_packet=True),
    ev(kind="listen_overflow_syn", reason="ListenOverflows", reason_raw=None, state="TCP_LISTEN", family=None,
       laddr=None, lport=None, raddr=None, rport=None, source="counters", count=7, includes_ack=True,
       listeners=("10.0.0.1:80 (3 requests)", "[::]:443")),
    ev(kind="syn_queue_overflow", reason="TCPReqQFullDrop", reason_raw=None, state="TCP_LISTEN", family="ipv6",
       laddr="::", lport=8080, raddr=None, rport=None, source="counters", count=3, backlog=0, max_backlog=128),
    ev(kind="listen_drop", reason="ListenDrops", reason_raw=None, state=None, source="counters", raddr=None,
       rport=None),
    ev(kind="sent", reason="TCP_ABORT_ON_DATA", reason_source="inferred", reason_raw=None, local_abort=True,
       state="TCP_FIN_WAIT1"),
]


def capture_bytes(events: List[Event], final: bool = True) -> bytes:
    w = pcapng.Writer(OFFSET)
    out = w.header() + b"".join(w.event(e) for e in events)
    if final:
        out += w.stats({"delivered": len(events), "held_back": 2, "lost_kernel": 1, "lost_user": 0,
                        "kernel_counters": [{"kind": "sent", "reason": "NO_SOCKET", "state": "-", "total": 9}]},
                       OFFSET, OFFSET + 10**9, final=True)
    return out


def read(data: bytes) -> Tuple[pcapread.Reader, List[pcapread.Packet]]:
    r = pcapread.Reader(io.BytesIO(data))
    return r, list(r.packets())


def test_round_trip_prints_what_trace_printed() -> None:
    r, pkts = read(capture_bytes(EVENTS))
    assert not r.truncated
    assert len(pkts) == len(EVENTS)
    for e, p in zip(EVENTS, pkts):
        back = pcapread.event_of(p.comments)
        assert back is not None
        assert json_line(back) == json_line(e)  # --json, byte for byte
        assert human(back) == human(e)
        assert p.linktype == pcapng.LINKTYPE_RAW and p.tsresol == 10**9
        assert p.ts == e.ktime_ns + OFFSET  # the packet's time is the event's
    totals = pcapread.totals_of(r.stats)
    assert totals is not None and totals["final"] is True
    assert (totals["delivered"], totals["held_back"], totals["lost_kernel"]) == (len(EVENTS), 2, 1)
    assert r.stats[-1]["usrdeliv"] == len(EVENTS) and r.stats[-1]["ifdrop"] == 1 and r.stats[-1]["osdrop"] == 2
    assert any("reconstructed from a kernel event" in c for c in r.section_comments)


@pytest.mark.parametrize("e", EVENTS, ids=[e.kind + "-" + str(e.family) for e in EVENTS])
def test_packet_headers(e: Event) -> None:
    pkt = pcapng.packet(e)
    flags, inbound = pcapng.FLAGS[e.kind]
    if e.family == "ipv6":
        assert len(pkt) == 60 and pkt[0] >> 4 == 6
        assert struct.unpack("!H", pkt[4:6])[0] == 20 and pkt[6] == 6  # payload length, next header TCP
        src, dst, tcp = pkt[8:24], pkt[24:40], pkt[40:]
        af, zero = socket.AF_INET6, "::"
        pseudo = src + dst + struct.pack("!IxxxB", 20, 6)
    else:
        assert len(pkt) == 40 and pkt[0] == 0x45 and pkt[9] == 6
        assert struct.unpack("!H", pkt[2:4])[0] == 40
        assert checksum(pkt[:20]) == 0  # the IPv4 header checksum is valid
        src, dst, tcp = pkt[12:16], pkt[16:20], pkt[20:]
        af, zero = socket.AF_INET, "0.0.0.0"
        pseudo = src + dst + struct.pack("!xBH", 6, 20)
    assert checksum(pseudo + tcp) == 0  # the TCP checksum is valid
    sport, dport, seq, ack, off, tflags, win, _sum, urg = struct.unpack("!HHIIBBHHH", tcp)
    assert (seq, ack, off, win, urg) == (0, 0, 0x50, 0, 0)  # no payload, no options, seq/ack unknown
    assert tflags == flags
    local = (socket.inet_ntop(af, dst if inbound else src), dport if inbound else sport)
    remote = (socket.inet_ntop(af, src if inbound else dst), sport if inbound else dport)
    assert local == (e.laddr or zero, e.lport or 0)
    assert remote == (e.raddr or zero, e.rport or 0)


def test_flags_by_kind() -> None:
    assert pcapng.FLAGS["sent"] == (pcapng.TCP_RST, False)  # local -> remote
    assert pcapng.FLAGS["received"] == (pcapng.TCP_RST, True)  # remote -> local
    for kind in ("listen_overflow_syn", "syn_queue_overflow", "listen_drop"):
        assert pcapng.FLAGS[kind] == (pcapng.TCP_SYN, True)  # the peer's dropped SYN
    assert pcapng.FLAGS["listen_overflow_ack"] == (pcapng.TCP_ACK, True)  # the handshake's final ACK


def test_comment_names_the_event() -> None:
    text = pcapng.comment(EVENTS[1])
    assert text.startswith("rsttrace received ECONNREFUSED (reason inferred, state TCP_SYN_SENT)")
    assert "reconstructed from a kernel event" in text
    for key in ('"netns":4026531833', '"pid":4242', '"comm":"cur\\u001bl"', '"cgroup_id":77'):
        assert key in text  # control characters escaped: the comment is plain ASCII
    assert text.isascii()
    assert '"pod":"web-0"' in pcapng.comment(EVENTS[2]) and '"count":7' in pcapng.comment(EVENTS[4])


def test_every_cut_reads_up_to_the_last_whole_block() -> None:
    data = capture_bytes(EVENTS, final=False)
    header = len(pcapng.Writer(OFFSET).header())
    ends = [header]
    w = pcapng.Writer(OFFSET)
    for e in EVENTS:
        ends.append(ends[-1] + len(w.event(e)))
    assert ends[-1] == len(data)
    for cut in range(header, len(data) + 1):
        r, pkts = read(data[:cut])
        whole = sum(1 for end in ends[1:] if end <= cut)
        assert len(pkts) == whole, cut
        assert r.truncated == (cut not in ends), cut
        for e, p in zip(EVENTS, pkts):
            back = pcapread.event_of(p.comments)
            assert back is not None and json_line(back) == json_line(e)


def test_big_endian_section() -> None:
    """A section written on a big-endian machine: the byte-order magic decides."""
    body = struct.pack(">IHHq", pcapng.BYTE_ORDER_MAGIC, 1, 0, -1) + b"\0\0\0\0"
    shb = struct.pack(">II", pcapng.SHB, 12 + len(body)) + body + struct.pack(">I", 12 + len(body))
    idb_body = struct.pack(">HHI", pcapng.LINKTYPE_RAW, 0, 0) + struct.pack(">HH", 9, 1) + b"\x06\0\0\0" + b"\0" * 4
    idb = struct.pack(">II", 1, 12 + len(idb_body)) + idb_body + struct.pack(">I", 12 + len(idb_body))
    pkt = pcapng.packet(EVENTS[0])
    text = pcapng.comment(EVENTS[0]).encode()
    pad = b"\0" * (-len(text) % 4)
    epb_body = (struct.pack(">IIIII", 0, 0, 7, len(pkt), len(pkt)) + pkt + struct.pack(">HH", 1, len(text)) + text
                + pad + b"\0" * 4)
    epb = struct.pack(">II", 6, 12 + len(epb_body)) + epb_body + struct.pack(">I", 12 + len(epb_body))
    r, pkts = read(shb + idb + epb)
    assert len(pkts) == 1 and pkts[0].ts == 7 and pkts[0].tsresol == 10**6 and pkts[0].data == pkt
    back = pcapread.event_of(pkts[0].comments)
    assert back is not None and json_line(back) == json_line(EVENTS[0])


def test_not_pcapng() -> None:
    with pytest.raises(pcapread.FormatError):
        read(b"\xd4\xc3\xb2\xa1" + b"\0" * 20)  # a classic pcap file
    for data in (b"", b"\x0a\x0d", b"hello, world\n"):
        with pytest.raises(pcapread.FormatError, match="not a pcapng file"):
            read(data)


def test_capture_writes_whole_blocks(tmp_path: Path) -> None:
    path = os.path.join(str(tmp_path), "c.pcapng")
    cap = pcapng.Capture(path, OFFSET)
    for e in EVENTS[:3]:
        cap.add(e)
    assert os.path.getsize(path) == len(pcapng.Writer(OFFSET).header())  # gathered until a flush
    cap.flush()
    cap.stats({"delivered": 3, "held_back": 0, "lost_kernel": 0})
    cap.add(EVENTS[3])
    cap.stats({"delivered": 4, "held_back": 0, "lost_kernel": 0}, final=True)
    cap.close()
    with open(path, "rb") as f:
        r = pcapread.Reader(f)
        pkts = list(r.packets())
    assert len(pkts) == 4 and len(r.stats) == 2 and not r.truncated
    totals = pcapread.totals_of(r.stats)
    assert totals is not None and totals["delivered"] == 4 and totals["final"] is True


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run([sys.executable, "-m", "rsttrace", "--log-format", "json", *args], input=stdin,
                          capture_output=True)


def test_read_command_filters_and_formats(tmp_path: Path) -> None:
    path = os.path.join(str(tmp_path), "c.pcapng")
    with open(path, "wb") as f:
        f.write(capture_bytes(EVENTS))
    p = run("read", path, "--json")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == [json_line(e) for e in EVENTS]
    assert b'"delivered": 8' in p.stderr and b'"held_back": 2' in p.stderr
    p = run("read", path, "--json", "--reason", "no_socket", "--port", "1", "-4")
    want = [e for e in EVENTS if EventFilter(reasons={"NO_SOCKET"}, ports={1}, family="ipv4").match(e)]
    assert len(want) == 1 and p.stdout.decode().splitlines() == [json_line(want[0])]
    p = run("read", "-", "--kind", "received,listen_overflow_ack", stdin=capture_bytes(EVENTS))
    lines = p.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["TIME", "KIND"] and lines[1:] == [human(EVENTS[1]), human(EVENTS[3])]
    p = run("read", path, "--json", "--count", "2")
    assert len(p.stdout.splitlines()) == 2
    # a capture cut mid-block: what is whole, and a warning
    with open(path, "wb") as f:
        f.write(capture_bytes(EVENTS)[:-30])
    p = run("read", path, "--json")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == len(EVENTS)
    assert b"ends inside a block" in p.stderr


@pytest.mark.parametrize("args,msg", [
    (["read", "/nonexistent/x.pcapng"], "cannot read /nonexistent/x.pcapng"),
    (["read", "/etc/hostname"], "not a pcapng file"),
    (["trace", "-w", "-", "--json"], "-w - writes the capture to stdout"),
    (["read", "x", "--port", "http"], "bad port"),
])
def test_bad_input_one_line(args: List[str], msg: str) -> None:
    p = run(*args)
    assert p.returncode == 2, p.stderr
    err = p.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("rsttrace: error:") and msg in err, err
