"""Every reason name rsttrace can print, and the check ``--reason`` makes against them.

**Every name the tracer can print in an event's ``reason`` (``trace``, ``--json``, ``summary``,
metrics, the event log) must either come from the running kernel's own tables (read by
``kernel_read.gather``: ``KernelFacts.rst_reasons``, and the drop reasons in ``KERNEL_DROP_REASONS``)
or be listed in ``OWN_REASONS`` below.** ``rsttrace trace --reason`` accepts exactly those names
(``valid_reasons``) and refuses any other with the list, so a name missing here is a name users
cannot filter on. Adding a counter-derived, errno or inferred name: add it to ``OWN_REASONS``.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Set, Tuple

from rsttrace.kernel.facts import KernelFacts

_INFERRED = "inferred (kernel < 6.10)"
_ERRNO = "the errno tcp_reset() gives the application, by state"
_COUNTER = "TcpExt counter, per network namespace"

# name -> (the kind that prints it, where it comes from), as `rsttrace reasons` lists them
OWN_REASONS: Dict[str, Tuple[str, str]] = {
    # sent, inferred on kernels whose tcp_send_reset has no reason (< 6.10): events.infer_sent_reason
    "NO_SOCKET": ("sent", _INFERRED),
    "TCP_TIMEWAIT_SOCKET": ("sent", _INFERRED),
    "TCP_ABORT_ON_CLOSE": ("sent", _INFERRED),
    "NOT_SPECIFIED": ("sent", _INFERRED),
    "INVALID_SYN": ("sent", _INFERRED),
    "TCP_ABORT_ON_DATA": ("sent", _INFERRED + ": a local abort on data after shutdown"),
    # received: events.RECEIVED_ERRNO
    "ECONNREFUSED": ("received", _ERRNO),
    "ECONNRESET": ("received", _ERRNO),
    "EPIPE": ("received", _ERRNO),
    # counter-derived (TcpExt in /proc/net/netstat): overflow.DERIVED; also a kprobe-seen overflow
    "ListenOverflows": ("listen_overflow_syn", _COUNTER + " (kprobe-seen overflows too)"),
    "TCPReqQFullDrop": ("syn_queue_overflow", _COUNTER),
    "TCPReqQFullDoCookies": ("syn_queue_overflow", _COUNTER),
    "ListenDrops": ("listen_drop", _COUNTER + ": the drops no other counter names"),
    "EmbryonicRsts": ("received", "a RST on a request socket (SYN_RECV): skb:kfree_skb (rx_sk), or the TcpExt "
                                  "counter minus the INVALID_SYN resets sent"),
}


def own_reasons(facts: KernelFacts) -> Dict[str, Tuple[str, str]]:
    """The names rsttrace gives itself on this kernel: name -> (kind, where it comes from).
    Inferred sent reasons only where tcp_send_reset has none."""
    return {name: (kind, where) for name, (kind, where) in OWN_REASONS.items()
            if not (kind == "sent" and facts.send_has_reason)}


# skb_drop_reason names the tracer reports (named from the kernel's kfree_skb table when it has them)
KERNEL_DROP_REASONS = ("TCP_LISTEN_OVERFLOW", "NO_SOCKET")

# what a number missing from the kernel's table prints as (KernelFacts.reason_name)
UNKNOWN_RE = re.compile(r"UNKNOWN:[0-9]+", re.ASCII)


class ReasonError(ValueError):
    pass


def kernel_reasons(facts: KernelFacts) -> List[str]:
    """The names the running kernel itself gives (its format files' tables)."""
    names = list(facts.rst_reasons.values())
    drop = set(facts.drop_reasons.values())
    names.extend(n for n in KERNEL_DROP_REASONS if n in drop or facts.listen_overflow_reason is not None)
    return names


def valid_reasons(facts: KernelFacts) -> Dict[str, str]:
    """Every name a ``reason`` can have on this kernel: upper case -> as printed."""
    out: Dict[str, str] = {}
    for name in [*kernel_reasons(facts), *OWN_REASONS]:
        out.setdefault(name.upper(), name)
    return out


def check_reasons(values: Optional[Sequence[str]], facts: Optional[KernelFacts]) -> Optional[Set[str]]:
    """``--reason`` values (each a comma list) as the upper-case set the filter matches.

    Empty names are refused at once; names are checked against ``valid_reasons(facts)`` when
    ``facts`` is given (the syntax check runs before the kernel is read, the names after).
    """
    if values is None:
        return None
    out: Set[str] = set()
    for v in values:
        for part in v.split(","):
            name = part.strip()
            if not name:
                raise ReasonError("--reason %r: an empty name (reason names, comma separated: see `rsttrace "
                                  "reasons`)" % v)
            out.add(name.upper())
    if facts is not None:
        valid = valid_reasons(facts)
        bad = sorted(n for n in out if n not in valid and not UNKNOWN_RE.fullmatch(n))
        if bad:
            raise ReasonError("--reason: unknown reason %s on this kernel (one of: %s)" % (
                ", ".join(repr(b) for b in bad), ", ".join(sorted(valid.values(), key=str.upper))))
    return out
