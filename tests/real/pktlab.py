"""A peer that speaks TCP from user space, for cases a socket cannot make on demand.

Two private namespaces joined by a veth pair: the *host* side (a real kernel TCP stack, the
one rsttrace watches) and the *wire* side, which has no address at all. Frames are written and
read on the wire end with an AF_PACKET socket, so the wire namespace's kernel never answers
them (no address: it sends no RST of its own), and the test decides every segment: SYNs from
many spoofed sources (a SYN flood), a RST for a SYN-ACK (what a scanner's kernel sends), or a
final ACK held back until the accept queue is full (the SYN-cookie path).

Only addresses inside these two namespaces are used (a private /24 routed to the veth); no
frame leaves them.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from rsttrace.kernel import netns as nsmod
from tests.inet import checksum
from tests.real.netlab import Netns

ETH_P_IP = 0x0800
ETH_P_ALL = 0x0003
HOST_ADDR = "10.77.0.1"
GATEWAY = "10.77.0.254"  # the wire side's only "address": a static neighbour entry, never configured

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
# How long the wire stays silent before a round is over: longer under the rig's emulated CPUs.
QUIET = 1.5 if os.environ.get("RSTTRACE_RIG") else 0.3


@dataclass
class Segment:
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes = b""


def build(seg: Segment) -> bytes:
    """An IPv4 + TCP packet (no options) with correct checksums."""
    tcp = struct.pack("!HHIIBBHHH", seg.sport, seg.dport, seg.seq & 0xFFFFFFFF, seg.ack & 0xFFFFFFFF,
                      5 << 4, seg.flags, 65535, 0, 0) + seg.payload
    src, dst = socket.inet_aton(seg.src), socket.inet_aton(seg.dst)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.randrange(65536), 0x4000, 64,
                     socket.IPPROTO_TCP, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp


def parse(frame: bytes) -> Optional[Segment]:
    if len(frame) < 14 + 40 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != socket.IPPROTO_TCP:
        return None
    total = struct.unpack_from("!H", ip, 2)[0]
    sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", ip, ihl)
    payload = ip[ihl + (off >> 4) * 4:total]
    return Segment(socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), sport, dport, seq, ack, flags, payload)


class Wire:
    """``host``: a namespace with a kernel listener at HOST_ADDR; ``peer``: the raw wire end."""

    def __init__(self) -> None:
        self.host = Netns()
        self.peer = Netns()
        tag = uuid.uuid4().hex[:6]
        self.h_if, self.p_if = "rth" + tag, "rtp" + tag
        run = lambda *a: subprocess.run(list(a), check=True)  # noqa: E731
        run("ip", "link", "add", self.h_if, "netns", self.host.name, "type", "veth", "peer", "name", self.p_if,
            "netns", self.peer.name)
        run("ip", "-n", self.host.name, "addr", "add", HOST_ADDR + "/32", "dev", self.h_if)
        run("ip", "-n", self.host.name, "link", "set", self.h_if, "up")
        run("ip", "-n", self.peer.name, "link", "set", self.p_if, "up")
        # Every peer address is behind GATEWAY, whose MAC is the wire end's: no ARP, any source.
        self.peer_mac = self._mac(self.peer, self.p_if)
        self.host_mac = self._mac(self.host, self.h_if)
        run("ip", "-n", self.host.name, "route", "add", GATEWAY + "/32", "dev", self.h_if)
        run("ip", "-n", self.host.name, "neigh", "add", GATEWAY, "lladdr", self.peer_mac, "dev", self.h_if,
            "nud", "permanent")
        run("ip", "-n", self.host.name, "route", "add", "10.77.1.0/24", "via", GATEWAY, "dev", self.h_if)
        with nsmod.entered(self.peer.path):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((self.p_if, 0))
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)

    @staticmethod
    def _mac(ns: Netns, ifname: str) -> str:
        out = subprocess.run(["ip", "-n", ns.name, "-o", "link", "show", ifname], check=True,
                             capture_output=True, text=True).stdout
        return out.split("link/ether ")[1].split()[0]

    def send(self, seg: Segment) -> None:
        eth = bytes.fromhex(self.host_mac.replace(":", "")) + bytes.fromhex(self.peer_mac.replace(":", ""))
        self.sock.send(eth + struct.pack("!H", ETH_P_IP) + build(seg))

    def receive(self, timeout: float = 0.5) -> List[Segment]:
        """Segments the host sent, until nothing arrives for ``timeout`` seconds."""
        out: List[Segment] = []
        last = time.monotonic()
        while time.monotonic() - last < timeout:
            try:
                frame = self.sock.recv(65536)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            seg = parse(frame)
            if seg is not None and seg.src == HOST_ADDR:
                out.append(seg)
                last = time.monotonic()
        return out

    def listener(self, port: int, backlog: int) -> socket.socket:
        """A kernel listener on the host side at HOST_ADDR:port."""
        with nsmod.entered(self.host.path):
            srv = socket.socket()
        srv.bind((HOST_ADDR, port))
        srv.listen(backlog)
        return srv

    def syn_acks(self, n: int, port: int, first_sport: int, isn: int) -> Dict[Tuple[str, int], Segment]:
        """SYNs from n peers; the host's SYN-ACKs, by (peer address, peer port): all n answered."""
        for i in range(n):
            self.send(Segment(peer_addr(i), HOST_ADDR, first_sport + i, port, isn, 0, SYN))
        got = syn_ack_of(self.receive(QUIET))
        assert len(got) == n, "the host answered %d of %d SYNs" % (len(got), n)
        return got

    def close(self) -> None:
        self.sock.close()
        self.host.delete()
        self.peer.delete()


def peer_addr(i: int) -> str:
    return "10.77.1.%d" % (1 + i % 250)


def syn_ack_of(segs: List[Segment]) -> Dict[Tuple[str, int], Segment]:
    return {(s.dst, s.dport): s for s in segs if s.flags & (SYN | ACK) == SYN | ACK}
