"""Prometheus side: the exposition passes `promtool check metrics`, the configs and rules
pass `promtool check`, every alert and recording rule has a passing unit test, every PromQL
expression in the rules and dashboards names only metrics this project (or Bytewax, the
process collector, Jaeger's span metrics) exports or that deploy/README.md lists as an
exporter's (the broker's, the hosts', DCGM's), the dashboards are valid, and a real
Prometheus server scrapes `start_metrics_server` and counts what was fed.

promtool and prometheus come from the Debian `prometheus` package: without them these
tests are skipped, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from operators.telemetry.metrics import LagTracker, PipelineMetrics, start_metrics_server
from tests import metrics_data as data
from tests.integration.metric_names import (
    RULE_FILES,
    RULE_TESTS,
    all_rules,
    dashboard_expressions,
    exported_names,
    external_metrics,
    is_own,
    metric_names,
    rules,
)
from tests.metrics_data import TRACE_ID, free_port, populated_registry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
START_TIMEOUT_S = 20.0


def require(tool: str) -> str:
    """The path of `tool`; skip the test without it, fail under CI=true."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} not found: install the Debian package `prometheus`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (.ci/install-system-packages.sh)")
        pytest.skip(message)
    return path


def run(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    """Run a command; fail the test with its output when it exits non-zero."""
    proc = subprocess.run(args, input=stdin, capture_output=True, cwd=cwd, timeout=60)
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def alert_rules() -> list[dict[str, Any]]:
    """The alerting rules of every rule file Prometheus loads."""
    return [rule for rule in all_rules() if "alert" in rule]


def known(name: str) -> bool:
    """Whether a metric name is this project's or an exporter's listed in deploy/README.md."""
    return is_own(name, EXPORTED) or name in EXTERNAL


EXPORTED = exported_names()
EXTERNAL = set(external_metrics())


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{stage="x", i=~"$i"}[5m])))'
        " / on (instance) b_total * 1e6 and up == 0"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up"}


def test_promtool_check_metrics_on_populated_exposition() -> None:
    promtool = require("promtool")
    registry, _ = populated_registry()
    exposition = generate_latest(registry)
    assert b"streamsight_gpu_utilization_ratio" in exposition
    assert b"streamsight_kafka_consumer_lag_records" in exposition
    output = run(promtool, "check", "metrics", stdin=exposition)
    assert "streamsight" not in output, output


def test_promtool_check_config_and_rules() -> None:
    promtool = require("promtool")
    run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)
    document = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert document["rule_files"] == list(RULE_FILES)
    for rule_file in RULE_FILES:
        output = run(promtool, "check", "rules", rule_file, cwd=PROMETHEUS_DIR)
        assert f"{len(rules(rule_file))} rules found" in output


def test_kubernetes_config() -> None:
    promtool = require("promtool")
    document = yaml.safe_load((PROMETHEUS_DIR / "prometheus-kubernetes.yml").read_text())
    assert document["rule_files"] == list(RULE_FILES)
    jobs = {c["job_name"]: c for c in document["scrape_configs"]}
    assert {"streamsight-kubernetes", "bytewax-kubernetes", "jaeger-spanmetrics"} <= set(jobs)
    # The broker's and hosts' jobs carry the names the infrastructure alerts select.
    assert {"kafka", "node-exporter", "dcgm-exporter"} <= set(jobs)
    assert jobs["dcgm-exporter"]["honor_labels"] is True
    for config in jobs.values():
        assert config["kubernetes_sd_configs"][0]["role"] == "pod"
    proc = subprocess.run(
        [promtool, "check", "config", "prometheus-kubernetes.yml"],
        capture_output=True,
        cwd=PROMETHEUS_DIR,
        timeout=60,
    )
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    if "field kubernetes_sd_configs not found" in output:
        pytest.skip("this Prometheus build has no Kubernetes service discovery (Debian's)")
    assert proc.returncode == 0, output


def test_compose_config_targets() -> None:
    document = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {
        c["job_name"]: t for c in document["scrape_configs"] for t in c.get("static_configs", [])
    }
    # Two single-worker processes in the compose service: one target each.
    assert targets["streamsight"]["targets"] == ["streamsight:9464", "streamsight:9465"]
    assert targets["bytewax"]["targets"] == ["streamsight:3030", "streamsight:3031"]
    assert targets["jaeger-spanmetrics"]["targets"] == ["jaeger:8889"]
    assert targets["kafka"]["targets"] == ["kafka:9404"]
    assert targets["node-exporter"]["targets"] == ["host.docker.internal:9100"]
    (dcgm,) = [c for c in document["scrape_configs"] if c["job_name"] == "dcgm-exporter"]
    assert dcgm["dns_sd_configs"] == [{"names": ["dcgm-exporter"], "type": "A", "port": 9400}]


def test_alerts_select_the_jobs_the_scrape_configs_define() -> None:
    selected = {job for rule in alert_rules() for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    for config_file in ("prometheus.yml", "prometheus-kubernetes.yml"):
        document = yaml.safe_load((PROMETHEUS_DIR / config_file).read_text())
        jobs = {c["job_name"] for c in document["scrape_configs"]}
        assert selected <= jobs, (config_file, selected - jobs)


def test_promtool_test_rules_covers_every_rule() -> None:
    promtool = require("promtool")
    firing: set[str] = set()
    tested_exprs: list[str] = []
    for tests_file in RULE_TESTS:
        run(promtool, "test", "rules", tests_file, cwd=PROMETHEUS_DIR)
        document = yaml.safe_load((PROMETHEUS_DIR / tests_file).read_text())
        firing |= {
            case["alertname"]
            for test in document["tests"]
            for case in test.get("alert_rule_test", [])
            if case.get("exp_alerts")
        }
        tested_exprs += [
            case["expr"]
            for test in document["tests"]
            for case in test.get("promql_expr_test", [])
            if case.get("exp_samples")
        ]
    assert firing == {rule["alert"] for rule in alert_rules()}
    # Every recording rule's output is checked by some promql_expr_test.
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    assert recorded <= set().union(*(metric_names(e) for e in tested_exprs))


def test_rules_reference_only_known_metrics_and_alerts_have_runbooks() -> None:
    for rule in all_rules():
        for name in metric_names(rule["expr"]):
            assert known(name), (rule.get("alert") or rule["record"], name)
    for rule in alert_rules():
        assert {"summary", "description", "runbook"} <= set(rule["annotations"])
        assert rule["labels"]["severity"] in {"warning", "critical"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_is_valid_and_uses_exported_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"].startswith("streamsight-")
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "prometheus"
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
    exprs = dashboard_expressions(dashboard)
    assert exprs
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        for name in metric_names(expr):
            assert known(name), (path.name, name)


def test_dashboard_set_and_provisioning() -> None:
    stems = {p.stem for p in DASHBOARDS}
    assert stems == {
        "overview", "kafka-ingest", "preprocessing", "batching", "inference-gpu", "sink",
        "compute-per-job", "kafka-broker", "host",
    }  # fmt: skip
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))
    overview = json.loads((GRAFANA_DIR / "dashboards" / "overview.json").read_text())
    first = overview["panels"][0]
    names = set().union(*(metric_names(t["expr"]) for t in first["targets"]))
    assert "streamsight_kafka_consumer_lag_records" in names
    assert "streamsight_inference_batch_duration_seconds_bucket" in names
    # The row that tells pipeline, model, Kafka and machine apart, side by side at the top.
    top = sorted(
        (p for p in overview["panels"] if p["gridPos"]["y"] == 0), key=lambda p: p["gridPos"]["x"]
    )
    top_names = [set().union(*(metric_names(t["expr"]) for t in p["targets"])) for p in top]
    assert "streamsight_kafka_consumer_lag_records" in top_names[0]
    assert "streamsight_inference_batch_duration_seconds_bucket" in top_names[1]
    assert "kafka_server_brokertopicmetrics_bytesin_total" in top_names[2]
    assert "node_cpu_seconds_total" in top_names[3]
    # GPU utilisation from the pipeline's NVML gauge and from DCGM, on one panel.
    (gpu,) = [p for p in overview["panels"] if p["title"].startswith("GPU utilisation")]
    gpu_names = set().union(*(metric_names(t["expr"]) for t in gpu["targets"]))
    assert {"streamsight_gpu_utilization_ratio", "streamsight:dcgm_gpu_utilization:ratio"} <= (
        gpu_names
    )
    with_exemplars = [
        t for p in DASHBOARDS for panel in json.loads(p.read_text())["panels"]
        for t in panel["targets"] if t.get("exemplar")
    ]  # fmt: skip
    assert len(with_exemplars) >= 5
    sources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "datasources.yml").read_text()
    )["datasources"]
    by_uid = {s["uid"]: s for s in sources}
    assert by_uid["jaeger"]["type"] == "jaeger"
    destinations = by_uid["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert destinations == [{"name": "trace_id", "datasourceUid": "jaeger"}]
    providers = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml").read_text()
    )["providers"]
    assert providers[0]["type"] == "file"


# A real Prometheus scraping start_metrics_server -----------------------------------------

FRAMES = 45
PARTITIONS = 3
HIGH_WATERMARK = 1000


def _feed(metrics: PipelineMetrics) -> dict[int, int]:
    """Push FRAMES frames through every pipeline hook, 5 per batch, spread over
    PARTITIONS partitions; return the last offset per partition."""
    last: dict[int, int] = {}
    for start in range(0, FRAMES, 5):
        metas = [
            data.meta(seq, partition=seq % PARTITIONS, job_id=f"job-{seq % 2}")
            for seq in range(start, start + 5)
        ]
        batch = data.batch(metas, wait_ns=2_000_000)
        metrics.record_batch(batch, max_size=8)
        with metrics.measure_inference(batch, device="cpu"):
            results = [data.result(meta, len(metas)) for meta in metas]
        metrics.results_written(results, 0, time.time_ns())
        for meta in metas:
            last[meta.partition] = max(last.get(meta.partition, -1), meta.offset)
    return last


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A real Prometheus (1 s scrapes, exemplar storage, the project's alert rules) scraping
    a metrics port it yields with its own base URL: (url, metrics_port)."""
    binary = require("prometheus")
    metrics_port, web_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / rule_file) for rule_file in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": "streamsight",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
                "--enable-feature=exemplar-storage",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{web_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus not ready within 20 s"
            time.sleep(0.1)
        yield url, metrics_port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def api(url: str, path: str, **params: str) -> Any:
    """GET a Prometheus HTTP API path; its `data`."""
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}{path}?{query}", timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def wait_for(url: str, query: str, predicate: Any, timeout_s: float = 20.0) -> list[Any]:
    """Run `query` until `predicate(result)` holds; return that result."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = api(url, "/api/v1/query", query=query)["result"]
        if predicate(result):
            return result
        assert time.monotonic() < deadline, f"{query}: {result}"
        time.sleep(0.25)


def test_real_prometheus_scrapes_fed_metrics(prometheus_server: tuple[str, int]) -> None:
    url, metrics_port = prometheus_server
    registry = CollectorRegistry()
    lag = LagTracker(registry=registry, read_high_watermark=lambda t, p: HIGH_WATERMARK)
    metrics = PipelineMetrics(registry, lag=lag)
    last = _feed(metrics)
    lag.refresh()
    start_metrics_server(metrics_port, "127.0.0.1", registry=registry)

    frames = wait_for(
        url,
        'sum(streamsight_inference_frames_total{job="streamsight"})',
        lambda r: bool(r) and float(r[0]["value"][1]) == FRAMES,
    )
    assert float(frames[0]["value"][1]) == FRAMES
    written = api(url, "/api/v1/query", query="streamsight_sink_rows_written_total")["result"]
    assert {r["metric"]["sink"]: float(r["value"][1]) for r in written} == {
        "results": FRAMES,
        "dead_letters": 0.0,
    }
    lag_result = wait_for(
        url,
        "streamsight_kafka_consumer_lag_records",
        lambda r: len(r) == PARTITIONS,
    )
    by_partition = {int(r["metric"]["partition"]): float(r["value"][1]) for r in lag_result}
    assert by_partition == {p: HIGH_WATERMARK - (offset + 1) for p, offset in last.items()}
    seconds = api(url, "/api/v1/query", query="streamsight_kafka_consumer_lag_seconds")["result"]
    assert {r["metric"]["partition"] for r in seconds} == {str(p) for p in range(PARTITIONS)}
    jobs = api(url, "/api/v1/query", query="sum by (job_id) (streamsight_job_frames_total)")
    assert {r["metric"]["job_id"]: float(r["value"][1]) for r in jobs["result"]} == {
        "job-0": 23.0,
        "job-1": 22.0,
    }

    now = time.time()
    exemplars = api(
        url,
        "/api/v1/query_exemplars",
        query="streamsight_inference_frames_total",
        start=str(now - 60),
        end=str(now + 1),
    )
    trace_ids = {e["labels"]["trace_id"] for series in exemplars for e in series["exemplars"]}
    assert trace_ids == {TRACE_ID}

    groups = api(url, "/api/v1/rules")["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {rule.get("alert") or rule["record"] for rule in all_rules()}
