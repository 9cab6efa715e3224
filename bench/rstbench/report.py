"""The bench's tables: throughput ratios per configuration, the other figures, and the targets."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .storm import EVENTS_PER_ITERATION


@dataclass
class Row:
    mode: str
    config: str
    label: str
    ratios: List[float]
    per_sec: float
    delivered: Optional[int]
    lost: Optional[int]
    exact: str
    cpu_s: Optional[float]
    hwm_mib: Optional[float]
    ready_s: Optional[float]
    rounds: int

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.ratios) if self.ratios else None


def _median(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _sum(xs: List[Optional[int]]) -> Optional[int]:
    vals = [x for x in xs if x is not None]
    return sum(vals) if vals else None


def rows(results: Dict[str, Any]) -> List[Row]:
    rounds: List[Dict[str, Any]] = results.get("rounds", [])
    labels: Dict[str, str] = results.get("configs", {})
    out: List[Row] = []
    modes = list(dict.fromkeys(r["mode"] for r in rounds))
    for mode in modes:
        # Each configuration's run against the untraced run of its pair (back to back); the
        # untraced row shows each untraced run against their median: the machine's own noise.
        base = {r["pair"]: r["per_sec"] for r in rounds if r["mode"] == mode and r["config"] == "untraced"}
        base_median = statistics.median(base.values()) if base else 0.0
        for key, label in labels.items():
            mine = [r for r in rounds if r["mode"] == mode and r["config"] == key]
            if not mine:
                continue
            if key == "untraced":
                ratios = [r["per_sec"] / base_median for r in mine if base_median]
            else:
                ratios = [r["per_sec"] / base[r["pair"]] for r in mine if base.get(r["pair"])]
            out.append(Row(
                mode=mode, config=key, label=label, ratios=ratios,
                per_sec=statistics.median(r["per_sec"] for r in mine),
                delivered=_sum([r["delivered"] for r in mine]), lost=_sum([r["lost"] for r in mine]),
                exact=_exactness(key, mine),
                cpu_s=_median([r["cpu_s"] for r in mine if r["cpu_s"] is not None]),
                hwm_mib=max((r["hwm_kib"] or 0) for r in mine) / 1024 if any(r["hwm_kib"] for r in mine) else None,
                ready_s=_median([r["ready_s"] for r in mine if r["ready_s"] is not None]),
                rounds=len(mine),
            ))
    return out


def _exactness(key: str, mine: List[Dict[str, Any]]) -> str:
    """How the tool's count of sent resets compares with the namespace's Tcp OutRsts."""
    if key in ("counters", "counters_perf", "export"):
        pairs = [(r["counted"], r["out_rsts"]) for r in mine]
        if any(c is None for c, _ in pairs):
            return "no count"
        off = sum(abs(c - o) for c, o in pairs)
        return "exact" if off == 0 else "off by %d" % off
    if key == "bpftrace":
        pairs = [(r["counted"], r["out_rsts"]) for r in mine if r["counted"] is not None]
        if not pairs:
            return "-"
        # system-wide: it also counts other namespaces' resets, so >= is complete
        short = sum(max(0, o - c) for c, o in pairs)
        return "complete" if short == 0 else "missed %d" % short
    if key == "tcpdump":
        pairs = [(r["delivered"], r["out_rsts"]) for r in mine if r["delivered"] is not None]
        if not pairs:
            return "-"
        got = sum(c for c, _ in pairs)
        want = sum(o for _, o in pairs)
        return "%.1f%% captured" % (100.0 * got / want) if want else "-"
    return "-"


def _f(x: Optional[float], fmt: str = "%.3f") -> str:
    return "-" if x is None else fmt % x


def _events(r: Row) -> str:
    if r.delivered is None and r.lost is None:
        return "-"
    return "%s/%s" % ("-" if r.delivered is None else _si(r.delivered), "-" if r.lost is None else _si(r.lost))


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return "%.2f%s" % (n / div, unit)
    return "%d" % n


HEAD = ("configuration", "median", "min", "max", "iter/s", "events deliv/lost", "counters", "CPU s",
        "peak RSS MB", "start s")


def table_rows(results: Dict[str, Any], mode: str) -> List[Tuple[str, ...]]:
    out: List[Tuple[str, ...]] = []
    for r in rows(results):
        if r.mode != mode:
            continue
        out.append((
            r.label, _f(r.median), _f(min(r.ratios) if r.ratios else None), _f(max(r.ratios) if r.ratios else None),
            _si(r.per_sec), _events(r), r.exact, _f(r.cpu_s, "%.2f"), _f(r.hwm_mib, "%.0f"), _f(r.ready_s, "%.2f"),
        ))
    return out


def _fixed(head: Tuple[str, ...], body: List[Tuple[str, ...]]) -> List[str]:
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join("%%-%ds" % w if i == 0 else "%%%ds" % w for i, w in enumerate(widths))
    return [fmt % head, *(fmt % b for b in body)]


def _md(head: Tuple[str, ...], body: List[Tuple[str, ...]]) -> List[str]:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return lines


def _header(results: Dict[str, Any]) -> List[str]:
    m = results.get("machine", {})
    p = results.get("params", {})
    lines = [
        "rsttrace bench %s: kernel %s, %s cores (%s)%s" % (
            results.get("date", "?"), m.get("kernel", "?"), m.get("cores", "?"), m.get("cpu", "?"),
            ", QUICK (figures mean nothing)" if results.get("quick") else ""),
        "storm: %s processes x %.0f s per run, %d rounds (closed), %d (abort, overflow), order rotated each "
        "round; ratio = iterations/s traced / untraced run just before it (untraced row: each run / their "
        "median, i.e. the machine's noise)" % (
            results.get("procs", "?"), p.get("duration", 0), p.get("rounds", 0), p.get("rounds_other", 0)),
    ]
    lb, la = results.get("load_before", {}), results.get("load_after", {})
    if lb or la:
        lines.append("machine load before/after: loadavg %s/%s, CPU pressure avg10 %s%%/%s%%" % (
            lb.get("loadavg1", "?"), la.get("loadavg1", "?"), lb.get("cpu_pressure_avg10", "?"),
            la.get("cpu_pressure_avg10", "?")))
    foreign = sorted({f for r in results.get("rounds", []) for f in r.get("foreign", [])})
    if foreign:
        lines.append("other tracing programs loaded during the rounds (noise for all, untraced included): %s"
                     % ", ".join(foreign[:12]) + (" ..." if len(foreign) > 12 else ""))
    bt = results.get("bpftrace", {})
    if bt:
        lines.append("bpftrace one-liner: %s" % (bt.get("program") or "none compiled: %s" % bt))
    if results.get("unavailable"):
        lines.append("not measured (tool missing): %s" % ", ".join(results["unavailable"]))
    return lines


def _sections(results: Dict[str, Any], md: bool) -> List[str]:
    lines: List[str] = []
    modes = list(dict.fromkeys(r["mode"] for r in results.get("rounds", [])))
    for mode in modes:
        per_it = EVENTS_PER_ITERATION.get(mode, 2)
        lines.append("")
        lines.append("%s storm (%s):" % (mode, {
            "closed": "connect() to a closed port: a RST each way per iteration",
            "abort": "close() with unread data: a RST each way per iteration",
            "overflow": "final ACK on a full accept queue, tcp_abort_on_overflow=1: ~%d events per iteration" % per_it,
        }.get(mode, mode)))
        lines.append("")
        body = table_rows(results, mode)
        lines += _md(HEAD, body) if md else _fixed(HEAD, body)
    lines.append("")
    lines += details(results)
    lines.append("")
    lines.append("targets:")
    for name, ok, figure in targets(results):
        lines.append("  %-9s %-66s %s" % ({True: "met", False: "NOT MET", None: "n/a"}[ok], name, figure))
    return lines


def details(results: Dict[str, Any]) -> List[str]:
    lines = []
    for key, what in (("python", "trace --json"), ("python_w", "trace -w pcapng")):
        lines += _python_lines(results.get(key) or {}, what)
    return lines + _kernel_memory_lines(results)


def _python_lines(py: Dict[str, Any], what: str) -> List[str]:
    lines: List[str] = []
    if py:
        lines.append("python side, %s, every event, one storm process (the other core is rsttrace's):" % what)
        lines.append("  highest rate with no loss: %s events/s (sweep: %s)" % (
            _si(py.get("max_lossless_events_per_s", 0)),
            ", ".join("%s%s" % (_si(s["achieved"]), "" if not s["lost"] else " lost %s" % _si(s["lost"]))
                      for s in py.get("sweep", []))))
        sat = py.get("saturated") or {}
        if sat:
            lines.append("  unthrottled storm: %s events/s through Python, %s lost, %.1f us CPU per event" % (
                _si(sat.get("events_per_s", 0)), _si(sat.get("lost", 0)), sat.get("cpu_us_per_event", 0)))
            prof = sat.get("profile") or {}
            if prof.get("self"):
                us = sat.get("cpu_us_per_event") or 0
                lines.append("  py-spy, %d samples (%s), self time by function (%% of samples, us per event):"
                             % (prof.get("samples", 0), prof.get("file", "")))
                for name, pct in prof["self"][:12]:
                    lines.append("    %5.1f%% %5.2f us  %s" % (pct, us * pct / 100, name))
                lines.append("  inclusive:")
                for name, pct in prof.get("inclusive", [])[:12]:
                    lines.append("    %5.1f%% %5.2f us  %s" % (pct, us * pct / 100, name))
            elif prof.get("error"):
                lines.append("  profile: %s" % prof["error"])
    return lines


def _kernel_memory_lines(results: Dict[str, Any]) -> List[str]:
    lines: List[str] = []
    for k in results.get("kernel", []):
        if k.get("error"):
            lines.append("in-kernel cost, %s: %s" % (k["config"], k["error"]))
            continue
        lines.append("in-kernel cost, %s (bpf_stats_enabled, %s it/s storm): %s ns per run overall; %s" % (
            k["config"], _si(k.get("storm_per_sec") or 0), _f(k.get("ns_per_run"), "%.0f"),
            ", ".join("%s %s ns x %s" % (p["name"], _f(p["ns_per_run"], "%.0f"), _si(p["run_cnt"]))
                      for p in k.get("programs", []))))
    for m in results.get("memory", []):
        rss = [s["rss_kib"] for s in m.get("samples", []) if s.get("rss_kib")]
        lines.append("memory, %s: %s events through Python (of %s made, %s lost) over %s peers: RSS %s MiB at "
                     "start, %s after the first chunk, %s at the end, peak %s MiB; growth after the first chunk "
                     "%.1f MiB (%s)" % (
                         m["config"], _si(m["events_through"]), _si(m["events_generated"]), _si(m["lost"]),
                         _si(m["peers"]), _f((m.get("start_rss_kib") or 0) / 1024, "%.0f"),
                         _f(rss[0] / 1024 if rss else None, "%.0f"), _f(rss[-1] / 1024 if rss else None, "%.0f"),
                         _f((m.get("hwm_kib") or 0) / 1024, "%.0f"),
                         (m.get("growth_after_first_chunk_kib") or 0) / 1024,
                         "flat" if m.get("flat") else "GROWS"))
        anon = [s.get("anon_kib") for s in m.get("samples", []) if s.get("anon_kib")]
        files = [s.get("file_kib") for s in m.get("samples", []) if s.get("file_kib")]
        if anon and files:
            lines.append("  of which heap (RssAnon) %.0f -> %.0f MiB, mapped files (RssFile: libbcc/LLVM, Python) "
                         "%.0f -> %.0f MiB" % (anon[0] / 1024, anon[-1] / 1024, files[0] / 1024, files[-1] / 1024))
    ready = [r["ready_s"] for r in results.get("rounds", []) if r["ready_s"] is not None
             and r["config"] in ("counters", "trace", "trace_all", "trace_w", "export", "top")]
    if ready:
        lines.append("rsttrace start to attached (process start to its 'ready' line), %d starts: median %.2f s, "
                     "max %.2f s" % (len(ready), statistics.median(ready), max(ready)))
    return lines


def _row(results: Dict[str, Any], mode: str, key: str) -> Optional[Row]:
    for r in rows(results):
        if r.mode == mode and r.config == key:
            return r
    return None


def targets(results: Dict[str, Any]) -> List[Tuple[str, Optional[bool], str]]:
    out: List[Tuple[str, Optional[bool], str]] = []
    mode = "closed"
    counters, trace = _row(results, mode, "counters"), _row(results, mode, "trace")
    others = [x for x in (_row(results, mode, "bpftrace"), _row(results, mode, "tcpdump")) if x]

    def ratio_target(name: str, r: Optional[Row], floor: float) -> None:
        if r is None or r.median is None:
            out.append((name, None, "not measured"))
        else:
            out.append((name, r.median >= floor, "%.3f (min %.3f)" % (r.median, min(r.ratios))))

    ratio_target("counters only >= 0.97 (closed storm, median)", counters, 0.97)
    ratio_target("default event mode >= 0.93 (closed storm, median)", trace, 0.93)
    ratio_target("trace --json --all-events >= 0.80 (closed storm, median)", _row(results, mode, "trace_all"), 0.80)
    for m in ("closed", "abort"):
        if _row(results, m, "top") is not None:
            ratio_target("top >= 0.97 (%s storm, median)" % m, _row(results, m, "top"), 0.97)
    for r in (counters, trace):
        if r is None or r.median is None or not others:
            continue
        ahead = all(o.median is not None and r.median > o.median for o in others)
        out.append(("%s ahead of %s" % (r.config, " and ".join(o.config for o in others)), ahead,
                    "%.3f vs %s" % (r.median, ", ".join("%s %.3f" % (o.config, o.median or 0) for o in others))))
    exact = [r for r in rows(results) if r.config in ("counters", "counters_perf", "export")]
    if exact:
        bad = [r for r in exact if r.exact != "exact"]
        out.append(("counters exact vs OutRsts (0 lost), every round", not bad,
                    "; ".join("%s/%s %s" % (r.mode, r.config, r.exact) for r in exact)))
    py = results.get("python") or {}
    if py:
        best = py.get("max_lossless_events_per_s", 0)
        out.append((">= 200k events/s through Python, no loss", best >= 200000, "%s events/s" % _si(best)))
        out.append((">= 100k events/s, trace --json, no loss", best >= 100000, "%s events/s" % _si(best)))
    pyw = results.get("python_w") or {}
    if pyw:
        best = pyw.get("max_lossless_events_per_s", 0)
        out.append((">= 200k events/s, trace -w, no loss", best >= 200000, "%s events/s" % _si(best)))
    tw, td = _row(results, mode, "trace_w"), _row(results, mode, "tcpdump")
    if tw is not None and td is not None and tw.median is not None and td.median is not None:
        out.append(("trace -w --all-events >= tcpdump -w (closed storm, median)", tw.median >= td.median,
                    "%.3f vs %.3f; lost %s, tcpdump dropped %s" % (tw.median, td.median, _si(tw.lost or 0),
                                                                 _si(td.lost or 0))))
    ready = [r["ready_s"] for r in results.get("rounds", []) if r["ready_s"] is not None
             and r["config"] in ("counters", "trace", "trace_all", "trace_w", "export", "top")]
    if ready:
        out.append(("start to attached <= 2 s", max(ready) <= 2.0,
                    "median %.2f s, max %.2f s" % (statistics.median(ready), max(ready))))
    for k in results.get("kernel", []):
        # Per event: the reset programs' runs (kfree_skb runs for every dropped packet and
        # leaves at once for all but listen overflows; averaging it in would flatter the figure).
        if k["config"] in ("trace_all", "counters"):
            runs = [p for p in k.get("programs", []) if "reset" in p["name"] and p["ns_per_run"] is not None]
            if runs:
                worst = max(p["ns_per_run"] for p in runs)
                out.append(("in-kernel cost <= 200 ns per event, %s (worst reset program)" % k["config"],
                            worst <= 200, ", ".join("%s %.0f ns" % (p["name"], p["ns_per_run"]) for p in runs)))
    for m in results.get("memory", []):
        # RSS after the events (the target's words); the peak (VmHWM, bcc's compile at start) beside it
        rss = [x["rss_kib"] for x in m.get("samples", []) if x.get("rss_kib")]
        end = rss[-1] / 1024 if rss else 0.0
        hwm = (m.get("hwm_kib") or 0) / 1024
        done = m["events_generated"] >= m["events_target"]
        out.append(("RSS <= 100 MB and flat, %s, %s events / %s peers" % (
            m["config"], _si(m["events_target"]), _si(m["peers"])),
            bool(rss) and end <= 100 and bool(m.get("flat")) and done,
            "%.0f MiB after, peak %.0f MiB, %s%s" % (
                end, hwm, "flat" if m.get("flat") else "grows",
                "" if done else ", only %s events made" % _si(m["events_generated"]))))
    return out


def render(results: Dict[str, Any]) -> str:
    return "\n".join(_header(results) + _sections(results, md=False))


def markdown(results: Dict[str, Any]) -> str:
    return "\n".join(_header(results) + _sections(results, md=True))
