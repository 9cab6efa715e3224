"""A small reader of the kernel's BTF: struct member offsets and enum values.

rsttrace compiles its BPF programs with bcc against whatever kernel headers are installed, and those
headers rarely match the running kernel (on a 6.18 node we build with Debian's 6.1 headers). Struct
layouts therefore never come from headers: every ``struct sock``/``sk_buff``/``net`` field a program
reads is located here, in the running kernel's own type information, and handed to the C code as a
``#define`` — the same job libbpf's CO-RE relocations do, done at start instead of at load.

Format: https://docs.kernel.org/bpf/btf.html (include/uapi/linux/btf.h). No PyPI package reads BTF,
so this implements only what rsttrace needs: walking types, members (through anonymous structs and
unions), typedef/modifier resolution and enumerators.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

BTF_MAGIC = 0xEB9F
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

# Kinds, from include/uapi/linux/btf.h.
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BtfError(Exception):
    """The BTF blob is unreadable or lacks what was asked for."""


@dataclass(frozen=True)
class Member:
    """A resolved struct member: where it lies in the outermost struct and how big it is."""

    offset: int  # bytes from the start of the outermost struct
    size: int  # bytes; for a bitfield, the size of the storage unit is not meaningful
    bitfield: bool
    type_id: int


class Btf:
    """Parsed type section of a BTF blob. Types are numbered from 1, as in the kernel."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError("not a BTF blob (bad magic 0x%x)" % magic)
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        # Per type id: (position of its btf_type record, kind, vlen, kind_flag, name_off, size_or_type)
        self._recs: List[Tuple[int, int, int, bool, int, int]] = [(0, 0, 0, False, 0, 0)]
        self._by_name: Optional[Dict[str, List[int]]] = None
        self._enumerator_index: Optional[Dict[str, int]] = None
        self._scan()

    @classmethod
    def load(cls, path: str = VMLINUX_BTF) -> Btf:
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as e:
            raise BtfError("cannot read %s: %s" % (path, e.strerror)) from e

    def _scan(self) -> None:
        data = self._data
        pos = self._types_start
        end = self._types_end
        unpack = struct.unpack_from
        recs = self._recs
        while pos < end:
            name_off, info, size_or_type = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = bool(info >> 31)
            recs.append((pos, kind, vlen, kflag, name_off, size_or_type))
            pos += 12
            if kind == KIND_INT:
                pos += 4
            elif kind == KIND_ARRAY:
                pos += 12
            elif kind in (KIND_STRUCT, KIND_UNION):
                pos += 12 * vlen
            elif kind in (KIND_ENUM, KIND_FUNC_PROTO):
                pos += 8 * vlen
            elif kind == KIND_VAR:
                pos += 4
            elif kind == KIND_DATASEC:
                pos += 12 * vlen
            elif kind == KIND_DECL_TAG:
                pos += 4
            elif kind == KIND_ENUM64:
                pos += 12 * vlen
            elif kind > KIND_ENUM64:
                raise BtfError("unknown BTF kind %d at type %d" % (kind, len(recs) - 1))

    def name(self, name_off: int) -> str:
        start = self._str_start + name_off
        end = self._data.index(b"\0", start, self._str_end)
        return self._data[start:end].decode("ascii", "replace")

    def _index(self) -> Dict[str, List[int]]:
        if self._by_name is None:
            idx: Dict[str, List[int]] = {}
            for tid in range(1, len(self._recs)):
                _pos, kind, _vlen, _kf, name_off, _st = self._recs[tid]
                if name_off and kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_TYPEDEF):
                    idx.setdefault(self.name(name_off), []).append(tid)
            self._by_name = idx
        return self._by_name

    def find(self, name: str, kinds: Tuple[int, ...] = (KIND_STRUCT, KIND_UNION)) -> int:
        """The id of the first complete type named ``name`` of one of ``kinds``."""
        for tid in self._index().get(name, []):
            if self._recs[tid][1] in kinds:
                return tid
        raise BtfError("no %s in BTF" % name)

    def resolve(self, tid: int) -> int:
        """Skip typedefs and qualifiers."""
        while self._recs[tid][1] in _MODIFIERS:
            tid = self._recs[tid][5]
        return tid

    def size(self, tid: int) -> int:
        tid = self.resolve(tid)
        pos, kind, _vlen, _kf, _no, size_or_type = self._recs[tid]
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
            return int(size_or_type)
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", self._data, pos + 12)
            return self.size(elem) * int(nelems)
        raise BtfError("type %d (kind %d) has no size" % (tid, kind))

    def members(self, tid: int) -> Iterator[Tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size) of a struct or union's direct members."""
        tid = self.resolve(tid)
        pos, kind, vlen, kflag, _no, _st = self._recs[tid]
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise BtfError("type %d is not a struct or union" % tid)
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._data, pos + 12 + 12 * i)
            bits = 0
            if kflag:
                bits = off >> 24
                off &= 0xFFFFFF
            yield self.name(name_off) if name_off else "", mtype, off, bits

    def _find_member(self, tid: int, name: str) -> Optional[Tuple[int, int, int]]:
        """(type id, bit offset, bitfield bits) of ``name`` in ``tid``, looking into anonymous members."""
        for mname, mtype, bitoff, bits in self.members(tid):
            if mname == name:
                return mtype, bitoff, bits
            if not mname and self._recs[self.resolve(mtype)][1] in (KIND_STRUCT, KIND_UNION):
                inner = self._find_member(mtype, name)
                if inner is not None:
                    return inner[0], bitoff + inner[1], inner[2]
        return None

    def member(self, path: str) -> Member:
        """Resolve ``"sock.__sk_common.skc_net"``: a struct name, then member names.

        Anonymous structs and unions are searched through, as C lets a program name their
        members directly (``sk_buff.dev`` lives inside two of them).
        """
        parts = path.split(".")
        if len(parts) < 2:
            raise BtfError("member path needs a struct and a member: %r" % path)
        tid = self.find(parts[0])
        offset_bits = 0
        bits = 0
        for i, part in enumerate(parts[1:], start=1):
            found = self._find_member(tid, part)
            if found is None:
                raise BtfError("%s has no member %s" % (".".join(parts[:i]), part))
            tid, bitoff, bits = found
            offset_bits += bitoff
        if bits == 0 and offset_bits % 8:
            raise BtfError("%s is not byte aligned" % path)
        size = (bits + 7) // 8 if bits else self.size(tid)
        return Member(offset_bits // 8, size, bits != 0, tid)

    def type_name(self, tid: int) -> str:
        """A C-like spelling of a type without qualifiers: ``struct sock *``, ``enum x``, ``int``."""
        tid = self.resolve(tid)
        _pos, kind, _vlen, _kf, name_off, size_or_type = self._recs[tid]
        if kind == KIND_PTR:
            return (self.type_name(size_or_type) if size_or_type else "void") + " *"
        name = self.name(name_off) if name_off else ""
        prefix = {KIND_STRUCT: "struct ", KIND_UNION: "union ", KIND_ENUM: "enum ", KIND_ENUM64: "enum ",
                  KIND_FWD: "struct "}.get(kind, "")
        return prefix + name if name else "<anon kind %d>" % kind

    def tracepoint_args(self, tracepoint: str) -> List[str]:
        """The argument types a raw tracepoint passes its programs, in order (``args[0]`` ...).

        From ``typedef void (*btf_trace_<name>)(void *__data, <TP_PROTO>)``, which the kernel
        declares for every tracepoint (include/linux/tracepoint.h, 5.5+) so that BPF can type
        raw tracepoint arguments; ``__data`` is the probe's own and not passed.
        """
        try:
            tid = self.find("btf_trace_" + tracepoint, (KIND_TYPEDEF,))
        except BtfError:
            raise BtfError("no prototype for tracepoint %s in BTF" % tracepoint) from None
        ptr = self.resolve(tid)
        _pos, kind, _vlen, _kf, _no, target = self._recs[ptr]
        if kind != KIND_PTR:
            raise BtfError("btf_trace_%s is not a function pointer" % tracepoint)
        proto = self.resolve(target)
        pos, kind, vlen, _kf, _no, _ret = self._recs[proto]
        if kind != KIND_FUNC_PROTO:
            raise BtfError("btf_trace_%s is not a function pointer" % tracepoint)
        types = [struct.unpack_from("<II", self._data, pos + 12 + 8 * i)[1] for i in range(vlen)]
        return [self.type_name(t) if t else "..." for t in types[1:]]

    def enumerators(self, enum_name: Optional[str] = None) -> Iterator[Tuple[str, int]]:
        """(name, value) of the enumerators of ``enum_name``, or of every enum when None."""
        if enum_name is not None:
            tids = [t for t in self._index().get(enum_name, []) if self._recs[t][1] in (KIND_ENUM, KIND_ENUM64)]
        else:
            tids = [t for t in range(1, len(self._recs)) if self._recs[t][1] in (KIND_ENUM, KIND_ENUM64)]
        for tid in tids:
            pos, kind, vlen, kflag, _no, _st = self._recs[tid]
            for i in range(vlen):
                if kind == KIND_ENUM:
                    name_off, val = struct.unpack_from("<Ii" if kflag else "<II", self._data, pos + 12 + 8 * i)
                else:
                    name_off, lo, hi = struct.unpack_from("<III", self._data, pos + 12 + 12 * i)
                    val = (hi << 32) | lo
                yield self.name(name_off), val

    def enum_value(self, enumerator: str, enum_name: Optional[str] = None) -> int:
        """The value of ``enumerator``, in ``enum_name`` or in any enum (enumerators are global in C)."""
        if enum_name is None:
            if self._enumerator_index is None:
                idx: Dict[str, int] = {}
                for name, val in self.enumerators():
                    idx.setdefault(name, val)
                self._enumerator_index = idx
            if enumerator in self._enumerator_index:
                return self._enumerator_index[enumerator]
        else:
            for name, val in self.enumerators(enum_name):
                if name == enumerator:
                    return val
        raise BtfError("no enumerator %s in BTF" % enumerator)
