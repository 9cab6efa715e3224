"""`rsttrace top` as a user runs it, against resets made on purpose in private namespaces.

One scenario, all at once: a peer scanning 1,000 closed ports and 50 peers hitting one closed port
(both from pktlab's wire, so each reset has its own peer address), and a server in a namespace
of its own that accepts and aborts every connection (SO_LINGER 0 close). Six `top -b -n 2 --json`
processes watch it, one per grouping and one whose map holds fewer keys than the scan makes;
every count is compared with what was made and with each namespace's OutRsts.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

import pytest

from tests.real.netlab import Netns, delta, wait_for
from tests.real.pktlab import HOST_ADDR, SYN, Segment, Wire
from tests.real.realkernel import require_real_kernel
from tests.real.test_cli import rsttrace, wait_ready

SCANNER = "10.77.1.200"
SCAN_PORTS = range(20000, 21000)  # 1,000 closed ports on HOST_ADDR
PEERS = ["10.77.1.%d" % i for i in range(1, 51)]  # 50 peers
PEER_SYNS = 4  # each, to one closed port
SERVICE_PORT = 8080
ABORTS = 100
# -d: long enough that six processes' compiles and the traffic fit in two samples (the rig emulates CPUs)
RIG = bool(os.environ.get("RSTTRACE_RIG"))
DELAY = 60 if RIG else 10

ABORT_SERVER = """
import socket, struct, sys
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(128)
print(srv.getsockname()[1], flush=True)
for _ in range(int(sys.argv[1])):
    c, _a = srv.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
"""


def abort_reason() -> str:
    """What this kernel calls a SO_LINGER 0 close's reset: TCP_STATE (6.12+), or rsttrace's inferred
    TCP_ABORT_ON_CLOSE where tcp_send_reset has no reason (before 6.10)."""
    from rsttrace.kernel import tracefs
    from rsttrace.kernel.read import gather

    facts = gather(tracefs.ensure_tracefs()[0])
    return "TCP_STATE" if facts.send_has_reason else "TCP_ABORT_ON_CLOSE"


def start_top(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(rsttrace("--log-format", "json", "top", "-b", "--json", "-n", "2", "-d", str(DELAY),
                                     *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def make_resets(wire: Wire, abort_ns: Netns) -> Tuple[int, int]:
    """The scenario; returns (the abort server's pid, its port)."""
    with abort_ns.inside():
        server = subprocess.Popen([sys.executable, "-c", ABORT_SERVER, str(ABORTS)], stdout=subprocess.PIPE,
                                  text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    for p in SCAN_PORTS:
        wire.send(Segment(SCANNER, HOST_ADDR, 40000, p, 1000, 0, SYN))
    for i, peer in enumerate(PEERS):
        for j in range(PEER_SYNS):
            wire.send(Segment(peer, HOST_ADDR, 30000 + i * PEER_SYNS + j, SERVICE_PORT, 5000, 0, SYN))
    with abort_ns.inside():
        for _ in range(ABORTS):
            c = socket.socket()
            try:
                c.settimeout(5)
                # the reset can beat connect()'s return (seen on the rig's emulated CPUs)
                c.connect(("127.0.0.1", port))
                assert c.recv(1) == b"", "the server sent data"
            except ConnectionResetError:
                pass
            c.close()
    assert server.wait(timeout=30) == 0
    return server.pid, port


def samples(proc: subprocess.Popen[str]) -> List[Dict[str, Any]]:
    out, err = proc.communicate(timeout=2 * DELAY + 120)
    assert proc.returncode == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert len(got) == 2, out
    return got


def rows_by(sample: Dict[str, Any], field: str) -> Dict[Any, Dict[str, Any]]:
    return {r[field]: r for r in sample["rows"]}


def ranked(sample: Dict[str, Any], field: str, expected: Dict[Any, int]) -> None:
    """Every expected group has its count, and groups with more come first."""
    rows = rows_by(sample, field)
    for key, n in expected.items():
        assert key in rows, (field, key, sample["rows"][:5])
        assert rows[key]["total"] == n, (field, key, rows[key])
    order = [r[field] for r in sample["rows"]]
    for a in expected:
        for b in expected:
            if expected[a] > expected[b]:
                assert order.index(a) < order.index(b), (field, a, b, order[:10])


@pytest.fixture()
def lab() -> Any:
    require_real_kernel()
    wire = Wire()
    abort_ns = Netns()
    try:
        yield wire, abort_ns
    finally:
        wire.close()
        abort_ns.delete()


def test_top_ranks_what_was_made(lab: Tuple[Wire, Netns]) -> None:
    wire, abort_ns = lab
    host = wire.host
    both = "%d,%d" % (host.inode, abort_ns.inode)
    procs = {
        "pod": start_top("--by", "pod", "--sort", "total", "--netns", both),
        "port": start_top("--by", "port", "--sort", "total", "--netns", both),
        "peer": start_top("--by", "peer", "--sort", "total", "--netns", both),
        "reason": start_top("--by", "reason", "--sort", "total", "--netns", both),
        "pid": start_top("--by", "pid,kind", "--sort", "total", "--netns", both),
        "full": start_top("--by", "port", "--max-keys", "64", "--netns", str(host.inode)),
    }
    try:
        first_ready = None
        for p in procs.values():
            wait_ready(p, timeout=900 if RIG else 60)  # six compiles at once
            first_ready = first_ready or time.monotonic()
        assert first_ready is not None
        ready_spread = time.monotonic() - first_ready  # the first to be ready samples first
        before_h, before_a = host.counters(), abort_ns.counters()
        t0 = time.monotonic()
        pid, port = make_resets(wire, abort_ns)
        made_in = time.monotonic() - t0
        assert ready_spread + made_in < 2 * DELAY - 2, "too slow for two samples: ready %.1fs, made %.1fs" % (
            ready_spread, made_in)
        sent_h = len(SCAN_PORTS) + len(PEERS) * PEER_SYNS
        assert wait_for(lambda: delta(before_h, host.counters(), "Tcp", "OutRsts") >= sent_h)
        got = {name: samples(p) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    out_h = delta(before_h, host.counters(), "Tcp", "OutRsts")
    out_a = delta(before_a, abort_ns.counters(), "Tcp", "OutRsts")
    assert (out_h, out_a) == (sent_h, ABORTS)

    for name, (first, last) in got.items():
        # the intervals add up to the totals, and the totals are the exact counters'
        if name != "full":
            assert last["totals"]["sent"]["total"] == out_h + out_a, (name, last["totals"])
            assert last["totals"]["received"]["total"] == ABORTS, (name, last["totals"])
            assert sum(r["total"] for r in last["rows"]) == out_h + out_a + ABORTS, name
            assert last["spill"]["total"] == 0, name
        keys = [{"pod": "netns"}.get(k, k) for k in last["by"]]
        for r in last["rows"]:
            r1 = [x for x in first["rows"] if all(x.get(k) == r.get(k) for k in keys)]
            assert r["total"] == r["interval"] + (r1[0]["total"] if r1 else 0), (name, r)

    pod = got["pod"][1]
    ranked(pod, "netns", {host.inode: sent_h, abort_ns.inode: 2 * ABORTS})
    assert rows_by(pod, "netns")[host.inode]["distinct"]["peer"] == 1 + len(PEERS)

    port_rows = got["port"][1]
    ranked(port_rows, "port", {SERVICE_PORT: len(PEERS) * PEER_SYNS, port: ABORTS, 20000: 1, 20999: 1})
    assert rows_by(port_rows, "port")[SERVICE_PORT]["distinct"]["peer"] == len(PEERS)
    assert sum(1 for r in port_rows["rows"] if r["port"] in SCAN_PORTS) == len(SCAN_PORTS)

    peer = got["peer"][1]
    ranked(peer, "peer", {SCANNER: len(SCAN_PORTS), "127.0.0.1": 2 * ABORTS, **{p: PEER_SYNS for p in PEERS}})
    assert rows_by(peer, "peer")[SCANNER]["distinct"]["port"] == len(SCAN_PORTS)

    reason = got["reason"][1]
    ranked(reason, "reason", {"NO_SOCKET": out_h, abort_reason(): ABORTS})
    assert rows_by(reason, "reason")["ECONNRESET"]["total"] == ABORTS

    by_pid = {(r["pid"], r["kind"]): r for r in got["pid"][1]["rows"]}
    assert by_pid[(pid, "sent")]["total"] == ABORTS and by_pid[(pid, "sent")]["comm"]
    assert by_pid[(None, "sent")]["total"] == out_h

    # hints say what the counts show, each naming the reason to read
    hints = {(h["hint"], h.get("peer"), h.get("port")): h for h in pod["hints"]}
    scan = hints[("scan", SCANNER, None)]
    assert scan["ports"] == len(SCAN_PORTS) and scan["reason"] == "NO_SOCKET"
    down = hints[("port", None, SERVICE_PORT)]
    assert down["peers"] == len(PEERS) and down["resets"] == len(PEERS) * PEER_SYNS
    aborts = [h for h in pod["hints"] if h["hint"] == "aborts"]
    assert len(aborts) == 1 and aborts[0]["pids"] == [pid] and aborts[0]["reason"] == abort_reason()
    assert aborts[0]["read"] == "rsttrace reasons: " + abort_reason()

    # more distinct keys than the map holds: the tail is missing and says so; totals stay exact
    first, last = got["full"]
    assert last["max_keys"] == 64 and last["keys"] == 64
    ours = sum(r["total"] for r in last["rows"])
    assert ours < sent_h and last["spill"]["total"] > 0
    # --netns is applied in the kernel too: only this namespace took keys, so rows + spill are all of it
    assert ours + last["spill"]["by_kind"]["sent"] == sent_h
    assert last["totals"]["sent"]["total"] == out_h


def test_top_screen_in_a_pty(lab: Tuple[Wire, Netns]) -> None:
    """The screen draws, re-sorts on a key, redraws on a resize and leaves the terminal as it was on q."""
    import fcntl
    import pty
    import struct
    import termios

    wire, _abort_ns = lab
    pid, fd = pty.fork()
    if pid == 0:  # the child: rsttrace on the pty
        os.environ["TERM"] = "xterm"
        os.execvp(sys.executable, rsttrace("--log-format", "json", "top", "-d", "1", "--by", "port", "--netns",
                                           str(wire.host.inode)))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    screen = bytearray()

    def read_until(pattern: bytes, timeout: float = 60.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r, _w, _x = select.select([fd], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    return False
                if not chunk:
                    return False
                screen.extend(chunk)
                if pattern in screen:
                    return True
        return False

    try:
        assert read_until(b"sort: rate"), screen[-2000:]
        for p in range(22000, 22012):  # 12 ports: a scan's hint, and every row fits 30 lines
            wire.send(Segment(SCANNER, HOST_ADDR, 40000, p, 1000, 0, SYN))
        assert read_until(b"22011"), screen[-2000:]
        assert read_until(b"hint: peer " + SCANNER.encode()), screen[-2000:]
        del screen[:]
        os.write(fd, b"s")  # rate -> total
        assert read_until(b"sort: total"), screen[-2000:]
        del screen[:]
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 90, 0, 0))
        os.kill(pid, 28)  # SIGWINCH, as a terminal sends it
        assert read_until(b"sort: total"), screen[-2000:]
        del screen[:]
        os.write(fd, b"q")
        read_until(b"\x1b[?1049l", timeout=10)  # curses leaves the alternate screen
        _pid, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert b"\x1b[?1049l" in screen, bytes(screen[-300:])
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_refused_connects_take_one_key() -> None:
    """A client's refused connects (SYN_SENT) are keyed by the port they tried, not their own
    ephemeral one: 200 of them are two keys (the reset sent, the reset received), not 201."""
    require_real_kernel()
    from tests.real.netlab import closed_port, connect_refused

    ns = Netns()
    try:
        proc = subprocess.Popen(rsttrace("--log-format", "json", "top", "-b", "--json", "-n", "1", "-d",
                                         str(DELAY // 2), "--by", "port,kind", "--netns", str(ns.inode)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(proc, timeout=900 if RIG else 60)
            with ns.inside():
                port = closed_port(socket.AF_INET, "127.0.0.1")  # from bind(0): itself ephemeral
                connect_refused(socket.AF_INET, "127.0.0.1", port, 200)
            out, err = proc.communicate(timeout=DELAY + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        d = json.loads(out)
        rows = {(r["kind"], r.get("port_of")): r for r in d["rows"]}
        assert d["keys"] == 2, d["rows"]
        assert rows[("sent", None)]["port"] == port and rows[("sent", None)]["total"] == 200
        assert rows[("received", "peer")]["port"] == port and rows[("received", "peer")]["total"] == 200
    finally:
        ns.delete()
