"""The hook table: every BPF program, where it attaches, which kernels get it, and what doctor says.

Adding a hook is one row here and its program in bpf/rsttrace.bpf.c (compiled in by the row's
macro). The kernel facts decide (``wanted``), KernelFacts.macros() renders the macros of the rows
a kernel gets (and the raw-tracepoint ones where BTF allows), Tracer.plan() attaches exactly those
rows, and ``coverage()`` says per event kind what sees it on this kernel, for doctor and the
start-up log. Kinds no program can see come from the kernel's counters (overflow.DERIVED).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Tuple

if TYPE_CHECKING:
    from rsttrace.kernel.facts import KernelFacts


@dataclass(frozen=True)
class HookSpec:
    program: str  # the BPF function
    attach: str  # "tracepoint" or "kprobe"
    target: str  # "tcp:tcp_send_reset" / "tcp_v4_send_reset"
    macro: str  # the #define that compiles the program in
    feeds: str  # the event kinds it feeds
    wanted: Callable[[KernelFacts], bool]  # this kernel gets it
    # The macro set when this tracepoint runs raw, where BTF describes its arguments (kernel.RAW_ROLES),
    # with <macro>_<ROLE> argument indexes; "" for none.
    raw: str = ""


HOOKS: Tuple[HookSpec, ...] = (
    HookSpec("rsttrace_send_reset", "tracepoint", "tcp:tcp_send_reset", "HAVE_TP_SEND_RESET", "sent",
             lambda f: f.send_reset_usable, raw="RAW_SEND_RESET"),
    HookSpec("rsttrace_receive_reset", "tracepoint", "tcp:tcp_receive_reset", "HAVE_TP_RECEIVE_RESET", "received",
             lambda f: f.receive_reset_usable, raw="RAW_RECEIVE_RESET"),
    HookSpec("rsttrace_kfree_skb", "tracepoint", "skb:kfree_skb", "HAVE_TP_KFREE_SKB",
             "listen_overflow_ack, received (request sockets)", lambda f: f.kfree_skb_hook, raw="RAW_KFREE_SKB"),
    HookSpec("rsttrace_kp_send_reset", "kprobe", "tcp_v4_send_reset", "HAVE_KP_SEND_RESET", "sent",
             lambda f: f.kp_send_reset),
    HookSpec("rsttrace_kp_send_reset", "kprobe", "tcp_v6_send_reset", "HAVE_KP_SEND_RESET", "sent",
             lambda f: f.kp_send_reset and f.kprobe_ok("tcp_v6_send_reset")),
    HookSpec("rsttrace_kp_syn_recv", "kprobe", "tcp_v4_syn_recv_sock", "HAVE_KP_SYN_RECV", "listen_overflow_ack",
             lambda f: f.kp_syn_recv),
    HookSpec("rsttrace_kp_syn_recv6", "kprobe", "tcp_v6_syn_recv_sock", "HAVE_KP_SYN_RECV", "listen_overflow_ack",
             lambda f: f.kp_syn_recv and f.kprobe_ok("tcp_v6_syn_recv_sock")),
    HookSpec("rsttrace_kp_conn_request", "kprobe", "tcp_conn_request", "HAVE_KP_CONN_REQUEST", "listen_overflow_syn",
             lambda f: f.kp_conn_request),
)


def hook_macros(facts: KernelFacts) -> Dict[str, str]:
    """The HAVE_* of every row this kernel gets, and RAW_* for tracepoints that can run raw."""
    m: Dict[str, str] = {}
    for h in HOOKS:
        if not h.wanted(facts):
            continue
        m[h.macro] = "1"
        roles = facts.raw_args(h.target.partition(":")[2]) if h.raw else {}
        if roles:
            m[h.raw] = "1"
            for role, index in roles.items():
                m["%s_%s" % (h.raw, role)] = str(index)
    return m


def plan(facts: KernelFacts, macros: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """(program, hook, macro) for a program built with ``macros``: every tracepoint row (one this
    kernel lacks is reported as not attached) and the kprobe rows whose function exists here; raw
    tracepoints where their RAW_* macro is set. Rows whose macro is absent are not attached."""
    out: List[Tuple[str, str, str]] = []
    for h in HOOKS:
        if h.attach == "kprobe" and not facts.kprobe_ok(h.target):
            continue
        kind = "raw_tracepoint" if h.raw and h.raw in macros else h.attach
        out.append((h.program, "%s %s" % (kind, h.target), h.macro))
    return out


@dataclass
class Hook:
    """One event source and whether this kernel lets us use it (doctor, the start-up log)."""

    kind: str  # contract kind it feeds
    source: str  # e.g. "tracepoint tcp:tcp_send_reset"
    available: bool
    detail: str  # why (not), or what degrades


def coverage(f: KernelFacts) -> List[Hook]:
    """Per event kind, what sees it on this kernel and what degrades: the rows above and the
    kernel's counters, in words."""
    out: List[Hook] = []
    s = f.send_reset
    if s is None:
        out.append(Hook("sent", "tracepoint tcp:tcp_send_reset", False, "not in this kernel (needs 4.15+)"))
    elif f.send_has_reason:
        out.append(Hook("sent", "tracepoint tcp:tcp_send_reset", True,
                        "with the kernel's reason; fires for every reset (6.10+ layout)"))
    elif f.kp_send_reset:
        out.append(Hook("sent", "tracepoint tcp:tcp_send_reset + kprobe tcp_v4/v6_send_reset", True,
                        "no reason field (pre-6.10 layout): the tracepoint sees full sockets, the kprobe "
                        "the rest (no socket, TIME_WAIT); reasons inferred"))
    else:
        out.append(Hook("sent", "tracepoint tcp:tcp_send_reset", True,
                        "no reason field (pre-6.10 layout) and no kprobes: resets without a full socket "
                        "(closed port, TIME_WAIT) are NOT traced (the kernel's OutRsts still counts them); "
                        "reasons inferred"))
    r = f.receive_reset
    out.append(Hook("received", "tracepoint tcp:tcp_receive_reset", r is not None,
                    "a local abort on data (FIN_WAIT1/2 after shutdown) that fires it is taken back and "
                    "reported as sent (TCP_ABORT_ON_DATA)" if r is not None else "not in this kernel (needs 4.15+)"))
    if f.kfree_rx_sk:
        out.append(Hook("received", "tracepoint skb:kfree_skb reason NOT_SPECIFIED, rx_sk a listener, RST",
                        True, "RSTs that hit a request socket (SYN_RECV), state TCP_SYN_RECV"))
    else:
        out.append(Hook("received", "kernel counters TcpExt EmbryonicRsts (per netns, polled)", True,
                        "kfree_skb has no rx_sk (6.11+): RSTs that hit a request socket are EmbryonicRsts "
                        "minus the embryonic resets sent (INVALID_SYN); counter-derived"))
    if f.kfree_cookie_overflow:
        out.append(Hook("listen_overflow_ack", "tracepoint skb:kfree_skb reason NO_SOCKET, rx_sk a listener "
                        "with a full accept queue", True, "final ACKs with a valid SYN cookie (syncookie: true)"))
    if f.listen_overflow_reason is not None:
        out.append(Hook("listen_overflow_ack", "tracepoint skb:kfree_skb reason TCP_LISTEN_OVERFLOW", True, ""))
    elif f.kp_syn_recv:
        out.append(Hook("listen_overflow_ack", "kprobe tcp_v4/v6_syn_recv_sock (accept queue full on entry)",
                        True, "no TCP_LISTEN_OVERFLOW drop reason in this kernel"))
    else:
        why = "skb:kfree_skb has no TCP_LISTEN_OVERFLOW (6.15+) and no kprobe is possible"
        out.append(Hook("listen_overflow_ack", "kernel counters TcpExt ListenOverflows (per netns, polled)",
                        True, why + ": counted with the SYN overflows, marked includes_ack"))
    if f.kp_conn_request:
        out.append(Hook("listen_overflow_syn", "kprobe tcp_conn_request (accept queue full on entry)", True,
                        "the remainder of ListenOverflows, if any, is reported counter-derived"))
    else:
        out.append(Hook("listen_overflow_syn", "kernel counters TcpExt ListenOverflows (per netns, polled)",
                        True, "no tracepoint fires for it and no kprobe is possible; counter-derived"))
    out.append(Hook("syn_queue_overflow",
                    "kernel counters TcpExt TCPReqQFullDrop/TCPReqQFullDoCookies (per netns, polled)", True,
                    "tcp_syn_flood_action is static (often inlined) and has no tracepoint; counter-derived, "
                    "the flooded listener named from its request sockets (sock_diag)"))
    out.append(Hook("listen_drop", "kernel counters TcpExt ListenDrops (per netns, polled)", True,
                    "SYNs a listener dropped that neither ListenOverflows nor TCPReqQFullDrop counts (the SYN "
                    "backlog three-quarters full with syncookies off, no route back); counter-derived"))
    return out
