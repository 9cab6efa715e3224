"""The BTF reader on a hand-built blob (every kind rsttrace walks) and on the running kernel's."""

from __future__ import annotations

import os
import struct
from typing import Dict, List, Tuple

import pytest

from rsttrace.kernel.btf import Btf, BtfError


class Blob:
    def __init__(self) -> None:
        self.strings = b"\0"
        self.types: List[bytes] = []
        self.offs: Dict[str, int] = {}

    def s(self, name: str) -> int:
        if not name:
            return 0
        if name not in self.offs:
            self.offs[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        return self.offs[name]

    def add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", kflag: bool = False) -> int:
        info = (kind << 24) | vlen | (1 << 31 if kflag else 0)
        self.types.append(struct.pack("<III", self.s(name), info, size_or_type) + extra)
        return len(self.types)

    def members(self, ms: List[Tuple[str, int, int]]) -> bytes:
        return b"".join(struct.pack("<III", self.s(n), t, o) for n, t, o in ms)

    def build(self) -> bytes:
        types = b"".join(self.types)
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self.strings))
        return hdr + types + self.strings


def sample() -> Btf:
    b = Blob()
    i32 = b.add("int", 1, 0, 4, struct.pack("<I", 32))
    u8 = b.add("unsigned char", 1, 0, 1, struct.pack("<I", 8))
    inner = b.add("inner", 4, 2, 8, b.members([("a", i32, 0), ("b", i32, 32)]))
    anon = b.add("", 5, 1, 8, b.members([("x", inner, 0)]))
    outer = b.add("outer", 4, 3, 24, b.members([("first", i32, 0), ("", anon, 64), ("flag", i32, (3 << 24) | 128)]),
                  kflag=True)
    b.add("outer_t", 8, 0, outer)
    b.add("colors", 6, 2, 4, struct.pack("<IiIi", b.s("RED"), 0, b.s("GREEN"), 5))
    ptr = b.add("", 2, 0, outer)
    arr = b.add("", 3, 0, 0, struct.pack("<III", u8, i32, 16))
    b.add("holder", 4, 2, 24, b.members([("arr", arr, 0), ("p", ptr, 128)]))
    b.add("big", 19, 1, 8, struct.pack("<III", b.s("HUGE"), 1, 2))  # ENUM64
    return Btf(b.build())


def test_members_through_anonymous_unions() -> None:
    btf = sample()
    m = btf.member("outer.x.b")
    assert (m.offset, m.size, m.bitfield) == (12, 4, False)
    assert btf.member("outer.first").offset == 0


def test_bitfield_and_sizes() -> None:
    btf = sample()
    assert btf.member("outer.flag").bitfield
    assert btf.member("holder.arr").size == 16
    assert btf.member("holder.p").size == 8 and btf.member("holder.p").offset == 16


def test_enums() -> None:
    btf = sample()
    assert btf.enum_value("GREEN") == 5
    assert btf.enum_value("GREEN", "colors") == 5
    assert btf.enum_value("HUGE") == (2 << 32) | 1
    with pytest.raises(BtfError):
        btf.enum_value("BLUE")


def test_errors_name_what_is_missing() -> None:
    btf = sample()
    with pytest.raises(BtfError, match="outer has no member nope"):
        btf.member("outer.nope")
    with pytest.raises(BtfError, match="no missing in BTF"):
        btf.member("missing.a")
    with pytest.raises(BtfError, match="bad magic"):
        Btf(b"\0" * 32)


@pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux"), reason="this kernel has no BTF")
def test_running_kernel() -> None:
    btf = Btf.load()
    # TCP states are ABI (inet_diag exposes them): a sanity anchor for the reader itself
    assert btf.enum_value("TCP_ESTABLISHED") == 1 and btf.enum_value("TCP_LISTEN") == 10
    assert btf.member("sock.__sk_common.skc_family").size == 2
    assert btf.member("sk_buff.transport_header").size == 2


def test_tracepoint_prototype() -> None:
    """typedef void (*btf_trace_x)(void *__data, const struct outer *, void *, enum colors)."""
    b = Blob()
    outer = b.add("outer", 4, 0, 0)
    const_outer = b.add("", 10, 0, outer)
    p_outer = b.add("", 2, 0, const_outer)
    void_p = b.add("", 2, 0, 0)
    colors = b.add("colors", 6, 1, 4, struct.pack("<Ii", b.s("RED"), 0))
    params = [("__data", void_p), ("", p_outer), ("", void_p), ("", colors)]
    proto = b.add("", 13, len(params), 0, b"".join(struct.pack("<II", b.s(n), t) for n, t in params))
    fp = b.add("", 2, 0, proto)
    b.add("btf_trace_x", 8, 0, fp)
    btf = Btf(b.build())
    assert btf.tracepoint_args("x") == ["struct outer *", "void *", "enum colors"]
    with pytest.raises(BtfError, match="no prototype for tracepoint y"):
        btf.tracepoint_args("y")
