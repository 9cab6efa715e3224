"""Human lines and JSON lines for events, and the summary table."""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

from .events import Event

SHORT_KIND = {
    "sent": "SENT",
    "received": "RECV",
    "listen_overflow_syn": "OVFS",
    "listen_overflow_ack": "OVFA",
    "syn_queue_overflow": "SYNQ",
}

HEADER = "%-8s %-4s %-20s %-11s %-37s %-10s %s" % (
    "TIME", "KIND", "REASON", "STATE", "LOCAL > REMOTE", "NETNS", "PID/COMM"
)


def _ep(addr: Optional[str], port: Optional[int]) -> str:
    if addr is None:
        return "*" if port is None else "*:%d" % port
    if ":" in addr:
        return "[%s]:%s" % (addr, port if port is not None else "*")
    return "%s:%s" % (addr, port if port is not None else "*")


def human(e: Event) -> str:
    """One line, under 100 columns for an IPv4 event without an owner process (most are:
    passive resets run in softirq). IPv6 addresses and PID/COMM can make it longer."""
    state = (e.state or "-").replace("TCP_", "", 1)
    flow = "%s > %s" % (_ep(e.laddr, e.lport), _ep(e.raddr, e.rport)) if e.raddr or e.laddr else "-"
    who = "%d/%s" % (e.pid, e.comm) if e.pid is not None else "-"
    if e.count != 1:
        who = "x%d %s" % (e.count, who)
    return "%-8s %-4s %-20s %-11s %-37s %-10s %s" % (
        e.time[11:19],
        SHORT_KIND.get(e.kind, e.kind[:4]),
        e.reason or "-",
        state,
        flow,
        e.netns if e.netns is not None else "-",
        who,
    )


def json_line(e: Event) -> str:
    return json.dumps(e.to_dict(), separators=(",", ":"))


SummaryKey = Tuple[str, str, str]  # kind, reason, state


def summary_table(rows: Dict[SummaryKey, Tuple[int, int]], lost: Dict[str, int], title: str) -> str:
    """rows: (kind, reason, state) -> (count in this interval, total)."""
    lines: List[str] = [title, "%-20s %-26s %-14s %10s %12s" % ("KIND", "REASON", "STATE", "INTERVAL", "TOTAL")]
    for (kind, reason, state), (delta, total) in sorted(rows.items(), key=lambda kv: (-kv[1][1], kv[0])):
        lines.append("%-20s %-26s %-14s %10d %12d" % (kind, reason, state, delta, total))
    if len(lines) == 2:
        lines.append("(no resets or overflows)")
    lines.append("lost events: kernel %d, user %d; counter map full: %d" % (
        lost.get("lost_kernel", 0), lost.get("lost_user", 0), lost.get("counter_map_full", 0)))
    return "\n".join(lines)
