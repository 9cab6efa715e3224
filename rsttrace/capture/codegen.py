"""Generate the C that bcc compiles: a prelude from the kernel's facts, then bpf/rsttrace.bpf.c."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from rsttrace.kernel.facts import KernelFacts
from rsttrace.kernel.tracefs import EventFormat, Field

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPF_DIR = os.path.join(_PACKAGE, "bpf")  # installed: bpf/ is packaged as rsttrace.bpf
if not os.path.isdir(BPF_DIR):  # running from a source tree: bpf/ sits beside the package
    BPF_DIR = os.path.join(os.path.dirname(_PACKAGE), "bpf")

# Tracepoint -> the struct name the programs use for its record.
TP_STRUCTS = {
    ("tcp", "tcp_send_reset"): "rsttrace_tp_send_reset",
    ("tcp", "tcp_receive_reset"): "rsttrace_tp_receive_reset",
    ("skb", "kfree_skb"): "rsttrace_tp_kfree_skb",
}


def c_field(f: Field) -> str:
    """A declaration with the field's exact size, whatever type name the kernel used.

    Type names are not copied: `enum sk_rst_reason` or a kernel typedef may not exist in the
    headers bcc compiles with. Only size and signedness matter for reading the record.
    """
    if f.array_len is not None or f.size not in (1, 2, 4, 8):
        return "__u8 %s[%d];" % (f.name, f.size)
    if f.is_pointer:
        return "__u64 %s;" % f.name
    return "__%s%d %s;" % ("s" if f.signed else "u", f.size * 8, f.name)


def tp_struct(struct_name: str, fmt: EventFormat) -> str:
    """A packed struct laid out exactly as the format file says, padding included."""
    lines = ["/* generated from events/%s/%s/format */" % (fmt.system, fmt.name), "struct %s {" % struct_name]
    pos = 0
    for f in sorted(fmt.fields, key=lambda f: f.offset):
        if f.offset < pos:
            continue  # overlapping declarations do not occur in format files; keep the first
        if f.offset > pos:
            lines.append("\t__u8 __pad_%d[%d];" % (pos, f.offset - pos))
        lines.append("\t" + c_field(f))
        pos = f.offset + f.size
    lines.append("} __attribute__((packed));")
    return "\n".join(lines)


def macros(facts: KernelFacts, extra: Optional[Dict[str, Optional[str]]] = None) -> Dict[str, str]:
    """The kernel's macros with ``extra`` applied: it adds or overrides; a None value removes one."""
    out: Dict[str, str] = facts.macros()
    out.setdefault("RSTTRACE_RINGBUF_PAGES", "64")
    out.setdefault("RSTTRACE_COUNTER_ENTRIES", "16384")
    for name, value in (extra or {}).items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def prelude(facts: KernelFacts, macros_: Optional[Dict[str, str]] = None) -> str:
    """The #defines (default: the kernel's, see macros()) and the record structs."""
    if macros_ is None:
        macros_ = macros(facts)
    out: List[str] = ["/* rsttrace prelude for kernel %s: generated at start, do not edit */" % facts.release]
    for name in sorted(macros_):
        out.append("#define %s %s" % (name, macros_[name]))
    for (_system, name), struct_name in TP_STRUCTS.items():
        fmt = {
            "tcp_send_reset": facts.send_reset,
            "tcp_receive_reset": facts.receive_reset,
            "kfree_skb": facts.kfree_skb,
        }[name]
        if fmt is not None:
            out.append(tp_struct(struct_name, fmt))
    return "\n".join(out) + "\n"


def program(facts: KernelFacts, macros_: Optional[Dict[str, str]] = None) -> str:
    """The full C text handed to bcc (also what ``rsttrace trace --ebpf`` prints)."""
    with open(os.path.join(BPF_DIR, "rsttrace.h")) as f:
        header = f.read()
    with open(os.path.join(BPF_DIR, "rsttrace.bpf.c")) as f:
        body = f.read()
    # Inline the contract header so the text is self-contained (bcc needs no -I, and --ebpf
    # output compiles as printed).
    body = body.replace('#include "rsttrace.h"', header, 1)
    return prelude(facts, macros_) + body
