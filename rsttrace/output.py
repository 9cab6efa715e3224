"""Human lines and JSON lines for events, and the summary table."""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any, Dict, List, Optional, Tuple

from .events import Event

SHORT_KIND = {
    "sent": "SENT",
    "received": "RECV",
    "listen_overflow_syn": "OVFS",
    "listen_overflow_ack": "OVFA",
    "syn_queue_overflow": "SYNQ",
    "listen_drop": "DROP",
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


def terminal_safe(text: str) -> str:
    """``text`` with every character a terminal would act on (ESC, CR, BEL, other controls, C1,
    line and bidi-format characters) written as ``\\xNN``/``\\uNNNN``. Process names, pod and
    container names come from whoever named them: never let them drive the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else
                   ("\\x%02x" % ord(ch) if ord(ch) < 0x100 else "\\u%04x" % ord(ch)) for ch in text)


def human(e: Event) -> str:
    """One line, under 100 columns for an IPv4 event without an owner process (most are:
    passive resets run in softirq). IPv6 addresses and PID/COMM can make it longer."""
    state = (e.state or "-").replace("TCP_", "", 1)
    flow = "%s > %s" % (_ep(e.laddr, e.lport), _ep(e.raddr, e.rport)) if e.raddr or e.laddr else "-"
    who = "%d/%s" % (e.pid, terminal_safe(e.comm or "")) if e.pid is not None else "-"
    if e.count != 1:
        who = "x%d %s" % (e.count, who)
    return "%-8s %-4s %-20s %-11s %-37s %-10s %s" % (
        e.time[11:19],
        SHORT_KIND.get(e.kind, e.kind[:4]),
        terminal_safe(e.reason) if e.reason else "-",
        state,
        flow,
        e.netns if e.netns is not None else "-",
        who,
    )


FAST_PATH = True  # json_line builds the text itself (benchmarks look for this)

_dumps = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators=(",", ":"))

def _jstr(v: Any) -> str:
    """JSON for a value, as json.dumps prints it; fast for str, int and None."""
    t = type(v)
    if t is str:
        return encode_basestring_ascii(v)  # what json.dumps uses (ensure_ascii): quotes, escapes
    if v is None:
        return "null"
    if t is int:
        return int.__repr__(v)
    return _dumps(v)  # bool, float, containers, int subclasses: exactly as json.dumps does


_NAMES_MAX = 4096
_Names = Tuple[Any, ...]
_names: Dict[_Names, Tuple[str, str]] = {}  # kind..family, source, count -> their JSON text


def _names_json(key: _Names, store: bool = True) -> Tuple[str, str]:
    kind, reason, reason_raw, reason_source, state, family, source, count = key
    j = _jstr
    frag = ('"kind":%s,"reason":%s,"reason_raw":%s,"reason_source":%s,"state":%s,"family":%s' % (
        j(kind), j(reason), j(reason_raw), j(reason_source), j(state), j(family)),
        '"source":%s,"count":%s' % (j(source), j(count)))
    if store:
        if len(_names) >= _NAMES_MAX:
            _names.clear()
        _names[key] = frag
    return frag


_KEYS = frozenset(("time", "ktime_ns", "kind", "reason", "reason_raw", "reason_source", "state", "family",
                   "laddr", "lport", "raddr", "rport", "netns", "cookie", "pid", "comm", "source", "count",
                   "backlog", "max_backlog", "cgroup_id", "peer_from_packet"))
_NUMS = (int, type(None))  # where a cache key of equal values (1, True, 1.0) must not mix


def json_line(e: Event) -> str:
    """``json.dumps(e.to_dict(), separators=(",", ":"))``, byte for byte, without the dict."""
    extra = e.extra
    if extra and not _KEYS.isdisjoint(extra):
        return _dumps(e.to_dict())  # an extra replaces a key in place: let to_dict order it
    kind = e.kind
    if type(e.reason_raw) in _NUMS and type(e.count) in _NUMS:
        key = (kind, e.reason, e.reason_raw, e.reason_source, e.state, e.family, e.source, e.count)
        names = _names.get(key) or _names_json(key)
    else:
        key = (kind, e.reason, e.reason_raw, e.reason_source, e.state, e.family, e.source, e.count)
        names = _names_json(key, store=False)  # True == 1 == 1.0 as keys: never cached
    j = _jstr
    text = '{"time":%s,"ktime_ns":%s,%s,"laddr":%s,"lport":%s,"raddr":%s,"rport":%s,"netns":%s,"cookie":%s,' \
           '"pid":%s,"comm":%s,%s' % (
               j(e.time), j(e.ktime_ns), names[0], j(e.laddr), j(e.lport), j(e.raddr), j(e.rport), j(e.netns),
               j(e.cookie), j(e.pid), j(e.comm), names[1])
    if kind.startswith("listen_overflow") or kind == "syn_queue_overflow":  # as to_dict decides
        text += ',"backlog":%s,"max_backlog":%s' % (j(e.backlog), j(e.max_backlog))
    if e.cgroup_id:
        text += ',"cgroup_id":' + j(e.cgroup_id)
    if e.peer_from_packet:
        text += ',"peer_from_packet":true'
    if extra:
        for k, v in extra.items():
            if type(k) is not str:
                return _dumps(e.to_dict())  # json.dumps' key coercions: rare, so not copied here
            text += "," + encode_basestring_ascii(k) + ":" + j(v)
    return text + "}"


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
