"""Reading a capture ``rsttrace trace -w`` wrote (``rsttrace read``): blocks in either byte
order, several sections, a file cut inside a block read up to its last whole block, and each
packet's event taken back from its comment (the format is rsttrace/sinks/pcapng.py's)."""

from __future__ import annotations

import json
import struct
from dataclasses import fields
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple

from rsttrace.pipeline.events import ATTRIBUTION_FIELDS, Attribution, Event
from rsttrace.sinks.pcapng import (  # the format's constants: one definition
    BYTE_ORDER_MAGIC,
    EPB,
    IDB,
    IF_TSRESOL,
    ISB,
    ISB_FILTERACCEPT,
    ISB_IFDROP,
    ISB_IFRECV,
    ISB_OSDROP,
    ISB_USRDELIV,
    OPT_COMMENT,
    OPT_END,
    SHB,
    SPB,
    pad,
)


class FormatError(ValueError):
    """Not a pcapng file (or not one this reader understands)."""


class Packet:
    __slots__ = ("interface", "ts", "data", "comments", "linktype", "tsresol")

    def __init__(self, interface: int, ts: int, data: bytes, comments: List[str], linktype: int,
                 tsresol: int) -> None:
        self.interface, self.ts, self.data, self.comments = interface, ts, data, comments
        self.linktype, self.tsresol = linktype, tsresol


class Reader:
    """Blocks of a pcapng file, in either byte order, several sections allowed. A file that ends
    inside a block (a capture killed mid-write) yields every whole block and sets ``truncated``."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.truncated = False
        self.endian = "<"
        self.interfaces: List[Tuple[int, int]] = []  # (link type, ts units per second)
        self.stats: List[Dict[str, Any]] = []  # each ISB: its options, comments as 'comments'
        self.section_comments: List[str] = []
        self.blocks = 0

    def _read(self, n: int, inside: bool = True) -> Optional[bytes]:
        """n bytes, or None at the end of the file; ``inside`` a block, any end is a cut one."""
        b = self.f.read(n)
        if len(b) < n:
            if b or inside:
                self.truncated = True
            return None
        return b

    def blocks_iter(self) -> Iterator[Tuple[int, bytes]]:
        first = True
        while True:
            head = self._read(8, inside=False)
            if head is None:
                if first:
                    raise FormatError("not a pcapng file (%s)" % ("cut inside its first block" if self.truncated
                                                                  else "empty"))
                return
            btype = struct.unpack("<I", head[:4])[0]
            if btype == SHB:  # its own byte order magic decides how to read it and its section
                magic = self._read(4)
                if magic is None:
                    return
                if struct.unpack("<I", magic)[0] == BYTE_ORDER_MAGIC:
                    self.endian = "<"
                elif struct.unpack(">I", magic)[0] == BYTE_ORDER_MAGIC:
                    self.endian = ">"
                else:
                    raise FormatError("not a pcapng file (bad byte-order magic)")
                total = struct.unpack(self.endian + "I", head[4:])[0]
                if total < 28 or total % 4:
                    raise FormatError("bad section header length %d" % total)
                rest = self._read(total - 12)
                if rest is None:
                    return
                body = magic + rest[:-4]
            elif first:
                raise FormatError("not a pcapng file (it must start with a section header block)")
            else:
                total = struct.unpack(self.endian + "I", head[4:])[0]
                btype = struct.unpack(self.endian + "I", head[:4])[0]
                if total < 12 or total % 4:
                    raise FormatError("bad block length %d" % total)
                rest = self._read(total - 8)
                if rest is None:
                    return
                body = rest[:-4]
            first = False
            self.blocks += 1
            yield btype, body

    def _options(self, data: bytes) -> List[Tuple[int, bytes]]:
        out: List[Tuple[int, bytes]] = []
        i, e = 0, self.endian
        while i + 4 <= len(data):
            code, length = struct.unpack_from(e + "HH", data, i)
            if code == OPT_END:
                break
            out.append((code, data[i + 4:i + 4 + length]))
            i += 4 + pad(length)
        return out

    def packets(self) -> Iterator[Packet]:
        e = self.endian
        for btype, body in self.blocks_iter():
            e = self.endian
            if btype == SHB:
                self.interfaces = []
                self.section_comments += [v.decode("utf-8", "replace") for c, v in self._options(body[16:])
                                          if c == OPT_COMMENT]
            elif btype == IDB:
                linktype = struct.unpack_from(e + "H", body, 0)[0]
                resol = 1000000
                for code, v in self._options(body[8:]):
                    if code == IF_TSRESOL and v:
                        r = v[0]
                        resol = 2 ** (r & 0x7F) if r & 0x80 else 10 ** r
                self.interfaces.append((linktype, resol))
            elif btype == EPB:
                iface, hi, lo, caplen, _orig = struct.unpack_from(e + "IIIII", body, 0)
                data = body[20:20 + caplen]
                opts = self._options(body[20 + pad(caplen):])
                linktype, resol = self.interfaces[iface] if iface < len(self.interfaces) else (-1, 1000000)
                yield Packet(iface, (hi << 32) | lo, data,
                             [v.decode("utf-8", "replace") for c, v in opts if c == OPT_COMMENT], linktype, resol)
            elif btype == SPB:
                linktype, resol = self.interfaces[0] if self.interfaces else (-1, 1000000)
                yield Packet(0, 0, body[4:], [], linktype, resol)
            elif btype == ISB:
                st: Dict[str, Any] = {"comments": []}
                names = {ISB_IFRECV: "ifrecv", ISB_IFDROP: "ifdrop", ISB_FILTERACCEPT: "filteraccept",
                         ISB_OSDROP: "osdrop", ISB_USRDELIV: "usrdeliv"}
                for code, v in self._options(body[12:]):
                    if code == OPT_COMMENT:
                        st["comments"].append(v.decode("utf-8", "replace"))
                    elif code in names and len(v) == 8:
                        st[names[code]] = struct.unpack(e + "Q", v)[0]
                self.stats.append(st)


_EVENT_FIELDS = {f.name for f in fields(Event)} - {"attribution"}


def event_of(comments: List[str]) -> Optional[Event]:
    """The event an rsttrace packet's comment holds (None for any other packet)."""
    for text in comments:
        if not text.startswith("rsttrace "):
            continue
        i = text.find("{")
        if i < 0:
            continue
        try:
            d = json.loads(text[i:])
        except ValueError:
            continue
        if isinstance(d, dict):
            return event_from_dict(d)
    return None


def event_from_dict(d: Dict[str, Any]) -> Event:
    """An Event from its --json object; keys a newer rsttrace added are ignored."""
    kw = {k: v for k, v in d.items() if k in _EVENT_FIELDS}
    if isinstance(kw.get("listeners"), list):
        kw["listeners"] = tuple(kw["listeners"])
    ev = Event(**kw)
    if any(k in d for k in ATTRIBUTION_FIELDS):
        ev.attribution = Attribution(**{k: d.get(k, "") for k in ATTRIBUTION_FIELDS})
    return ev


def totals_of(stats: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The last statistics block's totals (the run's, if it ended normally)."""
    for st in reversed(stats):
        for text in st.get("comments", []):
            i = text.find("{")
            if text.startswith("rsttrace ") and i >= 0:
                try:
                    d = json.loads(text[i:])
                except ValueError:
                    continue
                if isinstance(d, dict):
                    return d
    return None


