"""`rsttrace trace -w FILE.pcapng` on real resets, read back by tshark, tcpdump and `rsttrace read`.

Resets of several kinds are made in a namespace of their own (closed port over IPv4 and IPv6,
abort on close with SO_LINGER 0, data to a TIME_WAIT socket, final ACKs meeting a full accept
queue with tcp_abort_on_overflow=1) while one `trace --json -w FILE` runs: every packet tshark
reads has the event's flags, addresses and ports and names its reason; the events equal the
namespace's own counters; `read --json` prints trace's lines. A capture killed mid-write opens
up to its last whole block.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from rsttrace.sinks import pcapread
from tests.real.netlab import Netns, closed_port, connect_refused, delta, linger0, overflow_on_ack, pair
from tests.real.test_cli import refused, rsttrace, run_rsttrace, wait_ready

FLAGS = {"sent": "0x0004", "received": "0x0004", "listen_overflow_syn": "0x0002", "syn_queue_overflow": "0x0002",
         "listen_drop": "0x0002", "listen_overflow_ack": "0x0010"}
INBOUND = {"sent": False}  # every other kind is a packet from the peer


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail("%s is not installed: scripts/install --test installs it" % name)
    return path


def make_resets(ns: Netns) -> None:
    """Every kind this test captures, then the namespace left quiet."""
    ns.sysctl("net.ipv4.tcp_abort_on_overflow", "1")
    with ns.inside():
        connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), 3)
        connect_refused(socket.AF_INET6, "::1", closed_port(socket.AF_INET6, "::1"), 3)
        srv, cl, acc = pair()  # abort on close: SO_LINGER 0
        linger0(acc)
        acc.close()
        srv2, cl2, acc2 = pair()  # data to a TIME_WAIT socket
        cl2.close()
        time.sleep(0.2)
        acc2.send(b"late data")
        time.sleep(0.2)
        port, socks = overflow_on_ack("127.0.0.1", clients=4, backlog=1)
        time.sleep(0.5)
        for i, s in enumerate(socks):
            if i:
                linger0(s)
            s.close()
        for s in (srv, cl, srv2, acc2):
            s.close()
    prev = ns.counters()
    for _ in range(30):  # until the namespace's counters stand still
        time.sleep(0.3)
        cur = ns.counters()
        if cur == prev:
            break
        prev = cur


def test_capture_of_real_resets(ns: Netns, tmp_path: Path) -> None:
    cap = str(tmp_path / "resets.pcapng")
    proc = subprocess.Popen(rsttrace("--log-format", "json", "trace", "--json", "--all-events", "--netns",
                                     str(ns.inode), "-w", cap, "--overflow-interval", "0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(proc)
        before = ns.counters()
        make_resets(ns)
        after = ns.counters()
        time.sleep(0.5)  # the last events and a counter poll
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    events: List[Dict[str, Any]] = [json.loads(line) for line in lines]

    # the events are the namespace's own counts
    sent = [e for e in events if e["kind"] == "sent"]
    assert len(sent) == delta(before, after, "Tcp", "OutRsts") >= 9
    overflows = sum(e["count"] for e in events if e["kind"] in ("listen_overflow_syn", "listen_overflow_ack"))
    assert overflows == delta(before, after, "TcpExt", "ListenOverflows") >= 2
    assert {e["family"] for e in sent if e["reason"] == "NO_SOCKET"} == {"ipv4", "ipv6"}
    assert len({e["reason"] for e in sent}) >= 3  # closed port, abort on close, TIME_WAIT, overflow's reset

    # tshark reads every packet: flags, addresses and ports are the event's, the comment names it
    fields = ("frame.number", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport",
              "tcp.flags", "tcp.seq_raw", "tcp.len", "frame.comment")
    ts = subprocess.run([tool("tshark"), "-n", "-r", cap, "-T", "fields", "-E", "separator=/t", "-E", "occurrence=f",
                         *[a for f in fields for a in ("-e", f)]], capture_output=True, text=True, timeout=120)
    assert ts.returncode == 0, ts.stderr
    rows = [dict(zip(fields, row.split("\t"))) for row in ts.stdout.splitlines()]
    assert len(rows) == len(events)
    for e, row in zip(events, rows):
        local, remote = (e["laddr"], str(e["lport"])), (e["raddr"], str(e["rport"]))
        ip = "ipv6" if e["family"] == "ipv6" else "ip"
        src_dst = (row[ip + ".src"], row[ip + ".dst"])
        src, dst = (remote, local) if INBOUND.get(e["kind"], True) else (local, remote)
        assert (src_dst[0], row["tcp.srcport"]) == src and (src_dst[1], row["tcp.dstport"]) == dst, (e, row)
        assert row["tcp.flags"] == FLAGS[e["kind"]], (e, row)
        assert row["tcp.len"] == "0" and row["tcp.seq_raw"] == "0"  # headers only
        comment = row["frame.comment"]
        assert comment.startswith("rsttrace %s %s " % (e["kind"], e["reason"])), comment
        assert "reconstructed from a kernel event" in comment
        assert comment[comment.index("{"):] == lines[events.index(e)]  # the event's --json line itself
    # the totals: the last statistics block, after every packet
    capinfos = subprocess.run([tool("tshark"), "-r", cap, "-q", "-z", "io,stat,0"], capture_output=True, text=True)
    assert capinfos.returncode == 0, capinfos.stderr
    with open(cap, "rb") as f:
        reader = pcapread.Reader(f)
        assert len(list(reader.packets())) == len(events) and not reader.truncated
    totals = pcapread.totals_of(reader.stats)
    assert totals is not None and totals["final"] is True
    assert (totals["delivered"], totals["packets"], totals["lost_kernel"], totals["held_back"]) == (
        len(events), len(events), 0, 0)
    kernel_sent = sum(c["total"] for c in totals["kernel_counters"] if c["kind"] == "sent")
    assert kernel_sent == len(sent)  # the in-kernel counters say what the file holds

    # tcpdump reads it too
    td = subprocess.run([tool("tcpdump"), "-nn", "-r", cap], capture_output=True, text=True, timeout=60)
    assert td.returncode == 0, td.stderr
    td_lines = td.stdout.splitlines()
    assert len(td_lines) == len(events)
    assert sum("Flags [R]" in ln for ln in td_lines) == sum(e["kind"] in ("sent", "received") for e in events)

    # rsttrace read --json prints what trace --json printed, byte for byte; the human lines too
    rd = subprocess.run(rsttrace("--log-format", "json", "read", cap, "--json"), capture_output=True, text=True)
    assert rd.returncode == 0, rd.stderr
    assert rd.stdout == out
    rd = subprocess.run(rsttrace("read", cap, "--kind", "sent", "-6"), capture_output=True, text=True)
    assert rd.returncode == 0, rd.stderr
    human = rd.stdout.splitlines()
    assert human[0].split()[:2] == ["TIME", "KIND"]
    assert len(human) - 1 == sum(e["kind"] == "sent" and e["family"] == "ipv6" for e in events) >= 3
    assert all(" SENT " in ln and "[::1]" in ln for ln in human[1:])


def storm(ns: Netns, stop: threading.Event) -> int:
    n = 0
    with ns.inside():
        port = closed_port(socket.AF_INET, "127.0.0.1")
        while not stop.is_set():
            connect_refused(socket.AF_INET, "127.0.0.1", port, 20)
            n += 20
    return n


def tshark_count(path: str) -> Tuple[int, int]:
    p = subprocess.run([tool("tshark"), "-n", "-r", path, "-T", "fields", "-e", "frame.number"],
                       capture_output=True, text=True, timeout=120)
    return p.returncode, len(p.stdout.splitlines())


def test_killed_capture_opens_up_to_its_last_whole_block(ns: Netns, tmp_path: Path) -> None:
    cap = str(tmp_path / "killed.pcapng")
    proc = subprocess.Popen(rsttrace("--log-format", "json", "trace", "--all-events", "--netns", str(ns.inode),
                                     "-w", cap), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    th = threading.Thread(target=storm, args=(ns, stop), daemon=True)
    try:
        wait_ready(proc)
        assert proc.stdout is not None and proc.stdout.read(0) == ""  # -w alone: nothing on stdout
        th.start()
        end = time.monotonic() + 30
        while os.path.getsize(cap) < 400_000 and time.monotonic() < end:  # ~700 packets
            time.sleep(0.05)
        proc.kill()  # SIGKILL while events keep coming: no statistics block at the end
        proc.wait(timeout=10)
    finally:
        stop.set()
        th.join(timeout=10)
        if proc.poll() is None:
            proc.kill()
    with open(cap, "rb") as f:
        data = f.read()
    r = pcapread.Reader(io.BytesIO(data))
    whole = list(r.packets())
    assert len(whole) > 500
    # the writer writes whole blocks in one write(): tshark reads exactly what rsttrace reads
    rc, n = tshark_count(cap)
    assert n == len(whole)
    assert (rc != 0) == r.truncated  # tshark says so only when the kill cut a write short
    # cut inside the last packet block, as a crash inside that write would: every block before it opens
    cut = str(tmp_path / "cut.pcapng")
    ends, pos = [], 0
    while pos < len(data):  # block boundaries, from each block's length
        pos += int.from_bytes(data[pos + 4:pos + 8], "little")
        ends.append(pos)
    with open(cut, "wb") as f:
        f.write(data[:ends[-2] + (ends[-1] - ends[-2]) // 2])
    rc, n = tshark_count(cut)
    with open(cut, "rb") as f:
        r2 = pcapread.Reader(f)
        cut_packets = list(r2.packets())
    assert r2.truncated and n == len(cut_packets) == len(whole) - 1
    assert rc != 0  # tshark says the file was cut short, after printing every whole packet
    rd = subprocess.run(rsttrace("--log-format", "json", "read", cut, "--json"), capture_output=True, text=True)
    assert rd.returncode == 0 and len(rd.stdout.splitlines()) == len(whole) - 1
    assert "ends inside a block" in rd.stderr


def test_write_to_a_pipe(ns: Netns) -> None:
    """`trace -w - | rsttrace read -`: the capture on stdout, nothing else there."""
    rc, out, err, (before, after) = run_rsttrace(
        ("--log-format", "json", "trace", "-w", "-", "--netns", str(ns.inode), "--count", "4"),
        lambda _proc: refused(ns, 2), binary=True)
    assert rc == 0, err
    assert out[:4] == b"\x0a\x0d\x0d\x0a"
    rd = subprocess.run(rsttrace("read", "-", "--json"), input=out, capture_output=True)
    assert rd.returncode == 0, rd.stderr
    events = [json.loads(line) for line in rd.stdout.splitlines()]
    assert len(events) == 4
    assert sum(e["kind"] == "sent" for e in events) == 2 == delta(before, after, "Tcp", "OutRsts")
