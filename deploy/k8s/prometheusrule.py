"""Write the PrometheusRule resources from the Prometheus rule files in deploy/prometheus/,
so the Prometheus Operator gets the same rules as the compose Prometheus:

    alerts.yml                 -> base/prometheusrule.yaml (the dataflow's alerts)
    infrastructure-alerts.yml  -> optional/monitoring/prometheusrule.yaml (broker, hosts)
    dcgm-rules.yml             -> overlays/gpu/prometheusrule-dcgm.yaml (DCGM series)

    python deploy/k8s/prometheusrule.py          # rewrite the PrometheusRules
    python deploy/k8s/prometheusrule.py --check  # exit 1 when one is out of date
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
K8S = ROOT / "deploy" / "k8s"
ALERTS = PROMETHEUS / "alerts.yml"
RULE = K8S / "base" / "prometheusrule.yaml"


@dataclass(frozen=True)
class Generated:
    """One PrometheusRule resource (`name`) written to `target` from rules file `source`."""

    source: Path
    target: Path
    name: str


GENERATED = (
    Generated(ALERTS, RULE, "streamsight"),
    Generated(
        PROMETHEUS / "infrastructure-alerts.yml",
        K8S / "optional" / "monitoring" / "prometheusrule.yaml",
        "streamsight-infrastructure",
    ),
    Generated(
        PROMETHEUS / "dcgm-rules.yml",
        K8S / "overlays" / "gpu" / "prometheusrule-dcgm.yaml",
        "streamsight-dcgm",
    ),
)


def header(source: Path) -> str:
    """The comment that opens a generated file: where it comes from."""
    relative = source.relative_to(ROOT).as_posix()
    return (
        f"# Generated from {relative} by deploy/k8s/prometheusrule.py:\n"
        "# edit the alerts there, then run the script.\n"
    )


def prometheus_rule(alerts: dict[str, Any], name: str = "streamsight") -> dict[str, Any]:
    """The PrometheusRule resource `name` carrying the groups of a Prometheus rules file."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "streamsight",
                "app.kubernetes.io/part-of": "streamsight",
            },
        },
        "spec": {"groups": alerts["groups"]},
    }


def render(alerts_path: Path = ALERTS, name: str = "streamsight") -> str:
    """The PrometheusRule YAML (resource `name`) for the rules file at `alerts_path`."""
    alerts = yaml.safe_load(alerts_path.read_text())
    body = yaml.safe_dump(
        prometheus_rule(alerts, name), sort_keys=False, allow_unicode=True, width=100
    )
    return header(alerts_path) + body


def main(argv: list[str] | None = None) -> int:
    """Write the PrometheusRules, or with --check report whether they are up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args(argv)
    stale = 0
    for generated in GENERATED:
        text = render(generated.source, generated.name)
        if not args.check:
            generated.target.write_text(text)
        elif not generated.target.exists() or generated.target.read_text() != text:
            print(f"{generated.target} is out of date: run {Path(__file__).name}", file=sys.stderr)
            stale += 1
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
