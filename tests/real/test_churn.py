"""Pod churn: namespaces die and the kernel hands their inode numbers to new ones at once.

3,000 namespaces are created in turn, 20 alive at a time, each making a known number of resets
(connects to a closed port: that many RSTs sent and received). Every live namespace's counts must
be its own, never a dead predecessor's on the same inode, and the BPF counter map must hold only
about what the live namespaces need however many have come and gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import signal
import socket
import struct
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from rsttrace.kernel.read import gather
from tests.real.realkernel import require_real_kernel

CLONE_NEWNET = 0x40000000
SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
TOTAL, ALIVE = 3000, 20


def _child(resets: int, done_w: int) -> None:
    """In a forked child: a new netns with lo up, ``resets`` connects to a closed port, then wait
    to be killed (its namespace dies with it)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        os._exit(3)
    with socket.socket() as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))
    for _ in range(resets):
        c = socket.socket()
        try:
            c.connect(("127.0.0.1", 1))  # nothing listens on port 1 in a new namespace
        except ConnectionRefusedError:
            pass
        finally:
            c.close()
    os.write(done_w, b"x")
    while True:
        signal.pause()


class Pod:
    def __init__(self, resets: int) -> None:
        done_r, done_w = os.pipe()
        self.resets = resets
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(done_r)
                _child(resets, done_w)
            finally:
                os._exit(4)
        os.close(done_w)
        ok = os.read(done_r, 1)
        os.close(done_r)
        assert ok == b"x", "the namespace child failed"
        self.inode = os.stat("/proc/%d/ns/net" % self.pid).st_ino

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


@pytest.fixture(scope="module")
def counting() -> Iterator[Any]:
    """A counters-only session (as `summary` and `export --log-rate 0` run)."""
    require_real_kernel()
    from rsttrace.capture.tracer import TraceOptions
    from rsttrace.kernel import tracefs
    from rsttrace.pipeline.session import Session

    root, _ = tracefs.ensure_tracefs()
    session = Session(gather(root), TraceOptions(events=False))
    session.start()
    try:
        yield session
    finally:
        session.close()


def own_counts(session: Any, inode: int) -> Tuple[int, int]:
    sent = received = 0
    for k, n in session.counts().items():
        if k.netns == inode:
            if k.kind == "sent":
                sent += n
            elif k.kind == "received":
                received += n
    return sent, received


def test_churn_every_live_namespace_counts_only_its_own(counting: Any) -> None:
    alive: List[Pod] = []
    inodes_seen: Dict[int, int] = {}
    max_keys = 0
    retired_before = sum(counting.retired.values())
    try:
        for i in range(TOTAL):
            alive.append(Pod(1 + i % 3))
            inodes_seen[alive[-1].inode] = inodes_seen.get(alive[-1].inode, 0) + 1
            if len(alive) > ALIVE:
                alive.pop(0).kill()
            if i % ALIVE == ALIVE - 1:
                counting.poll_overflows()  # what the session's loop does every interval
                wrong = {p.inode: (own_counts(counting, p.inode), p.resets) for p in alive
                         if own_counts(counting, p.inode) != (p.resets, p.resets)}
                if wrong:
                    keys = [(k.netns, k.netns_gen, k.kind, sum(v)) for k, v in counting.tracer.bpf[b"counters"].items()
                            if k.netns in wrong]
                    names = [(k, n) for k, n in counting.counts().items() if k.netns in wrong]
                    pytest.fail("namespaces counting another's resets after %d: %s\nBPF keys %s\ncounts %s" % (
                        i + 1, wrong, keys, names))
                # the map's keys for these namespaces' inodes (other processes may count too)
                ours = [k for k in counting.tracer.counters() if k[4] in inodes_seen]
                max_keys = max(max_keys, len(ours))
    finally:
        for p in alive:
            p.kill()
    reused = TOTAL - len(inodes_seen)  # namespaces that got an inode a dead one had
    # how many got a recycled inode depends on what else creates namespaces meanwhile: a fair share
    assert reused > TOTAL // 4, "the kernel did not recycle inodes as expected (%d reused)" % reused
    # 2 keys (sent, received) per namespace: the live ones and those dying, never the history
    assert max_keys <= 4 * 2 * ALIVE, max_keys
    # nothing counted was lost: every namespace's resets are in a live series or the retired ones
    # (>=: other processes on the machine may reset connections too)
    expected = sum(1 + i % 3 for i in range(TOTAL))
    sent = sum(n for k, n in counting.counts().items() if k.kind == "sent")
    assert sent >= expected, (sent, expected)
    assert sum(counting.retired.values()) - retired_before >= 2 * (expected - 3 * 2 * ALIVE)
