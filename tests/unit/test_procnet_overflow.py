"""Kernel counter parsing, and the counter-derived overflow events against a fixture /proc."""

from __future__ import annotations

import os
from typing import Dict, Optional

from rsttrace.kernel import procnet
from rsttrace.pipeline.overflow import OverflowPoller

SNMP = """Ip: Forwarding DefaultTTL
Ip: 1 64
Tcp: RtoAlgorithm RtoMin ActiveOpens OutRsts EstabResets
Tcp: 1 200 10 7 3
"""


def netstat(lo: int, drop: int = 0, cookies: int = 0, other: int = 0, embryonic: int = 0) -> str:
    # ListenDrops counts every listener drop: the overflows, the SYN-queue drops, and the rest
    return ("TcpExt: SyncookiesSent EmbryonicRsts ListenOverflows ListenDrops TCPReqQFullDrop TCPReqQFullDoCookies\n"
            "TcpExt: 0 %d %d %d %d %d\n" % (embryonic, lo, lo + drop + other, drop, cookies))


def test_parse_pairs() -> None:
    c = procnet.parse(SNMP)
    assert c["Tcp"]["OutRsts"] == 7 and c["Ip"]["DefaultTTL"] == 64
    assert procnet.get(c, "TcpExt", "ListenOverflows") == 0


class FakeProc:
    """A proc root with one pid per namespace; ns/net is a plain file, so its inode is the id."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.run_netns = os.path.join(root, "run-netns")
        os.makedirs(self.run_netns)

    def set(self, pid: int, lo: int, drop: int = 0, cookies: int = 0, other: int = 0, embryonic: int = 0) -> int:
        d = os.path.join(self.root, str(pid))
        os.makedirs(os.path.join(d, "ns"), exist_ok=True)
        os.makedirs(os.path.join(d, "net"), exist_ok=True)
        nsf = os.path.join(d, "ns", "net")
        if not os.path.exists(nsf):
            open(nsf, "w").close()
        with open(os.path.join(d, "net", "netstat"), "w") as f:
            f.write(netstat(lo, drop, cookies, other, embryonic))
        with open(os.path.join(d, "net", "snmp"), "w") as f:
            f.write(SNMP)
        return os.stat(nsf).st_ino

    def drop(self, pid: int) -> None:
        import shutil

        shutil.rmtree(os.path.join(self.root, str(pid)))


def poller(fp: FakeProc, acks: Optional[Dict[int, int]], embryonic: Optional[Dict[int, int]] = None) -> OverflowPoller:
    """``acks``: traced listen overflows per netns (None: this kernel can trace none);
    ``embryonic``: traced resets that EmbryonicRsts also counts."""
    def traced() -> Dict[int, Dict[str, int]]:
        out: Dict[int, Dict[str, int]] = {}
        for ino, n in (acks or {}).items():
            out.setdefault(ino, {})["ListenOverflows"] = n
        for ino, n in (embryonic or {}).items():
            out.setdefault(ino, {})["EmbryonicRsts"] = n
        return out

    return OverflowPoller(None, traced, proc_root=fp.root, run_netns=fp.run_netns, overflows_traced=acks is not None)


def test_history_is_not_reported_and_new_overflows_are(tmp_path: str) -> None:
    fp = FakeProc(str(tmp_path))
    ino = fp.set(100, lo=50)
    acks: Dict[int, int] = {ino: 10}
    p = poller(fp, acks)
    assert p.poll() == []  # baseline: the 50 happened before we started
    fp.set(100, lo=57)
    acks[ino] = 12  # two of the seven were final ACKs, traced by kfree_skb
    assert p.poll() == []  # one reading is not trusted yet (see the race test)
    evs = p.poll()
    assert [(e.kind, e.count, e.netns, e.source) for e in evs] == [("listen_overflow_syn", 5, ino, "counters")]
    assert p.poll() == []  # nothing new


def test_racing_read_is_made_good_later(tmp_path: str) -> None:
    fp = FakeProc(str(tmp_path))
    ino = fp.set(100, lo=0)
    acks = {ino: 0}
    p = poller(fp, acks)
    p.poll()
    fp.set(100, lo=3)  # 3 ACK overflows counted by the kernel, their BPF counts not read yet
    total = sum(e.count for e in p.poll())
    assert total == 0  # the reading that would take them for SYN overflows is not trusted alone
    acks[ino] = 3  # now they are traced; then 3 real SYN overflows follow
    fp.set(100, lo=4)
    total += sum(e.count for e in p.poll())
    fp.set(100, lo=6)
    total += sum(e.count for e in p.poll())
    total += sum(e.count for e in p.poll())
    # derived + traced == ListenOverflows, with nothing counted twice
    assert total + acks[ino] == 6


def test_namespace_born_after_start_counts_from_zero(tmp_path: str) -> None:
    fp = FakeProc(str(tmp_path))
    fp.set(1, lo=0)
    p = poller(fp, None)
    p.poll()
    ino = fp.set(200, lo=4, drop=2, cookies=1)  # created and overflowing before our first look
    evs = {(e.kind, e.reason): e for e in p.poll() if e.netns == ino}
    assert evs[("listen_overflow_syn", "ListenOverflows")].count == 4
    assert evs[("listen_overflow_syn", "ListenOverflows")].includes_ack is True  # ACKs untraceable
    assert evs[("syn_queue_overflow", "TCPReqQFullDrop")].count == 2
    assert evs[("syn_queue_overflow", "TCPReqQFullDoCookies")].count == 1
    assert sum(n for (k, _r, i, _p, _s), n in p.totals.counts.items() if i == ino) == 7


def test_reused_inode_is_a_new_namespace(tmp_path: str) -> None:
    fp = FakeProc(str(tmp_path))
    ino = fp.set(100, lo=10)
    p = poller(fp, None)
    p.poll()
    fp.set(100, lo=12)
    assert sum(e.count for e in p.poll()) == 2
    fp.set(100, lo=1)  # counters went down: another namespace now has this inode
    assert [e.count for e in p.poll() if e.netns == ino] == [1]


def test_listen_drops_alone_and_request_resets(tmp_path: str) -> None:
    """ListenDrops beyond ListenOverflows + TCPReqQFullDrop is its own kind (a SYN flood with
    syncookies off, the backlog-quarter rule); EmbryonicRsts beyond the traced embryonic resets
    is RSTs that hit a request socket."""
    fp = FakeProc(str(tmp_path))
    ino = fp.set(100, lo=0)
    emb = {ino: 0}
    p = poller(fp, {ino: 0}, emb)
    p.poll()
    fp.set(100, lo=2, drop=3, other=800, embryonic=5)
    emb[ino] = 2  # two of the five were embryonic resets this host sent (INVALID_SYN), traced
    first = {(e.kind, e.reason): e.count for e in p.poll()}
    # kernel counters alone need no second reading; what subtracts a BPF count does
    assert first == {("listen_drop", "ListenDrops"): 800, ("syn_queue_overflow", "TCPReqQFullDrop"): 3}
    assert not p.settled
    evs = {(e.kind, e.reason): e for e in p.poll()}
    assert evs[("listen_overflow_syn", "ListenOverflows")].count == 2
    got = evs[("received", "EmbryonicRsts")]
    assert (got.count, got.state, got.source) == (3, "TCP_SYN_RECV", "counters")
    assert p.settled
    assert p.poll() == []


def test_gone_namespaces_are_reported_once(tmp_path: str) -> None:
    fp = FakeProc(str(tmp_path))
    fp.set(100, lo=0)
    ino = fp.set(200, lo=0)
    p = poller(fp, None)
    p.poll()
    assert p.take_gone() == set()
    fp.drop(200)
    p.poll()
    assert p.take_gone() == {ino}
    p.poll()
    assert p.take_gone() == set()


def test_a_proc_that_cannot_be_listed_is_not_every_namespace_gone(tmp_path: str) -> None:
    """Out of descriptors, /proc cannot be listed: that poll knows nothing, and forgets nothing."""
    fp = FakeProc(str(tmp_path))
    ino = fp.set(100, lo=0)
    p = poller(fp, None)
    p.poll()
    root = fp.root
    p.proc_root = os.path.join(root, "missing")  # listdir fails as it does with EMFILE
    assert p.poll() == [] and not p.discovered
    assert p.take_gone() == set() and ino in p.base
    p.proc_root = root
    fp.set(100, lo=2)
    assert sum(e.count for e in p.poll() + p.poll()) == 2 and p.discovered  # counted once, from the old base
