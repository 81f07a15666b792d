"""Which metric names the dashboards and Prometheus rule files use, which of them are this
project's, and the table of external names (exporter, version, documentation) in
deploy/README.md. Shared by the Prometheus, dashboard and observability-stack tests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.metrics_data import populated_registry

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
DEPLOY_README = ROOT / "deploy" / "README.md"
# The rule files Prometheus loads (prometheus.yml's rule_files), each with its unit tests.
RULE_FILES = ("alerts.yml", "infrastructure-alerts.yml", "dcgm-rules.yml")
RULE_TESTS = (
    "tests/alerts_test.yml",
    "tests/infrastructure_alerts_test.yml",
    "tests/dcgm_rules_test.yml",
)
# Served by the dataflow's own processes besides its registry: Bytewax, the Python process
# and platform collectors, Jaeger's span metrics; `up` is Prometheus's own.
OWN_PREFIXES = ("bytewax_", "process_", "python_", "traces_span_metrics_")
OWN_NAMES = {"up"}
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "offset", "bool", "inf", "nan",
}  # fmt: skip
TABLE_HEADING = "### External metric names"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def rules(file_name: str) -> list[dict[str, Any]]:
    """The rules (alerting and recording) of one rule file in deploy/prometheus."""
    document = yaml.safe_load((PROMETHEUS_DIR / file_name).read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def all_rules() -> list[dict[str, Any]]:
    """Every rule of every rule file Prometheus loads."""
    return [rule for file_name in RULE_FILES for rule in rules(file_name)]


def recorded_names() -> set[str]:
    """The series the recording rules write."""
    return {rule["record"] for rule in all_rules() if "record" in rule}


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: its panels' targets and its variables'
    label_values() metrics."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query or "")
        if match:
            exprs.append(match.group(1))
    return exprs


def used_names() -> dict[str, set[str]]:
    """Every metric name the dashboards and rule files use, with where it is used."""
    used: dict[str, set[str]] = {}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        for expr in dashboard_expressions(json.loads(path.read_text())):
            for name in metric_names(expr):
                used.setdefault(name, set()).add(path.name)
    for file_name in RULE_FILES:
        for rule in rules(file_name):
            for name in metric_names(rule["expr"]):
                used.setdefault(name, set()).add(file_name)
    return used


def exported_names() -> set[str]:
    """Every sample name a populated registry of the dataflow exposes (histogram suffixes
    included)."""
    registry, _ = populated_registry()
    return {s.name for family in registry.collect() for s in family.samples}


def is_own(name: str, exported: set[str]) -> bool:
    """Whether `name` is served by this project (its registry, its rules, its processes)."""
    return (
        name in exported
        or name in OWN_NAMES
        or name.startswith(OWN_PREFIXES)
        or name in recorded_names()
    )


@dataclass(frozen=True)
class ExternalMetric:
    """One row of the external metric table: who serves the name, and where it is
    documented."""

    name: str
    served_by: str
    documentation: str


def external_metrics() -> dict[str, ExternalMetric]:
    """The rows of the table under "External metric names" in deploy/README.md."""
    text = DEPLOY_README.read_text()
    assert TABLE_HEADING in text, f"{TABLE_HEADING!r} missing from deploy/README.md"
    section = text.split(TABLE_HEADING, 1)[1].split("\n#", 1)[0]
    table: dict[str, ExternalMetric] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 3, line
        name = re.match(r"`([^`]+)`", cells[0])
        assert name, line
        assert name.group(1) not in table, f"{name.group(1)} listed twice"
        table[name.group(1)] = ExternalMetric(name.group(1), cells[1], cells[2])
    return table
