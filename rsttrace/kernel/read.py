"""Reading the facts at start: tracefs format files, BTF, and which kernel functions exist.

:func:`gather` fills a :class:`~rsttrace.kernel.facts.KernelFacts` from the live kernel or from
a saved copy of one (tests/fixtures): the same code reads both.
"""

from __future__ import annotations

import os
import platform
from typing import Dict, List, Optional, Tuple

from rsttrace.kernel.btf import Btf, BtfError
from rsttrace.kernel.facts import OFFSET_PURPOSE, OFFSETS, RAW_ROLES, KernelFacts
from rsttrace.kernel.tracefs import EventFormat, Tracefs


def _numeric_table(fmt: Optional[EventFormat], field_name: str) -> Dict[int, str]:
    if fmt is None:
        return {}
    out: Dict[int, str] = {}
    for value, name in fmt.symbolic(field_name):
        try:
            out[int(value, 0)] = name
        except ValueError:
            continue
    return out


def _ringbuf_supported(btf: Optional[Btf]) -> bool:
    """BPF_MAP_TYPE_RINGBUF exists in this kernel's enum bpf_map_type (5.8+)."""
    if btf is None:
        return False
    try:
        btf.enum_value("BPF_MAP_TYPE_RINGBUF", "bpf_map_type")
        return True
    except BtfError:
        return False


KPROBE_FUNCTIONS = ("tcp_v4_send_reset", "tcp_v6_send_reset", "tcp_conn_request", "tcp_v4_syn_recv_sock",
                    "tcp_v6_syn_recv_sock")


def probeable_functions(tracefs_root: Optional[str], kallsyms: str = "/proc/kallsyms") -> Dict[str, bool]:
    """Which of KPROBE_FUNCTIONS exist as functions in this kernel (not inlined away).

    available_filter_functions lists what ftrace can hook; where it cannot be read (some
    lockdown setups) /proc/kallsyms text symbols stand in: kprobes need only the symbol.
    """
    wanted = set(KPROBE_FUNCTIONS)
    found: Dict[str, bool] = {fn: False for fn in KPROBE_FUNCTIONS}
    sources = []
    if tracefs_root:
        sources.append((os.path.join(tracefs_root, "available_filter_functions"), 0))
    sources.append((kallsyms, 2))
    for path, column in sources:
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) > column:
                        name = parts[column]
                        if name in wanted and (column == 0 or parts[1] in ("t", "T")):
                            found[name] = True
            return found
        except OSError:
            continue
    return found


def gather(tracefs_root: Optional[str], btf_path: Optional[str] = "/sys/kernel/btf/vmlinux",
           release: Optional[str] = None, functions: Optional[Tuple[bool, Dict[str, bool]]] = None,
           tp_args: Optional[Dict[str, List[str]]] = None) -> KernelFacts:
    """Read every fact rsttrace needs. Fixture directories work as well as the live kernel;
    ``functions`` replaces the live kprobe/function check (fixtures: functions_fixture()) and
    ``tp_args`` the BTF tracepoint prototypes (tp_args_fixture())."""
    facts = KernelFacts(release=release or platform.release(), tracefs=tracefs_root, btf_path=None)
    if functions is not None:
        facts.kprobes, facts.hookable = functions
    elif tracefs_root:
        facts.kprobes = os.path.exists(os.path.join(tracefs_root, "kprobe_events"))
        facts.hookable = probeable_functions(tracefs_root) if facts.kprobes else {}
    if tracefs_root:
        tfs = Tracefs(tracefs_root)
        facts.send_reset = tfs.format("tcp", "tcp_send_reset")
        facts.receive_reset = tfs.format("tcp", "tcp_receive_reset")
        facts.kfree_skb = tfs.format("skb", "kfree_skb")
    else:
        facts.warnings.append("tracefs not available: no tracepoint can be attached")

    btf: Optional[Btf] = None
    if btf_path and os.path.exists(btf_path):
        try:
            btf = Btf.load(btf_path)
            facts.btf_path = btf_path
        except BtfError as e:
            facts.warnings.append("BTF unreadable (%s): struct fields will not be read" % e)
    else:
        facts.warnings.append(
            "no BTF at %s (CONFIG_DEBUG_INFO_BTF): netns, state of received resets, owner pid, "
            "listener details and TCP state names are unavailable" % btf_path
        )

    facts.rst_reasons = _numeric_table(facts.send_reset, "reason")
    facts.drop_reasons = _numeric_table(facts.kfree_skb, "reason")
    if facts.kfree_skb is not None and facts.kfree_skb.has("reason"):
        for raw, name in facts.drop_reasons.items():
            if name == "TCP_LISTEN_OVERFLOW":
                facts.listen_overflow_reason = raw

    if tp_args is not None:
        facts.tp_args = dict(tp_args)
    if btf is not None:
        missing: List[str] = []
        for macro, (paths, size) in OFFSETS.items():
            for path in paths:
                try:
                    mem = btf.member(path)
                except BtfError:
                    continue
                if mem.size == size and not mem.bitfield:
                    facts.offsets[macro] = mem.offset
                    break
            else:
                missing.append(macro)
        if "OFF_NET_NS_ID" in facts.offsets or "OFF_NET_COOKIE" in facts.offsets:
            missing = [m for m in missing if m not in ("OFF_NET_NS_ID", "OFF_NET_COOKIE")]  # one suffices
        degraded = sorted({OFFSET_PURPOSE[m] for m in missing})
        if degraded:
            facts.warnings.append("BTF lacks fields for: %s (left empty)" % ", ".join(degraded))
        facts.ringbuf = _ringbuf_supported(btf)
        if tp_args is None:
            for tp in RAW_ROLES:
                try:
                    facts.tp_args[tp] = btf.tracepoint_args(tp)
                except BtfError:
                    continue  # no prototype (before 5.5): the perf tracepoint is used
        # TCP state names: the tracepoints print them symbolically (TCP_ESTABLISHED, ...);
        # BTF gives the numbers. Read the names from the format file so new states appear too.
        names = [n for _v, n in (facts.send_reset.symbolic("state") if facts.send_reset else [])]
        if not names:
            names = [
                "TCP_ESTABLISHED", "TCP_SYN_SENT", "TCP_SYN_RECV", "TCP_FIN_WAIT1", "TCP_FIN_WAIT2",
                "TCP_TIME_WAIT", "TCP_CLOSE", "TCP_CLOSE_WAIT", "TCP_LAST_ACK", "TCP_LISTEN",
                "TCP_CLOSING", "TCP_NEW_SYN_RECV",
            ]  # names only; values still come from BTF
        for n in names:
            try:
                facts.tcp_states[btf.enum_value(n)] = n
            except BtfError:
                continue
        facts.tcp_listen = next((v for v, n in facts.tcp_states.items() if n == "TCP_LISTEN"), None)
    return facts
