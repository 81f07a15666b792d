"""Write deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yml, so the
Prometheus Operator gets the same alert rules as the compose Prometheus.

    python deploy/k8s/prometheusrule.py          # rewrite the PrometheusRule
    python deploy/k8s/prometheusrule.py --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE = ROOT / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/alerts.yml by deploy/k8s/prometheusrule.py:\n"
    "# edit the alerts there, then run the script.\n"
)


def prometheus_rule(alerts: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule resource carrying the groups of a Prometheus rules file."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "streamsight",
            "labels": {
                "app.kubernetes.io/name": "streamsight",
                "app.kubernetes.io/part-of": "streamsight",
            },
        },
        "spec": {"groups": alerts["groups"]},
    }


def render(alerts_path: Path = ALERTS) -> str:
    """The PrometheusRule YAML for the rules file at `alerts_path`."""
    alerts = yaml.safe_load(alerts_path.read_text())
    body = yaml.safe_dump(prometheus_rule(alerts), sort_keys=False, allow_unicode=True, width=100)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    """Write the PrometheusRule, or with --check report whether it is up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not RULE.exists() or RULE.read_text() != text:
            print(f"{RULE} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    RULE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
