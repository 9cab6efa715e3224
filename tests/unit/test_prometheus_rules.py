"""deploy/prometheus (rules + promtool unit tests) and deploy/grafana (dashboard) stay valid and
stay on the exporter's metric contract.

promtool comes from Debian's ``prometheus`` package
(``apt-get install -y --no-install-recommends prometheus``).  Without it the promtool tests are
skipped locally but FAIL when CI=true, so CI cannot silently stop checking the alerts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML; stubs (types-PyYAML) optional

from rsttrace.sinks.exporter import OVERFLOW_KIND, SYN_QUEUE_KIND

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
RULES = PROM_DIR / "rules.yml"
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
DASHBOARD = REPO / "deploy" / "grafana" / "rsttrace-dashboard.json"

# The exporter's metric contract (what `rsttrace export` exposes).
CONTRACT_METRICS = frozenset(
    {
        "rsttrace_tcp_resets_sent_total",
        "rsttrace_tcp_resets_received_total",
        "rsttrace_tcp_listen_overflows_total",
        "rsttrace_events_lost_total",
        "rsttrace_program_attached",
        "rsttrace_build_info",
    }
    | {
        "rsttrace_kernel_tcp_%s_total" % (name,)
        for name in (
            "out_rsts",
            "estab_resets",
            "listen_overflows",
            "listen_drops",
            "abort_on_data",
            "abort_on_close",
            "abort_on_memory",
            "abort_on_timeout",
            "abort_on_linger",
            "req_q_full_drop",
            "req_q_full_do_cookies",
        )
    }
)

_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
     "atan2", "inf", "nan", "Inf", "NaN"}
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARS = re.compile(r"\$\{?\w+\}?")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> Set[str]:
    """Metric (or recording rule) names a PromQL expression selects: a small lexer, not a parser.

    Strips strings, Grafana variables, label matchers, ranges and grouping clauses; what is left
    that is an identifier not followed by '(' and not a keyword is a metric name.
    """
    text = _STRINGS.sub('""', expr)
    text = _GRAFANA_VARS.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: Set[str] = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def _promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    message = (
        "promtool not found: install Debian's prometheus package "
        "(apt-get install -y --no-install-recommends prometheus)"
    )
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail("%s; CI=true, so the alert rules must be checked, not skipped" % (message,))
    pytest.skip(message)


def _run(cmd: List[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, check=False)


def _load_yaml(path: Path) -> Any:
    with path.open() as handle:
        return yaml.safe_load(handle)


def _rules() -> List[Dict[str, Any]]:
    doc = _load_yaml(RULES)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts() -> List[Dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _recorded() -> Set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def _dashboard() -> Dict[str, Any]:
    with DASHBOARD.open() as handle:
        data: Dict[str, Any] = json.load(handle)
    return data


def _panels(panels: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_exprs() -> List[Tuple[str, str]]:
    """(panel title, expr) for every query target of every panel."""
    return [(str(panel.get("title")), target["expr"])
            for panel in _panels(_dashboard()["panels"])
            for target in panel.get("targets", []) if "expr" in target]


# --- the lexer itself ----------------------------------------------------------------------------

def test_metric_names_lexer() -> None:
    expr = ('sum without (state) (rate(rsttrace_tcp_resets_sent_total{reason=~"TCP_ABORT_ON_.+",'
            'instance=~"$instance"}[$__rate_interval] offset 5m)) > 10 * clamp_min(a:b:c, 0.5) '
            "unless on (job, instance) max by (x) (rsttrace_build_info) or vector(1e3)")
    assert metric_names(expr) == {"rsttrace_tcp_resets_sent_total", "a:b:c", "rsttrace_build_info"}
    assert metric_names("topk(10, sum by (reason) (increase(m_total[$__range])))") == {"m_total"}


# --- Prometheus rules ------------------------------------------------------------------------------

def test_promtool_check_rules() -> None:
    result = _run([_promtool(), "check", "rules", str(RULES)], PROM_DIR)
    assert result.returncode == 0, result.stdout


def test_promtool_rule_unit_tests() -> None:
    assert RULE_TESTS, "deploy/prometheus/tests/*.yml is empty"
    result = _run([_promtool(), "test", "rules", *[str(p) for p in RULE_TESTS]], PROM_DIR)
    assert result.returncode == 0, result.stdout


def test_rule_exprs_use_only_contract_metrics_and_recorded_rules() -> None:
    allowed = CONTRACT_METRICS | _recorded()
    for rule in _rules():
        name = rule.get("alert") or rule.get("record")
        used = metric_names(rule["expr"])
        assert used, "%s: no metric found in %r" % (name, rule["expr"])
        unknown = used - allowed
        assert not unknown, "%s: unknown metrics %s" % (name, sorted(unknown))


def test_recording_rules_follow_naming_convention() -> None:
    for name in _recorded():
        level, metric, operations = name.split(":")
        assert level and operations, name
        assert metric.startswith("rsttrace_") and not metric.endswith("_total"), name


def test_every_alert_has_severity_summary_and_hints() -> None:
    alerts = _alerts()
    assert len(alerts) >= 6
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"Rsttrace[A-Z][A-Za-z]+", name), name
        assert alert.get("labels", {}).get("severity") in ("warning", "critical"), name
        annotations = alert.get("annotations", {})
        assert annotations.get("summary", "").strip(), name
        description = annotations.get("description", "")
        assert "Check" in description, "%s: description must say what to check" % (name,)


def test_required_alerts_exist() -> None:
    exprs = {alert["alert"]: alert["expr"] for alert in _alerts()}
    recorded = {rule["record"]: rule["expr"] for rule in _rules() if "record" in rule}

    def expanded(name: str) -> str:  # an alert's expr with the recording rules it uses inlined once
        expr = str(exprs[name])
        return expr + " ".join(str(recorded[m]) for m in metric_names(expr) if m in recorded)

    assert 'reason="NO_SOCKET"' in exprs["RsttraceNoSocketResetBurst"]
    assert "TCP_ABORT_ON_" in exprs["RsttraceAbortResetsRising"]
    assert "rsttrace_kernel_tcp_listen_overflows_total" in expanded("RsttraceListenOverflow")
    assert "req_q_full" in expanded("RsttraceSynQueueOverflow")
    assert "rsttrace_kernel_tcp_out_rsts_total" in " ".join(
        recorded[m] for m in metric_names(expanded("RsttraceCoverageLow")) if m in recorded)
    assert "rsttrace_program_attached" in exprs["RsttraceProgramNotAttached"]
    assert "rsttrace_events_lost_total" in exprs["RsttraceEventsLost"]


def _overflow_kinds(text: str) -> Set[str]:
    """The kind values a PromQL text or series selects on rsttrace_tcp_listen_overflows_total
    (kind="a" or kind=~"a|b"; the alternatives are literals)."""
    kinds: Set[str] = set()
    for match in re.finditer(r'rsttrace_tcp_listen_overflows_total\{([^{}]*)\}', text):
        for op, value in re.findall(r'\bkind\s*(=~|=)\s*"([^"]*)"', match.group(1)):
            kinds.update(value.split("|") if op == "=~" else [value])
    return kinds


def test_overflow_kinds_are_the_exporters() -> None:
    """Rules, their unit tests and the dashboard select only kinds the exporter exports (a renamed
    kind, like syn_queue split into syn_queue_drop/syn_cookie, must not leave an alert silent)."""
    exported = set(OVERFLOW_KIND.values()) | set(SYN_QUEUE_KIND.values())
    assert {"syn", "ack", "syn_queue_drop", "syn_cookie", "syn_drop"} <= exported
    texts = [("rules.yml", RULES.read_text())]
    texts += [(path.name, path.read_text()) for path in RULE_TESTS]
    texts += [(title, expr) for title, expr in _dashboard_exprs()]
    used: Set[str] = set()
    for where, text in texts:
        kinds = _overflow_kinds(text)
        assert not kinds - exported, "%s: kinds the exporter does not export: %s" % (where, sorted(kinds - exported))
        used |= kinds
    # Refused SYNs and SYNs absorbed by cookies are told apart: each is selected somewhere.
    assert {"syn_queue_drop", "syn_drop", "syn_cookie"} <= used


def test_syn_alerts_read_rsttraces_per_namespace_counts() -> None:
    """The host namespace's kernel counters miss a flood in a pod: the SYN alerts select
    rsttrace's own kinds; drops and cookies are separate alerts."""
    exprs = {alert["alert"]: alert["expr"] for alert in _alerts()}
    recorded = {rule["record"]: rule["expr"] for rule in _rules() if "record" in rule}

    def kinds(name: str) -> Set[str]:
        expr = str(exprs[name])
        return _overflow_kinds(expr + " ".join(str(recorded[m]) for m in metric_names(expr) if m in recorded))

    assert kinds("RsttraceSynQueueDrops") == {"syn_queue_drop", "syn_drop"}
    assert kinds("RsttraceSynQueueOverflow") == {"syn_cookie"}


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    fired: Set[str] = set()
    quiet: Set[str] = set()
    for path in RULE_TESTS:
        doc = _load_yaml(path)
        assert doc.get("rule_files") == ["../rules.yml"], path
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {alert["alert"] for alert in _alerts()}
    assert not names - fired, "alerts never shown to fire: %s" % sorted(names - fired)
    assert not names - quiet, "alerts never shown to stay quiet: %s" % sorted(names - quiet)


# --- Grafana dashboard ----------------------------------------------------------------------------

def test_dashboard_parses_with_schema_and_variables() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] >= 36
    assert dash.get("title") and dash.get("uid")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert "instance" in json.dumps(instance["query"])


def test_every_panel_has_a_title_and_uses_the_datasource_variable() -> None:
    panels = list(_panels(_dashboard()["panels"]))
    assert panels
    for panel in panels:
        assert str(panel.get("title", "")).strip(), "panel %s has no title" % panel.get("id")
        if panel.get("type") == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("targets"), "%s: no query" % (panel["title"],)
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert "$instance" in target["expr"], "%s: query ignores $instance" % (panel["title"],)


def test_dashboard_has_the_required_panels() -> None:
    titles = " | ".join(title.lower() for title, _ in _dashboard_exprs())
    for words in ("sent resets by reason", "received resets by state", "listen overflows by kind and port",
                  "coverage", "events lost", "attached programs"):
        assert words in titles, words


def test_dashboard_exprs_use_only_contract_metrics_and_recorded_rules() -> None:
    allowed = CONTRACT_METRICS | _recorded()
    for title, expr in _dashboard_exprs():
        used = metric_names(expr)
        assert used, "%s: no metric in %r" % (title, expr)
        unknown = used - allowed
        assert not unknown, "%s: unknown metrics %s" % (title, sorted(unknown))


def test_dashboard_exprs_are_valid_promql(tmp_path: Path) -> None:
    promtool = _promtool()
    substitutions = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
    rules = []
    for index, (_, expr) in enumerate(_dashboard_exprs()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        rules.append({"record": "dashboard:query_%s:check" % (index,), "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)], tmp_path)
    assert result.returncode == 0, result.stdout
