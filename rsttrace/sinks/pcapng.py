"""pcapng for ``rsttrace trace -w`` and ``rsttrace read``: every event as one reconstructed packet.

The file holds four block types, written here with ``struct`` (python-pcapng and dpkt were
measured against it; see the README): a Section Header Block, one Interface Description Block
(link type raw IP, nanosecond timestamps), one Enhanced Packet Block per event and Interface
Statistics Blocks with the run's totals (every few seconds, and a last one at exit). Each block
is written whole, so a process killed mid-run leaves a file that opens up to its last block.

**The packet** is an IPv4 or IPv6 header and a 20-byte TCP header, never payload: the event's
addresses and ports, RST for a reset (sent: local to remote; received: remote to local), SYN for a
connection attempt a listener dropped (``listen_overflow_syn``, ``syn_queue_overflow``,
``listen_drop``), ACK for the handshake's final ACK an accept queue refused
(``listen_overflow_ack``). Sequence and acknowledgment numbers are 0: the kernel's record does
not carry them. Without an address (a counter-derived event with no listener named) the packet
has ``0.0.0.0``/``::`` and port 0. Checksums are computed, so tcpdump -v and Wireshark's checks
do not flag the packets.

**The comment** (``opt_comment``) is one line: a short text naming the kind, reason, its source
and the state, saying that the packet was reconstructed from a kernel event, then the event's
``--json`` object (netns, pid/comm, cgroup_id, pod/container when attributed, count...). ``rsttrace
read`` takes the object back, so ``read --json`` prints exactly the lines ``trace --json`` did.

**One interface, the namespace in the comment** (``"netns":N``): a namespace's inode is reused by
the next namespace at once, pods come and go by the thousand, and counter-derived events may have
no namespace; an interface per inode would name different namespaces the same and grow without
bound. Wireshark filters on the comment: ``frame.comment contains "\\"netns\\":4026532281"``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from rsttrace import __version__
from rsttrace.pipeline.events import Event
from rsttrace.pipeline.filters import EventFilter
from rsttrace.pipeline.session import Session, group
from rsttrace.sinks.output import json_line

SHB, IDB, EPB, ISB, SPB = 0x0A0D0D0A, 1, 6, 5, 3
BYTE_ORDER_MAGIC = 0x1A2B3C4D
LINKTYPE_RAW = 101  # the packet starts with its IP header; the version nibble says 4 or 6
OPT_END, OPT_COMMENT = 0, 1
SHB_HARDWARE, SHB_OS, SHB_USERAPPL = 2, 3, 4
IF_NAME, IF_DESCRIPTION, IF_TSRESOL = 2, 3, 9
ISB_STARTTIME, ISB_ENDTIME, ISB_IFRECV, ISB_IFDROP, ISB_FILTERACCEPT, ISB_OSDROP, ISB_USRDELIV = range(2, 9)

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
# the packet each kind stands for: flags, and whether it travels remote -> local
FLAGS = {
    "sent": (TCP_RST, False),
    "received": (TCP_RST, True),
    "listen_overflow_syn": (TCP_SYN, True),
    "syn_queue_overflow": (TCP_SYN, True),
    "listen_drop": (TCP_SYN, True),
    "listen_overflow_ack": (TCP_ACK, True),
}
RECONSTRUCTED = "packet reconstructed from a kernel event by rsttrace (headers only, seq/ack 0)"
SECTION_COMMENT = ("TCP resets and listen-queue drops traced by rsttrace %s: each packet is reconstructed from a "
                   "kernel event (not captured wire bytes); its comment holds the event as rsttrace trace --json "
                   "prints it. Run totals (delivered, held back, lost, in-kernel counters) are in the interface "
                   "statistics comments, the last one written at exit." % __version__)

# an Enhanced Packet Block up to its comment's text, in one pack: type, total length, interface,
# ts high, ts low, captured and original length, the packet (IPv4 40 bytes, IPv6 60), the
# comment option's code and length
_EPB_HEAD = {40: struct.Struct("<IIIIIII40sHH"), 60: struct.Struct("<IIIIIII60sHH")}
_OPT = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")
_END = b"\0\0\0\0"
_TAILS = tuple(p + _END for p in _PADS)  # the comment's padding and opt_endofopt


def pad(n: int) -> int:
    return (n + 3) & ~3


def _option(code: int, value: bytes) -> bytes:
    return _OPT.pack(code, len(value)) + value + _PADS[len(value) & 3]


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return _U32.pack(btype) + _U32.pack(total) + body + _U32.pack(total)


def _fold(n: int) -> int:
    """The one's-complement checksum of a big-endian number's 16-bit words: the sum of the words
    is the number modulo 0xffff (2**16 = 1 mod 0xffff), with 0xffff standing for a non-zero 0."""
    r = n % 0xFFFF
    if r == 0 and n:
        r = 0xFFFF
    return 0xFFFF - r


_ROUTE_MAX = 4096  # (family, addresses, direction) combinations remembered; a storm repeats a few
_routes: Dict[Tuple[bool, Optional[str], Optional[str], bool], Tuple[bytes, int]] = {}


def _route(v6: bool, laddr: Optional[str], raddr: Optional[str], inbound: bool) -> Tuple[bytes, int]:
    """The IP header for these addresses, in this direction, and the part of the TCP checksum
    it fixes (the pseudo-header's addresses, protocol and length): computed once per pair."""
    af, n = (socket.AF_INET6, 16) if v6 else (socket.AF_INET, 4)
    la = socket.inet_pton(af, laddr) if laddr else bytes(n)
    ra = socket.inet_pton(af, raddr) if raddr else bytes(n)
    src, dst = (ra, la) if inbound else (la, ra)
    addrs = int.from_bytes(src + dst, "big")
    if v6:
        ip = _IP6.pack(0x60000000, 20, 6, 64, src, dst)
    else:
        # version/IHL/TOS 0x4500, total length 40, DF 0x4000, TTL 64/protocol 6 0x4006, the addresses
        ip = _IP4.pack(0x45, 0, 40, 0, 0x4000, 64, 6, _fold(0x4500 + 40 + 0x4000 + 0x4006 + addrs), src, dst)
    if len(_routes) >= _ROUTE_MAX:
        _routes.clear()
    # one's-complement sums from the words that are not zero: the pseudo-header's addresses,
    # protocol 6 and TCP length 20, and the TCP header's data offset (5 words)
    r = _routes[(v6, laddr, raddr, inbound)] = (ip, addrs % 0xFFFF + 26 + 0x5000)
    return r


def packet(ev: Event) -> bytes:
    """The IP + TCP header an event stands for (module docstring)."""
    flags, inbound = FLAGS.get(ev.kind, (TCP_RST, False))
    v6 = ev.family == "ipv6"
    ip, partial = _routes.get((v6, ev.laddr, ev.raddr, inbound)) or _route(v6, ev.laddr, ev.raddr, inbound)
    lp, rp = ev.lport or 0, ev.rport or 0
    sport, dport = (rp, lp) if inbound else (lp, rp)
    return ip + _TCP.pack(sport, dport, 0, 0, 0x50, flags, 0, _fold(partial + sport + dport + flags), 0)


_prefix_cache: Dict[Tuple[str, Optional[str], Optional[str], Optional[str]], str] = {}


def _prefix(ev: Event) -> str:
    key = (ev.kind, ev.reason, ev.reason_source, ev.state)
    prefix = _prefix_cache.get(key)
    if prefix is None:
        if len(_prefix_cache) >= 4096:
            _prefix_cache.clear()
        prefix = _prefix_cache[key] = "rsttrace %s %s (reason %s, state %s); %s: " % (
            ev.kind, ev.reason or "-", ev.reason_source or "-", ev.state or "-", RECONSTRUCTED)
    return prefix


def comment(ev: Event) -> str:
    """The packet's comment: a short text, then the event's --json object (ASCII: json_line
    escapes, the names are the kernel's)."""
    return _prefix(ev) + json_line(ev)


class Writer:
    """Blocks as bytes; the caller writes them (``Capture`` does, in whole blocks)."""

    def __init__(self, clock_offset_ns: int) -> None:
        self.offset = clock_offset_ns  # CLOCK_MONOTONIC -> wall clock, the events' Clock's

    def header(self, hardware: str = "", interface: str = "rsttrace") -> bytes:
        opts = (_option(OPT_COMMENT, SECTION_COMMENT.encode())
                + _option(SHB_OS, ("Linux %s" % os.uname().release).encode())
                + _option(SHB_USERAPPL, ("rsttrace %s" % __version__).encode()))
        if hardware:
            opts += _option(SHB_HARDWARE, hardware.encode())
        shb = _block(SHB, _U32.pack(BYTE_ORDER_MAGIC) + struct.pack("<HHq", 1, 0, -1) + opts + _END)
        idb_opts = (_option(IF_NAME, interface.encode())
                    + _option(IF_DESCRIPTION, b"TCP resets and listen drops, reconstructed from kernel events")
                    + _option(IF_TSRESOL, b"\x09") + _END)
        idb = _block(IDB, struct.pack("<HHI", LINKTYPE_RAW, 0, 0) + idb_opts)
        return shb + idb

    def event(self, ev: Event) -> bytes:
        """One Enhanced Packet Block: the hot path of ``trace -w``."""
        pkt = packet(ev)
        text = (_prefix(ev) + json_line(ev)).encode()
        n = len(text)
        plen = len(pkt)  # 40 or 60: a multiple of 4
        total = 28 + plen + 4 + pad(n) + 4 + 4
        ts = ev.ktime_ns + self.offset
        return (_EPB_HEAD[plen].pack(EPB, total, 0, ts >> 32, ts & 0xFFFFFFFF, plen, plen, pkt, OPT_COMMENT, n)
                + text + _TAILS[n & 3] + _U32.pack(total))

    def stats(self, totals: Dict[str, Any], start_ns: int, now_ns: int, final: bool) -> bytes:
        """An Interface Statistics Block: the standard counts (isb_usrdeliv: delivered,
        isb_ifdrop: lost in the kernel's buffer, isb_osdrop: held back by the event budget) and a
        comment with every total as JSON (``totals``)."""
        what = "run totals at exit" if final else "run totals so far (a later block supersedes this)"
        text = "rsttrace %s: %s" % (what, json.dumps(dict(totals, final=final), separators=(",", ":"), sort_keys=True))
        opts = b"".join((
            _option(OPT_COMMENT, text.encode()),
            _option(ISB_STARTTIME, struct.pack("<II", start_ns >> 32, start_ns & 0xFFFFFFFF)),
            _option(ISB_ENDTIME, struct.pack("<II", now_ns >> 32, now_ns & 0xFFFFFFFF)),
            _option(ISB_IFDROP, struct.pack("<Q", int(totals.get("lost_kernel", 0)))),
            _option(ISB_OSDROP, struct.pack("<Q", int(totals.get("held_back", 0)))),
            _option(ISB_USRDELIV, struct.pack("<Q", int(totals.get("delivered", 0)))),
            _END,
        ))
        return _block(ISB, struct.pack("<III", 0, now_ns >> 32, now_ns & 0xFFFFFFFF) + opts)


class Capture:
    """A pcapng file being written: blocks gathered per poll and written whole with os.write, so
    no block is ever half in the file unless the process dies inside that one write."""

    def __init__(self, path: str, clock_offset_ns: Optional[int] = None, hardware: str = "") -> None:
        """Opens (creates, truncates) ``path`` at once, so a path that cannot be written is said
        before anything is compiled; ``clock_offset_ns`` may come later (``set_clock``)."""
        self.path = path
        if path == "-":
            sys.stdout.flush()
            self.fd = sys.stdout.fileno()
            self._own = False
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            self._own = True
        self.writer = Writer(0)
        self.pending: List[bytes] = [self.writer.header(hardware)]
        self.packets = 0
        self.start_ns = 0
        self.set_clock(clock_offset_ns if clock_offset_ns is not None else time.time_ns() - time.monotonic_ns())
        self.flush()

    def set_clock(self, clock_offset_ns: int) -> None:
        """CLOCK_MONOTONIC -> wall clock: the events' own Clock's offset, so packet times equal
        their ``time``."""
        self.writer.offset = clock_offset_ns
        self.start_ns = clock_offset_ns + time.monotonic_ns()

    def add(self, ev: Event) -> None:
        self.pending.append(self.writer.event(ev))
        self.packets += 1
        if len(self.pending) >= 256:
            self.flush()

    def stats(self, totals: Dict[str, Any], final: bool = False) -> None:
        now = self.writer.offset + time.monotonic_ns()
        self.pending.append(self.writer.stats(totals, self.start_ns, now, final))
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = memoryview(b"".join(self.pending))
        self.pending.clear()
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def close(self) -> None:
        self.flush()
        if self._own:
            os.close(self.fd)


def run_totals(session: Session, packets: int, filt: Optional[EventFilter] = None) -> Dict[str, Any]:
    """What a capture does not contain, for its statistics blocks: events delivered (written),
    held back by the event budget, lost, and the in-kernel counters (kind, reason, state) within
    the trace's kind, namespace and family filters, as ``summary`` shows them (the counters
    always count everything; reasons, ports and addresses are not filtered in them)."""
    lost = session.lost()
    f = filt or EventFilter()
    counts = {k: n for k, n in session.counts().items() if f.match_count(k.kind, k.netns, k.family)}
    counters: List[Dict[str, Any]] = [
        {"kind": k, "reason": r, "state": s, "total": n} for (k, r, s), n in sorted(group(counts).items())]
    scope = {"netns": f.netns, "kinds": f.kinds, "family": f.family}
    return {"delivered": session.delivered, "packets": packets, "held_back": lost["suppressed"],
            "lost_kernel": lost["lost_kernel"], "lost_user": lost["lost_user"],
            "counter_map_full": lost["counter_map_full"], "kernel_counters": counters,
            "kernel_counters_scope": {k: v for k, v in scope.items() if v is not None}}
