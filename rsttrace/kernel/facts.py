"""What the running kernel offers, read at start: tracepoint layouts, reason names, offsets.

Nothing here is keyed on a version number. Each fact comes from the kernel's own description of
itself — tracefs format files for tracepoint records and their ``__print_symbolic`` tables, BTF
for struct layouts and enum values — so a kernel that renumbers ``sk_rst_reason`` (6.12 did) or
moves a ``struct sock`` field is handled without a release of ours. Missing pieces become
warnings and the dependent feature is switched off, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from rsttrace.kernel.hooks import Hook, coverage, hook_macros
from rsttrace.kernel.tracefs import EventFormat

# C macro -> BTF member paths, first that resolves wins. Expected size guards against a field
# that kept its name but changed type (we would read garbage otherwise).
OFFSETS: Dict[str, Tuple[Tuple[str, ...], int]] = {
    "OFF_SK_NET": (("sock.__sk_common.skc_net.net",), 8),
    "OFF_NET_INUM": (("net.ns.inum",), 4),
    "OFF_NET_NS_ID": (("net.ns.ns_id",), 8),
    "OFF_NET_COOKIE": (("net.net_cookie",), 8),
    "OFF_SK_STATE": (("sock.__sk_common.skc_state",), 1),
    "OFF_SK_FAMILY": (("sock.__sk_common.skc_family",), 2),
    "OFF_SK_NUM": (("sock.__sk_common.skc_num",), 2),
    "OFF_SK_RCV_SADDR": (("sock.__sk_common.skc_rcv_saddr",), 4),
    "OFF_SK_V6_RCV_SADDR": (("sock.__sk_common.skc_v6_rcv_saddr",), 16),
    "OFF_SK_DADDR": (("sock.__sk_common.skc_daddr",), 4),
    "OFF_SK_DPORT": (("sock.__sk_common.skc_dport",), 2),
    "OFF_SK_V6_DADDR": (("sock.__sk_common.skc_v6_daddr",), 16),
    "OFF_INET_SPORT": (("inet_sock.inet_sport",), 2),
    "OFF_SK_LOCK_OWNED": (("sock.sk_lock.owned",), 4),
    "OFF_SK_COOKIE": (("sock.__sk_common.skc_cookie",), 8),
    "OFF_SK_ACK_BACKLOG": (("sock.sk_ack_backlog",), 4),
    "OFF_SK_MAX_ACK_BACKLOG": (("sock.sk_max_ack_backlog",), 4),
    "OFF_SK_CGROUP": (("sock.sk_cgrp_data.cgroup",), 8),
    "OFF_CGROUP_KN": (("cgroup.kn",), 8),
    "OFF_KN_ID": (("kernfs_node.id",), 8),
    "OFF_SKB_HEAD": (("sk_buff.head",), 8),
    "OFF_SKB_NETWORK_HEADER": (("sk_buff.network_header",), 2),
    "OFF_SKB_TRANSPORT_HEADER": (("sk_buff.transport_header",), 2),
    "OFF_SKB_DEV": (("sk_buff.dev",), 8),
    "OFF_SKB_PROTOCOL": (("sk_buff.protocol",), 2),
    "OFF_DEV_NET": (("net_device.nd_net.net",), 8),
}

# What each offset is needed for, to say what degrades when one is missing.
OFFSET_PURPOSE = {
    "OFF_SK_NET": "netns of events",
    "OFF_NET_INUM": "netns of events",
    "OFF_NET_NS_ID": "telling a new namespace on a reused inode from the old one",
    "OFF_NET_COOKIE": "telling a new namespace on a reused inode from the old one",
    "OFF_SK_STATE": "state of received resets",
    "OFF_SK_FAMILY": "family where the tracepoint lacks it",
    "OFF_SK_NUM": "listener port of overflows",
    "OFF_SK_RCV_SADDR": "listener address of overflows",
    "OFF_SK_V6_RCV_SADDR": "listener address of overflows",
    "OFF_SK_DADDR": "addresses from raw tracepoints",
    "OFF_SK_DPORT": "addresses from raw tracepoints",
    "OFF_SK_V6_DADDR": "addresses from raw tracepoints",
    "OFF_INET_SPORT": "local port of a closing socket from raw tracepoints",
    "OFF_SK_LOCK_OWNED": "pid/comm of the socket owner",
    "OFF_SK_COOKIE": "socket cookie of sent resets",
    "OFF_SK_ACK_BACKLOG": "listener backlog",
    "OFF_SK_MAX_ACK_BACKLOG": "listener backlog",
    "OFF_SK_CGROUP": "cgroup id of the socket owner",
    "OFF_CGROUP_KN": "cgroup id of the socket owner",
    "OFF_KN_ID": "cgroup id of the socket owner",
    "OFF_SKB_HEAD": "peer address from the packet",
    "OFF_SKB_NETWORK_HEADER": "peer address from the packet",
    "OFF_SKB_TRANSPORT_HEADER": "peer address from the packet",
    "OFF_SKB_DEV": "netns of no-socket resets",
    "OFF_SKB_PROTOCOL": "IPv4-mapped final ACKs counted once",
    "OFF_DEV_NET": "netns of no-socket resets",
}


# What a raw tracepoint program needs from its arguments, found by type in the tracepoint's BTF
# prototype (names are not recorded there). Absent roles are fine where marked optional below.
RAW_ROLES: Dict[str, Dict[str, str]] = {
    "tcp_send_reset": {"SK": "struct sock *", "SKB": "struct sk_buff *", "REASON": "enum sk_rst_reason"},
    "tcp_receive_reset": {"SK": "struct sock *"},
    "kfree_skb": {"SKB": "struct sk_buff *", "REASON": "enum skb_drop_reason", "SK": "struct sock *"},
}

# struct sock_common fields a raw program reads in one bpf_probe_read_kernel (family, state and
# netns first: every counted reset needs them; the rest are an event's addresses).
SKC_REQUIRED = ("OFF_SK_FAMILY", "OFF_SK_STATE", "OFF_SK_NET", "OFF_SK_NUM", "OFF_SK_DPORT", "OFF_SK_RCV_SADDR",
                "OFF_SK_DADDR")
SKC_OPTIONAL = ("OFF_SK_V6_RCV_SADDR", "OFF_SK_V6_DADDR")  # absent without CONFIG_IPV6
SKC_MAX_READ = 128  # bytes: sock_common's head; more would be reading for fields we do not need


def raw_arg_roles(types: List[str], roles: Dict[str, str]) -> Dict[str, int]:
    """Role -> index into ``ctx->args`` for a raw tracepoint, by the first argument of each type.

    ``const`` is already stripped by Btf.type_name, so the match is on the bare spelling.
    """
    out: Dict[str, int] = {}
    for role, want in roles.items():
        for i, t in enumerate(types):
            if t == want:
                out[role] = i
                break
    return out


@dataclass
class KernelFacts:
    release: str
    tracefs: Optional[str]
    btf_path: Optional[str]
    send_reset: Optional[EventFormat] = None
    receive_reset: Optional[EventFormat] = None
    kfree_skb: Optional[EventFormat] = None
    rst_reasons: Dict[int, str] = field(default_factory=dict)
    drop_reasons: Dict[int, str] = field(default_factory=dict)
    tcp_states: Dict[int, str] = field(default_factory=dict)
    offsets: Dict[str, int] = field(default_factory=dict)
    listen_overflow_reason: Optional[int] = None
    tcp_listen: Optional[int] = None
    ringbuf: bool = False
    kprobes: bool = False  # the kernel has kprobes (CONFIG_KPROBES: tracefs kprobe_events)
    hookable: Dict[str, bool] = field(default_factory=dict)  # function -> can be probed
    # tracepoint -> argument types of its raw form, from BTF (btf_trace_<name>); empty: none
    tp_args: Dict[str, List[str]] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    @property
    def send_has_reason(self) -> bool:
        return self.send_reset is not None and self.send_reset.has("reason")

    def kprobe_ok(self, fn: str) -> bool:
        return self.kprobes and self.hookable.get(fn, False)

    # --- the hook plan: decided from what this kernel offers, never from its version -------
    @property
    def kp_send_reset(self) -> bool:
        """Hook tcp_v4/v6_send_reset for the resets the tracepoint misses.

        A tcp_send_reset without a ``reason`` field is the old TRACE_EVENT, which the kernel
        emits only for full sockets (tcp_v4_send_reset: ``if (sk && sk_fullsock(sk))``); the
        6.10 rewrite that added ``reason`` also made it fire for every reset.
        """
        return self.send_reset is not None and not self.send_has_reason and self.kprobe_ok("tcp_v4_send_reset")

    @property
    def kp_syn_recv(self) -> bool:
        """Final ACKs meeting a full accept queue, where kfree_skb has no TCP_LISTEN_OVERFLOW."""
        return self.listen_overflow_reason is None and self.kprobe_ok("tcp_v4_syn_recv_sock")

    @property
    def kfree_rx_sk(self) -> bool:
        """kfree_skb names the receiving socket (``rx_sk``, 6.11+) and the drop ``reason``: a RST
        hitting a request socket and a cookie ACK meeting a full accept queue are seen there."""
        k = self.kfree_skb
        return k is not None and k.has("reason") and k.has("rx_sk") and all(
            self.drop_reason(n) is not None for n in ("NOT_SPECIFIED", "NO_SOCKET"))

    @property
    def netns_gen(self) -> Optional[str]:
        """The never-reused namespace id the programs key counters by, beside the inode the kernel
        recycles: "ns_id" (ns_common.ns_id, 6.18+, within 8 bytes after inum: one read takes
        both), "net_cookie" (5.12+), or None. User space asks a namespace the same id
        (NS_GET_ID, SO_NETNS_COOKIE) to tell which generation of an inode is live."""
        inum = self.offsets.get("OFF_NET_INUM", -1)
        if inum < 0:
            return None
        if 0 < self.offsets.get("OFF_NET_NS_ID", -1) - inum <= 8:
            return "ns_id"
        return "net_cookie" if self.offsets.get("OFF_NET_COOKIE", -1) >= 0 else None

    @property
    def kfree_cookie_overflow(self) -> bool:
        """Cookie-path final-ACK overflows at kfree_skb (NO_SOCKET, a listener with a full accept
        queue), unless the syn_recv_sock kprobe already counts them (it sees the cookie path too)."""
        return self.kfree_rx_sk and not self.kp_syn_recv

    @property
    def kfree_skb_hook(self) -> bool:
        """Attach the kfree_skb program: it has something to see on this kernel."""
        return self.listen_overflow_reason is not None or self.kfree_rx_sk

    def drop_reason(self, name: str) -> Optional[int]:
        return next((v for v, n in self.drop_reasons.items() if n == name), None)

    @property
    def kp_conn_request(self) -> bool:
        """SYNs meeting a full accept queue: no tracepoint on any kernel, a probe where possible."""
        return self.kprobe_ok("tcp_conn_request")

    # --- raw tracepoints ---------------------------------------------------------------
    def skc_read_len(self) -> Optional[int]:
        """Bytes of struct sock_common a raw program reads at once, None if it cannot."""
        if any(self.offsets.get(m, -1) < 0 for m in SKC_REQUIRED):
            return None
        end = 0
        for m in SKC_REQUIRED + SKC_OPTIONAL:
            off = self.offsets.get(m, -1)
            if off >= 0:
                end = max(end, off + OFFSETS[m][1])
        return end if end <= SKC_MAX_READ else None

    def raw_args(self, tracepoint: str) -> Dict[str, int]:
        """Role -> ``ctx->args`` index where a raw program can replace the tracepoint, else {}.

        A raw tracepoint runs the program straight from the trace call, with the arguments the
        kernel passed (include/trace/bpf_probe.h, __bpf_trace_##call); a perf tracepoint first
        fills a record (perf_trace_##call: a buffer, TP_fast_assign, the caller's registers)
        and then runs it. Paired in one bench run (bench/results/2026-11-22-full.json), counters
        only went from 0.885 to 0.988 of the untraced overflow storm and from 0.960 to 1.028 of
        the abort storm.
        The prototype must agree with the format file (a reason on both or neither), or the
        facts come from different kernels (saved fixtures with this host's BTF).
        """
        types = self.tp_args.get(tracepoint)
        if not types or self.skc_read_len() is None:
            return {}
        roles = raw_arg_roles(types, RAW_ROLES[tracepoint])
        usable = {
            "tcp_send_reset": "SK" in roles and "SKB" in roles and ("REASON" in roles) == self.send_has_reason,
            "tcp_receive_reset": "SK" in roles,
            "kfree_skb": set(roles) == {"SK", "SKB", "REASON"} and self.kfree_skb_hook,
        }
        return roles if usable[tracepoint] else {}

    def hooks(self) -> List[Hook]:
        """Per event kind, what sees it on this kernel (rsttrace.kernel.hooks.coverage)."""
        return coverage(self)

    @property
    def send_reset_usable(self) -> bool:
        s = self.send_reset
        return s is not None and bool(_addr_layout(s)) and s.has("skaddr") and s.has("skbaddr")

    @property
    def receive_reset_usable(self) -> bool:
        r = self.receive_reset
        return r is not None and bool(_addr_layout(r)) and r.has("skaddr")

    def macros(self) -> Dict[str, str]:
        """#defines the BPF program is built with (see bpf/rsttrace.bpf.c)."""
        m: Dict[str, str] = {}
        for name in OFFSETS:
            m[name] = str(self.offsets.get(name, -1))
        # 0xFFFF never equals a u8 state: the comparison is then simply never true.
        m["RSTTRACE_TCP_LISTEN"] = str(self.tcp_listen if self.tcp_listen is not None else 0xFFFF)
        for name in ("TCP_TIME_WAIT", "TCP_NEW_SYN_RECV", "TCP_SYN_RECV", "TCP_FIN_WAIT1", "TCP_FIN_WAIT2"):
            v = next((k for k, n in self.tcp_states.items() if n == name), None)
            m["RSTTRACE_" + name] = str(v if v is not None else 0xFFFF)
        m.update(hook_macros(self))  # HAVE_* of the hook table's rows, RAW_* where raw
        s = self.send_reset
        if s is not None and self.send_reset_usable:
            if s.has("reason"):
                m["SEND_HAS_REASON"] = "1"
            if s.has("state"):
                m["SEND_HAS_STATE"] = "1"
            if _addr_layout(s) == "sockaddr":
                m["SEND_ADDR_SOCKADDR"] = "1"
            elif s.has("family"):
                m["SEND_HAS_FAMILY"] = "1"
        r = self.receive_reset
        if r is not None and self.receive_reset_usable:
            if _addr_layout(r) == "sockaddr":
                m["RECV_ADDR_SOCKADDR"] = "1"
            elif r.has("family"):
                m["RECV_HAS_FAMILY"] = "1"
            if r.has("sock_cookie"):
                m["RECV_HAS_COOKIE"] = "1"
        if self.listen_overflow_reason is not None:
            m["HAVE_TP_LISTEN_OVERFLOW_ACK"] = "1"
            m["DROP_REASON_LISTEN_OVERFLOW"] = str(self.listen_overflow_reason)
        if self.kfree_rx_sk:
            m["KFREE_HAS_RX_SK"] = "1"
            m["DROP_REASON_NOT_SPECIFIED"] = str(self.drop_reason("NOT_SPECIFIED"))
            m["DROP_REASON_NO_SOCKET"] = str(self.drop_reason("NO_SOCKET"))
            if self.kfree_cookie_overflow:
                m["KFREE_COOKIE_OVERFLOW"] = "1"
        if self.ringbuf:
            m["RSTTRACE_RINGBUF"] = "1"
        gen = self.netns_gen
        if gen == "ns_id":
            m["NETNS_GEN_NS_ID"] = "1"
        elif gen == "net_cookie":
            m["NETNS_GEN_COOKIE"] = "1"
        skc = self.skc_read_len()
        if skc is not None:
            m["RSTTRACE_SKC_LEN"] = str(skc)
        return m

    def state_name(self, raw: int) -> Optional[str]:
        if raw == 0:
            return None  # "Zero means unknown state" (include/trace/events/tcp.h): no socket
        return self.tcp_states.get(raw, "unknown:%d" % raw)

    def reason_name(self, kind: str, raw: Optional[int]) -> Optional[str]:
        if raw is None:
            return None
        table = self.drop_reasons if kind == "listen_overflow_ack" else self.rst_reasons
        return table.get(raw, "unknown:%d" % raw)


def _addr_layout(fmt: EventFormat) -> str:
    """"sockaddr" (6.10+: saddr/daddr are sockaddr_in6-sized), "split" (saddr + saddr_v6), or ""."""
    sa, da = fmt.field("saddr"), fmt.field("daddr")
    if sa is None or da is None:
        return ""
    if sa.size >= 28 and da.size >= 28:
        return "sockaddr"
    if sa.size == 4 and fmt.has("saddr_v6") and fmt.has("daddr_v6") and fmt.has("sport") and fmt.has("dport"):
        return "split"
    return ""
