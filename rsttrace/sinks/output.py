"""Human lines and JSON lines for events, and the summary table."""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Dict, List, Optional, Tuple

from rsttrace.pipeline.events import ATTRIBUTION_FIELDS, JSON_RULES, NUMERIC, OVERFLOW_KINDS, REPEATING, Event

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


_CACHE_MAX = 4096  # value combinations of a cached run: a few dozen in practice


def _json_line_source() -> str:
    """The text of ``json_line``, generated from the event schema (events.JSON_RULES): the keys
    every event has in one format string, then one test per optional key, so a field added to
    Event appears here with no edit, in to_dict's order. A run of neighbouring fields that repeat
    over a stream (events.REPEATING: kind, reason, state, ...) is turned into text once per
    combination of values and cached."""
    always = [name for name, rule in JSON_RULES if rule == "always"]
    if not always or JSON_RULES[0][1] != "always":
        raise ImportError("the event schema must start with a field that is always in its JSON")
    runs: List[List[str]] = []  # consecutive always-fields, repeating ones grouped
    for name in always:
        if name in REPEATING and runs and runs[-1][0] in REPEATING:
            runs[-1].append(name)
        else:
            runs.append([name])
    body = ["def json_line(e):", "    j = _jstr"]
    parts = []
    for i, run in enumerate(runs):
        text = ",".join(encode_basestring_ascii(n) + ":%s" for n in run)
        values = ", ".join("j(e.%s)" % n for n in run)
        if run[0] not in REPEATING:
            parts.append((text, values))
            continue
        key = "(%s,)" % ", ".join("e.%s" % n for n in run)
        plain = " and ".join("type(e.%s) in _NUMS" % n for n in run if n in NUMERIC) or "True"
        body += ["    k%d = %s" % (i, key),
                 "    r%d = _c[%d].get(k%d) if %s else None" % (i, i, i, plain),
                 "    if r%d is None:" % i,
                 "        r%d = %r %% (%s)" % (i, text, values),
                 "        if %s:" % plain,
                 "            if len(_c[%d]) >= _CACHE_MAX:" % i,
                 "                _c[%d].clear()" % i,
                 "            _c[%d][k%d] = r%d" % (i, i, i)]
        parts.append(("%s", "r%d" % i))
    body.append("    t = %r %% (%s)" % ("{" + ",".join(p[0] for p in parts), ", ".join(p[1] for p in parts)))
    for name, rule in JSON_RULES:
        key = "," + encode_basestring_ascii(name) + ":"
        if rule == "overflow":
            body.append("    if e.kind in OVERFLOW_KINDS: t += %r + j(e.%s)" % (key, name))
        elif rule == "set":
            body.append("    if e.%s: t += %r + j(e.%s)" % (name, key, name))
        elif rule == "merge":
            body.append("    if e.%s is not None:" % name)
            for attr in ATTRIBUTION_FIELDS:
                body.append("        t += %r + j(e.%s.%s)" % ("," + encode_basestring_ascii(attr) + ":", name, attr))
        elif rule != "always":
            raise ImportError("unknown JSON rule %r for %s" % (rule, name))
    body.append('    return t + "}"')
    return "\n".join(body) + "\n"


_ns: Dict[str, Any] = {"_jstr": _jstr, "OVERFLOW_KINDS": OVERFLOW_KINDS, "_NUMS": (int, type(None)),
                       "_CACHE_MAX": _CACHE_MAX, "_c": [{} for _ in JSON_RULES]}
exec(compile(_json_line_source(), "<rsttrace.sinks.output.json_line>", "exec"), _ns)  # noqa: S102 - our own text
json_line: Callable[[Event], str] = _ns["json_line"]
json_line.__doc__ = """``json.dumps(e.to_dict(), separators=(",", ":"))``, byte for byte, without the dict."""


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
