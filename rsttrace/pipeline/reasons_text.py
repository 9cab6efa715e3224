"""Plain-words explanations of why the kernel sent (or saw) a TCP reset.

Pure data, used by ``rsttrace reasons``: that command lists the reason names the RUNNING kernel
reports (read from its tracefs format files) and looks each one up here.  Reason NUMBERS are
never used: they change between kernels (the MPTCP values moved in 6.12), so this module is
keyed by NAME only.

Keys:

* ``enum sk_rst_reason`` names as printed by ``tcp:tcp_send_reset`` (6.10+), e.g. ``NO_SOCKET``;
  the ``SK_RST_REASON_`` prefix is accepted and ignored.
* ``skb_drop_reason`` names that matter for resets/overflows, as printed by ``skb:kfree_skb``
  (``TCP_LISTEN_OVERFLOW``); the ``SKB_DROP_REASON_`` prefix is accepted and ignored.
* for received resets, the errno tcp_reset() sets from the socket state (``ECONNREFUSED`` in
  SYN_SENT, ``EPIPE`` in CLOSE_WAIT, ``ECONNRESET`` otherwise).
* TcpExt counter names standing in for overflows that cannot be traced per event
  (``ListenOverflows``, ``TCPReqQFullDrop``, ``TCPReqQFullDoCookies``); lookup ignores case.
* event kinds that have no kernel reason, prefixed ``kind:`` (``kind:received``,
  ``kind:listen_overflow_syn``, ``kind:listen_overflow_ack``, ``kind:syn_queue_overflow``).

Semantics follow the kernel: include/net/rstreason.h, net/ipv4/tcp.c (__tcp_close,
tcp_disconnect, tcp_abort), tcp_input.c (tcp_rcv_state_process, tcp_rcv_synsent_state_process,
tcp_reset), tcp_ipv4.c (no_tcp_socket, TCP_TW_RST), tcp_minisocks.c (tcp_timewait_state_process,
tcp_check_req) and tcp_timer.c (keepalive, orphans).  Each line is at most ``MAX_LINE`` chars.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

MAX_LINE = 110
KIND_PREFIX = "kind:"

_STRIP_PREFIXES = ("SK_RST_REASON_", "SKB_DROP_REASON_")


@dataclass(frozen=True)
class Explanation:
    cause: str  # one line: what makes the kernel do this
    check: str  # one line: what an SRE should check


def _e(cause: str, check: str) -> Explanation:
    return Explanation(cause=cause, check=check)


# --- enum sk_rst_reason (tcp:tcp_send_reset, kernel 6.10+) -------------------------------------
_RST_REASONS: Dict[str, Explanation] = {
    "NOT_SPECIFIED": _e(
        "Reset from a call site that passes no reason: every active reset on 6.10-6.11, or an unmapped path",
        "Compare with nstat TcpExtTCPAbortOn* counters; the socket state and process narrow it down",
    ),
    "NO_SOCKET": _e(
        "Segment for a port or connection with no socket: closed port, crashed service, scan, forgotten conn",
        "ss -ltn for that port; many sources or ports = scan; one peer = service down or its half-open conn",
    ),
    "TCP_INVALID_ACK_SEQUENCE": _e(
        "In SYN_SENT the SYN-ACK acknowledged a sequence we never sent: stale reply or reused 4-tuple",
        "tcpdump the handshake; look for NAT/load balancers rewriting sequence numbers or reusing ports",
    ),
    "TCP_RFC7323_PAWS": _e(
        "In SYN_SENT the SYN-ACK echoed a timestamp we never sent (PAWS, RFC 7323): stale or forged reply",
        "nstat -az TcpExtPAWSActive; look for middleboxes that rewrite or strip TCP timestamps",
    ),
    "TCP_TOO_OLD_ACK": _e(
        "ACK older than the whole send window reached a SYN_RECV socket (Fast Open or simultaneous open)",
        "Rare: capture the handshake; check net.ipv4.tcp_fastopen and middleboxes replaying old ACKs",
    ),
    "TCP_ACK_UNSENT_DATA": _e(
        "ACK for data not sent yet reached a SYN_RECV socket (Fast Open or simultaneous open)",
        "tcpdump it: a NAT/LB mixing two flows onto one 4-tuple or a buggy peer TCP stack is typical",
    ),
    "TCP_FLAGS": _e(
        "Flags invalid for the socket state, typically a bare ACK reaching a listener with no pending SYN",
        "Peers ACK connections this host forgot: listener restarted, SYN cookie invalid, or LB misrouting",
    ),
    "TCP_OLD_ACK": _e(
        "Old but in-window ACK (acks nothing new) reached a SYN_RECV socket, which answers with one RST",
        "Duplicated or reordered handshake ACKs: check for retransmission storms and reordering on the path",
    ),
    "TCP_ABORT_ON_DATA": _e(
        "Peer kept sending data after this side closed its socket (FIN_WAIT), so nobody could read it",
        "App closes while the peer still sends: compare both ends' idle timeouts; nstat TcpExtTCPAbortOnData",
    ),
    "TCP_TIMEWAIT_SOCKET": _e(
        "Segment hit a TIME_WAIT/FIN_WAIT2 mini-socket: new data or in-window SYN after this side closed",
        "Peer reuses the 4-tuple too early or sends after close (cf. TIME_WAIT assassination, RFC 1337)",
    ),
    "INVALID_SYN": _e(
        "Handshake check failed in SYN_RECV: bad SYN/flags, or accept queue full with tcp_abort_on_overflow=1",
        "sysctl net.ipv4.tcp_abort_on_overflow; ss -ltn Recv-Q vs Send-Q; state shows LISTEN, peer is in skb",
    ),
    "TCP_ABORT_ON_CLOSE": _e(
        "Application closed a socket with unread data in its receive queue, so the kernel aborts (RFC 2525)",
        "Find the process on the event and make it drain input before close(); nstat TcpExtTCPAbortOnClose",
    ),
    "TCP_ABORT_ON_LINGER": _e(
        "Orphaned socket in FIN_WAIT2 with TCP_LINGER2 < 0 is reset instead of waiting for the peer's FIN",
        "Deliberate: look for setsockopt(TCP_LINGER2, -1) in the application; nstat TcpExtTCPAbortOnLinger",
    ),
    "TCP_ABORT_ON_MEMORY": _e(
        "Too many orphaned sockets or TCP memory over tcp_mem: the kernel kills connections to free memory",
        "dmesg 'too many orphaned sockets'; /proc/net/sockstat; sysctl net.ipv4.tcp_mem tcp_max_orphans",
    ),
    "TCP_STATE": _e(
        "Application aborted a live connection: SO_LINGER 0 close, connect(AF_UNSPEC), or ss -K/SOCK_DESTROY",
        "See the process on the event; look for SO_LINGER {1,0} ('nolinger') or ss -K; TcpExtTCPAbortOnData",
    ),
    "TCP_KEEPALIVE_TIMEOUT": _e(
        "Keepalive probes or TCP_USER_TIMEOUT went unanswered: peer rebooted or vanished, NAT dropped the flow",
        "Half-open connection: check peer reboots and NAT/firewall idle timeouts; ss -tno shows keepalive timers",
    ),
    "TCP_DISCONNECT_WITH_DATA": _e(
        "Application disconnected in CLOSING/LAST_ACK while unsent data was still in the write queue",
        "Find the process: SO_LINGER 0 close or connect(AF_UNSPEC) before its data had been sent",
    ),
    "MPTCP_RST_EUNSPEC": _e(
        "MPTCP subflow reset with an unspecified error (MP_TCPRST code 0, RFC 8684)",
        "ip mptcp endpoint show; nstat -az | grep -i mptcp for the subflow error counters",
    ),
    "MPTCP_RST_EMPTCP": _e(
        "MPTCP subflow reset: invalid MPTCP options or response in the subflow (MP_TCPRST code 1)",
        "Capture the subflow handshake; a middlebox stripping or mangling MPTCP options is the usual cause",
    ),
    "MPTCP_RST_ERESOURCE": _e(
        "MPTCP subflow reset: the sending host lacks resources for this subflow (MP_TCPRST code 2)",
        "ip mptcp limits show on the sender; check its memory pressure and subflow limits",
    ),
    "MPTCP_RST_EPROHIBIT": _e(
        "MPTCP subflow reset: the subflow is administratively prohibited by the sender (MP_TCPRST code 3)",
        "Review the path manager policy: ip mptcp endpoint/limits and the net.mptcp.* sysctls",
    ),
    "MPTCP_RST_EWQ2BIG": _e(
        "MPTCP subflow reset: too much data outstanding on it, cheaper to restart than retransmit (code 4)",
        "That path stalled for a while: check loss and outages on the interface carrying the subflow",
    ),
    "MPTCP_RST_EBADPERF": _e(
        "MPTCP subflow reset: its performance was unacceptable next to the other subflows (code 5)",
        "Compare RTT and loss of the paths used by the connection; the slow one is being dropped",
    ),
    "MPTCP_RST_EMIDDLEBOX": _e(
        "MPTCP subflow reset: middlebox interference detected, e.g. a DSS checksum failure (code 6)",
        "Find the NAT, proxy or firewall rewriting payload or options on that path",
    ),
    "ERROR": _e(
        "The stack hit an unexpected error on the reset path (e.g. an unknown MPTCP reset code)",
        "Not tunable: report it with the kernel version and a packet capture of the affected flow",
    ),
    "MAX": _e(
        "Enum sentinel (number of reasons), never a real reason: seeing it means a decoding error",
        "Check that rsttrace read the reason names from this kernel's tcp_send_reset format file",
    ),
}

# --- skb_drop_reason names relevant to resets and overflows (skb:kfree_skb) ---------------------
_DROP_REASONS: Dict[str, Explanation] = {
    "TCP_LISTEN_OVERFLOW": _e(
        "Final handshake ACK dropped: the listener's accept queue was full, so no child socket (6.15+)",
        "App accepts too slowly: ss -ltn Recv-Q vs Send-Q; raise the listen backlog and net.core.somaxconn",
    ),
}

# --- received resets: the errno tcp_reset() gives the socket, from its state ---------------------
_RECEIVED_ERRORS: Dict[str, Explanation] = {
    "ECONNREFUSED": _e(
        "RST answered our SYN (SYN_SENT): the remote port is closed or a firewall rejects with tcp-reset",
        "Is the remote service up and listening (ss -ltn on it)? Look for REJECT --reject-with tcp-reset rules",
    ),
    "ECONNRESET": _e(
        "Peer reset an open connection: it aborted (crash, SO_LINGER 0, unread data) or forgot it (reboot)",
        "Look at the peer: its logs and restarts, rsttrace there; for half-open flows, middlebox idle timeouts",
    ),
    "EPIPE": _e(
        "RST arrived after the peer had sent its FIN (CLOSE_WAIT): this side was slow to close the socket",
        "ss -tn state close-wait: the application keeps sockets open after EOF; close them when read() returns 0",
    ),
}

# --- the kernel's counters that stand in for untraceable overflows (TcpExt in /proc/net/netstat) ---
_COUNTERS: Dict[str, Explanation] = {
    "ListenOverflows": _e(
        "TcpExt ListenOverflows: a SYN or final ACK found a listener's accept queue full (also in ListenDrops)",
        "nstat -az TcpExtListenOverflows; find the listener with ss -ltn, where Recv-Q has reached Send-Q",
    ),
    "TCPReqQFullDrop": _e(
        "SYN dropped: the SYN queue was full and SYN cookies were off or could not be used",
        "Set net.ipv4.tcp_syncookies=1, raise net.ipv4.tcp_max_syn_backlog, and find the flood's sources",
    ),
    "TCPReqQFullDoCookies": _e(
        "SYN queue full, SYN answered with a cookie: a flood is being absorbed, at the cost of TCP options",
        "dmesg 'Possible SYN flooding on port N. Sending cookies': attack, or an app too slow to accept?",
    ),
    "ListenDrops": _e(
        "SYN dropped, no overflow counter: syncookies off and SYN backlog 3/4 full (a flood), or no route back",
        "ss -tn state syn-recv | wc -l; net.ipv4.tcp_syncookies=1; find the flood's sources (tcpdump SYNs)",
    ),
    "EmbryonicRsts": _e(
        "RST hit a half-open connection (SYN_RECV): a scanner's kernel, or a spoofed SYN's real owner",
        "By peer: many = SYN flood from spoofed sources; one = scanner (nmap -sS); nstat TcpExtEmbryonicRsts",
    ),
}

# --- event kinds without a kernel reason ---------------------------------------------------------
_KINDS: Dict[str, Explanation] = {
    KIND_PREFIX + "received": _e(
        "Peer sent us an RST: its port is closed, it aborted, it forgot the connection (reboot), or a middlebox",
        "Group by peer and state: SYN_SENT = refused/closed port, ESTABLISHED = peer abort or half-open conn",
    ),
    KIND_PREFIX + "listen_overflow_syn": _e(
        "SYN dropped because the listener's accept queue was full (counted in ListenOverflows, no drop reason)",
        "ss -ltn: Recv-Q at Send-Q means accept() is not called fast enough; raise the backlog or add workers",
    ),
    KIND_PREFIX + "listen_overflow_ack": _e(
        "Final ACK dropped with the accept queue full: the client thinks it is connected, then times out",
        "nstat TcpExtListenOverflows TcpExtListenDrops; tcp_abort_on_overflow=1 turns these into RSTs",
    ),
    KIND_PREFIX + "listen_drop": _e(
        "SYN dropped by a listener with no overflow counter (ListenDrops alone): a flood, syncookies off",
        "sysctl net.ipv4.tcp_syncookies (1 absorbs floods); ss -tn state syn-recv; the port is on the event",
    ),
    KIND_PREFIX + "syn_queue_overflow": _e(
        "SYN queue of half-open requests full: SYN flood or slow handshakes; SYN cookies sent or SYN dropped",
        "dmesg 'Possible SYN flooding'; sysctl net.ipv4.tcp_syncookies=1 and net.ipv4.tcp_max_syn_backlog",
    ),
}

_ALL: Dict[str, Explanation] = {**_RST_REASONS, **_DROP_REASONS, **_RECEIVED_ERRORS, **_COUNTERS, **_KINDS}


def _normalize(name: str) -> str:
    key = name.strip()
    if key.lower().startswith(KIND_PREFIX):
        return KIND_PREFIX + key[len(KIND_PREFIX):].strip().lower()
    key = key.upper()
    for prefix in _STRIP_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


_BY_KEY: Dict[str, Explanation] = {_normalize(key): value for key, value in _ALL.items()}


def explain(name: str) -> Optional[Explanation]:
    """Explanation for a reset/drop reason name or a ``kind:...`` event kind; None if unknown."""
    return _BY_KEY.get(_normalize(name))


def rst_reason_names() -> Tuple[str, ...]:
    """The sk_rst_reason names this module knows (kernel 6.12/6.18 set)."""
    return tuple(_RST_REASONS)


def known_names() -> Tuple[str, ...]:
    """Every key that has an explanation: reset and drop reasons, errnos, counters, ``kind:`` entries."""
    return tuple(_ALL)
