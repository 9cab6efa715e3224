"""``rsttrace top``'s in-kernel map: the macros that build it in (bpf/rsttrace.bpf.c, RSTTRACE_TOP)
and reading its rows."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from rsttrace.capture import contract as c
from rsttrace.kernel.facts import KernelFacts

# (kind, reason raw or None, state raw, family raw, netns, port, laddr, raddr, pid, flags, comm, port_remote):
# a top row
TopTuple = Tuple[int, Optional[int], int, int, int, int, bytes, bytes, int, int, bytes, bool]

TOP_NETNS_MAX = 64  # namespaces a top filter tests in the kernel (a compare each); more: user space only
PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def top_macros(facts: KernelFacts, entries: int, netns: Optional[List[int]]) -> Dict[str, Optional[str]]:
    m: Dict[str, Optional[str]] = {"RSTTRACE_TOP": "1", "RSTTRACE_TOP_ENTRIES": str(entries)}
    syn_sent = next((v for v, n in facts.tcp_states.items() if n == "TCP_SYN_SENT"), None)
    m["RSTTRACE_TOP_SYN_SENT"] = str(syn_sent if syn_sent is not None else 0xFFFF)  # never a u8 state
    eph = ephemeral_ports()
    if eph is not None:
        m["RSTTRACE_EPH_LO"], m["RSTTRACE_EPH_HI"] = str(eph[0]), str(eph[1])
    if netns and len(netns) <= TOP_NETNS_MAX:
        tests = ("(n) == %uU" % i for i in sorted(netns))
        m["RSTTRACE_TOP_NETNS(n)"] = "(%s)" % " || ".join(tests)
    return m


_KEYS: Dict[bytes, TopTuple] = {}  # a key's bytes to its tuple: keys persist from read to read
_KEYS_MAX = 1 << 21


def _tuple(k: Any) -> TopTuple:
    family = int(k.family)
    alen = 4 if family == c.AF_INET else 16 if family == c.AF_INET6 else 0
    return (int(k.kind), None if k.reason == c.REASON_NONE else int(k.reason), int(k.state),
            family, int(k.netns), int(k.port), bytes(k.laddr)[:alen], bytes(k.raddr)[:alen],
            int(k.pid), int(k.flags), bytes(k.comm).split(b"\0", 1)[0], bool(k.port_remote))


def read_top(bpf: Any) -> Tuple[Dict[TopTuple, int], Dict[int, int]]:
    """The map's rows summed over CPUs, and the per-kind spill (the caller holds the tracer's lock).

    Read with BPF_MAP_LOOKUP_BATCH where the kernel and bcc have it (5.6+; one syscall per
    batch, measured: a full 10,240-key map in a fraction of the per-key walk's time), else key by
    key."""
    rows: Dict[TopTuple, int] = {}
    spill: Dict[int, int] = {}
    if bpf is None:
        return rows, spill
    table = bpf[b"top_counts"]
    try:
        items: Any = list(table.items_lookup_batch())
    except Exception:  # no batch ops (kernel < 5.6, old bcc): bcc raises a plain Exception
        items = table.items()
    cache = _KEYS
    if len(cache) >= _KEYS_MAX:
        cache.clear()
    for k, v in items:
        raw = bytes(k)
        key = cache.get(raw)
        if key is None:
            key = cache[raw] = _tuple(k)
        rows[key] = rows.get(key, 0) + sum(v)
    for k, v in bpf[b"top_spill"].items():
        total = sum(int(x) for x in v)
        if total:
            spill[int(k.value)] = total
    return rows, spill


def ephemeral_ports(path: str = PORT_RANGE) -> Optional[Tuple[int, int]]:
    """This namespace's ip_local_port_range (pods keep the default unless they set their own)."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    return (lo, hi) if 0 < lo <= hi <= 65535 else None
