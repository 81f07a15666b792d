"""The running dataflow's metrics: a real Prometheus scrapes `python -m bytewax.run
flows.video` against a Kafka-protocol broker, and PromQL sees every frame sent, lag per
partition equal to the broker's watermarks minus what was processed, and per-stage CPU
time; `promtool check metrics` accepts the live exposition, and a password planted in the
configuration shows neither there nor in the logs. Scraping both the flow's port and
Bytewax's API port as deploy/prometheus/prometheus.yml does, every query of every
dashboard parses and answers with a number, but those on series a CPU run here cannot
produce (`EXPECTED_EMPTY`); every stage reports under its step id."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from operators import stages
from operators.kafka_io import high_watermarks
from tests.fixtures.kafka import REPO_ROOT, subprocess_env
from tests.integration.kafka_frames import DEAD_LETTERS, fill_topic, flow_settings, flow_topics
from tests.integration.metric_names import DASHBOARD_DIR, PROMETHEUS_DIR, dashboard_expressions
from tests.integration.test_observability_stack import prometheus_scraping, queries_without_data
from tests.integration.test_prometheus import api, prometheus_server, require, wait_for
from tests.metrics_data import free_port

pytestmark = pytest.mark.integration
PLANTED = "planted-Secr3t-value"
__all__ = ["prometheus_server"]


def test_prometheus_sees_every_frame_and_the_lag_of_the_running_flow(
    prometheus_server, kafka_bootstrap, kafka_config, create_topic, unique_topic, tmp_path: Path
) -> None:
    url, metrics_port = prometheus_server
    topics = flow_topics(create_topic, unique_topic)
    expected = fill_topic(
        kafka_config, topics["frames"], cameras=4, frames_per_camera=15, job_id="metrics"
    )
    env = subprocess_env(
        **flow_settings(kafka_bootstrap, topics, tmp_path / "sink.db"),
        STREAMSIGHT_METRICS_PORT=str(metrics_port),
        STREAMSIGHT_METRICS_ADDR="127.0.0.1",
        STREAMSIGHT_LAG_INTERVAL_S="0.5",
        OTEL_SDK_DISABLED="true",
        STREAMSIGHT_SASL_PASSWORD=PLANTED,
        STREAMSIGHT_SSL_KEY_PASSWORD=PLANTED,
    )
    flow = subprocess.Popen(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        frames = wait_for(
            url,
            "sum(streamsight_sink_rows_written_total{sink='results'})",
            lambda r: r and float(r[0]["value"][1]) >= len(expected),
            timeout_s=90,
        )
        assert float(frames[0]["value"][1]) == len(expected)
        # The two repeats of cam-0/0 are inferred too; the sink then skips one (duplicate)
        # and dead-letters the other (conflict).
        inferred = wait_for(url, "streamsight_inference_frames_total", lambda r: bool(r))
        assert float(inferred[0]["value"][1]) == len(expected) + 2
        duplicates = wait_for(url, "streamsight_sink_duplicates_ignored_total", lambda r: bool(r))
        assert float(duplicates[0]["value"][1]) == 1
        letters = wait_for(
            url,
            "sum(streamsight_dead_letters_total)",
            lambda r: r and float(r[0]["value"][1]) >= DEAD_LETTERS,
        )
        assert float(letters[0]["value"][1]) == DEAD_LETTERS

        # Lag: the watermarks read with a separate client, minus what the flow processed.
        watermarks = high_watermarks(kafka_config, topics["frames"])
        lag = wait_for(
            url,
            f"streamsight_kafka_consumer_lag_records{{topic='{topics['frames']}'}}",
            lambda r: len(r) == len(watermarks) and all(float(s["value"][1]) == 0 for s in r),
            timeout_s=30,
        )
        assert sorted(int(s["metric"]["partition"]) for s in lag) == sorted(watermarks)

        # Every stage reported thread CPU time; inference did real work.
        cpu = wait_for(url, "streamsight_stage_cpu_seconds_total", lambda r: len(r) >= 5)
        by_stage = {s["metric"]["stage"]: float(s["value"][1]) for s in cpu}
        assert by_stage["infer"] > 0 and by_stage["decode"] > 0

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            exposition = response.read()
        check = subprocess.run(
            [require("promtool"), "check", "metrics"], input=exposition, capture_output=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert b'job_id="metrics"' in exposition
        assert PLANTED.encode() not in exposition
    finally:
        flow.kill()
        _, stderr = flow.communicate(timeout=30)
    assert PLANTED.encode() not in stderr


def _cpu_sample(port: int) -> tuple[float, float, float] | None:
    """(sum of stage CPU seconds, process CPU seconds, result rows) from /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    stages = re.findall(r"^streamsight_stage_cpu_seconds_total\{[^}]*\} (\S+)", text, re.M)
    process = re.search(r"^process_cpu_seconds_total (\S+)", text, re.M)
    rows = re.search(r'^streamsight_sink_rows_written_total\{sink="results"\} (\S+)', text, re.M)
    if process is None or rows is None:
        return None
    return sum(float(v) for v in stages), float(process.group(1)), float(rows.group(1))


def test_stage_cpu_seconds_account_for_the_process_cpu_in_a_busy_run(
    kafka_bootstrap, kafka_config, create_topic, unique_topic, tmp_path: Path
) -> None:
    topic = unique_topic("frames")
    create_topic(topic, 4)
    fill_topic(kafka_config, topic, cameras=4, frames_per_camera=250, job_id="busy")
    port = free_port()
    env = subprocess_env(
        STREAMSIGHT_BROKERS=kafka_bootstrap,
        STREAMSIGHT_INPUT_TOPIC=topic,
        STREAMSIGHT_OUTPUT_TOPIC=unique_topic("detections"),
        STREAMSIGHT_DEAD_LETTER_TOPIC=unique_topic("dead"),
        STREAMSIGHT_STOP_AT_END="true",
        STREAMSIGHT_SINK=f"sqlite:///{tmp_path / 'sink.db'}",
        STREAMSIGHT_METRICS_PORT=str(port),
        STREAMSIGHT_METRICS_ADDR="127.0.0.1",
        OTEL_SDK_DISABLED="true",
    )
    flow = subprocess.Popen(
        [sys.executable, "-m", "bytewax.run", "flows.video"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = last = None
    try:
        # The window runs from 100 frames written (start-up done) to 800 (still busy).
        while flow.poll() is None:
            sample = _cpu_sample(port)
            if sample is not None and first is None and sample[2] >= 100:
                first = sample
            if sample is not None and first is not None and sample[2] >= 800:
                last = sample
                break
            time.sleep(0.05)
    finally:
        flow.kill()
        flow.wait(timeout=30)
    assert first is not None and last is not None, "the run ended before a busy window"
    stage_cpu, process_cpu = last[0] - first[0], last[1] - first[1]
    assert process_cpu > 0.5
    assert abs(stage_cpu - process_cpu) <= 0.15 * process_cpu, (stage_cpu, process_cpu)


# Dashboard queries on series that a CPU run against the embedded broker cannot produce,
# by a pattern of the query, with why. Each still has to parse.
EXPECTED_EMPTY = {
    r"\bnode_": "node-exporter's host series (answered by a real node-exporter in "
    "test_observability_stack)",
    r'\bkafka_|job="kafka"': "the Kafka broker's JMX exporter (no broker JVM here; answered "
    "by a stand-in in test_observability_stack)",
    r"streamsight_gpu_|streamsight_cuda_|streamsight:dcgm_|device=\"cuda\"": "a GPU (NVML, "
    "torch.cuda, DCGM): none on this machine",
    r"traces_span_metrics_": "Jaeger's span metrics connector: no Jaeger here",
}
# Grafana's variables, as it fills them for "All" and a window that covers the whole run.
VARIABLES = {"$instance": ".*", "$host": ".*", "$broker": ".*"}
WINDOW = "1m"


def dashboard_queries() -> list[tuple[str, str]]:
    """(dashboard, query) for every query of every dashboard, variables filled in."""
    out = []
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        for expr in dashboard_expressions(json.loads(path.read_text())):
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            expr = expr.replace("$__rate_interval", WINDOW).replace("$__range", WINDOW)
            out.append((path.name, expr))
    return out


def expected_empty(query: str) -> str | None:
    """Why `query` gets no data in a CPU run, or None when it must get data."""
    return next((why for pattern, why in EXPECTED_EMPTY.items() if re.search(pattern, query)), None)


def test_expected_empty_queries_are_only_those_of_absent_exporters() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 100
    empty = [q for _, q in queries if expected_empty(q)]
    # Everything of the pipeline's own stages must answer: none of their series is listed.
    assert not [q for q in empty if re.search(r"streamsight_(stage|batch|sink|dead)", q)], empty
    assert len(empty) < len(queries) / 2


def _bytewax_scrape(api_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml's `bytewax` job (Bytewax's own series only), aimed
    at `api_port`."""
    document = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = [c for c in document["scrape_configs"] if c["job_name"] == "bytewax"]
    return {**job, "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]}


@contextmanager
def flow_with_bytewax_api(
    env: dict[str, str], metrics_port: int, api_port: int, tmp_path: Path
) -> Iterator[str]:
    """`python -m bytewax.run flows.video` with `env`, its metrics on `metrics_port` and
    Bytewax's API on `api_port`, both scraped by a real Prometheus: yields its URL."""
    scrapes = ("streamsight", f"127.0.0.1:{metrics_port}", tmp_path, _bytewax_scrape(api_port))
    with prometheus_scraping(*scrapes) as url:
        flow = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "flows.video"],
            cwd=REPO_ROOT,
            env={
                **env,
                "STREAMSIGHT_METRICS_PORT": str(metrics_port),
                "STREAMSIGHT_METRICS_ADDR": "127.0.0.1",
                "BYTEWAX_DATAFLOW_API_ENABLED": "true",
                "BYTEWAX_DATAFLOW_API_PORT": str(api_port),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield url
        finally:
            flow.kill()
            flow.wait(timeout=30)


def test_every_dashboard_query_answers_from_the_running_flow(
    kafka_bootstrap, kafka_config, create_topic, unique_topic, tmp_path: Path
) -> None:
    topics = flow_topics(create_topic, unique_topic)
    expected = fill_topic(
        kafka_config, topics["frames"], cameras=4, frames_per_camera=10, job_id="dashboards"
    )
    env = subprocess_env(
        **flow_settings(kafka_bootstrap, topics, tmp_path / "sink.db"),
        STREAMSIGHT_LAG_INTERVAL_S="0.5",
        OTEL_SDK_DISABLED="true",
    )
    with flow_with_bytewax_api(env, free_port(), free_port(), tmp_path) as url:
        assert not queries_without_data(url, ["up"])  # Prometheus is answering
        wait_for(
            url,
            "sum(streamsight_sink_rows_written_total{sink='results'})",
            lambda r: r and float(r[0]["value"][1]) >= len(expected),
            timeout_s=90,
        )
        wait_for(
            url,
            "sum(streamsight_dead_letters_total)",
            lambda r: r and float(r[0]["value"][1]) >= DEAD_LETTERS,
        )
        # A rate needs an increase between two scrapes. A fast machine handles the first
        # batch inside one scrape interval, so a second batch follows once Prometheus holds
        # the first one's totals.
        again = fill_topic(
            kafka_config,
            topics["frames"],
            cameras=4,
            frames_per_camera=10,
            job_id="dashboards",
            first_seq=10,
        )
        wait_for(
            url,
            "sum(streamsight_sink_rows_written_total{sink='results'})",
            lambda r: r and float(r[0]["value"][1]) >= len(expected) + len(again),
            timeout_s=90,
        )
        # Every stage reports under its step id: Bytewax's series by its step path, ours
        # by the `stage` label.
        steps = wait_for(
            url,
            "sum by (step_id) (bytewax_item_inp_count_total)",
            lambda r: {s["metric"]["step_id"].split(".")[1] for s in r} >= set(stages.STAGES),
        )
        assert {s["metric"]["step_id"].split(".")[0] for s in steps} == {"streamsight"}
        called = api(url, "/api/v1/query", query="streamsight_stage_duration_seconds_count > 0")
        assert {s["metric"]["stage"] for s in called["result"]} == set(stages.STAGES)

        queries = dashboard_queries()
        for dashboard, query in queries:
            try:
                api(url, "/api/v1/query", query=query)
            except urllib.error.HTTPError as exc:  # 400: the query does not parse
                pytest.fail(f"{dashboard}: {query}: {exc.read().decode(errors='replace')}")
        wanted = [q for _, q in queries if expected_empty(q) is None]
        empty = queries_without_data(url, wanted)
        assert not empty, f"no data for: {empty}"
        not_a_number = [
            q
            for q in wanted
            if all(
                math.isnan(float(s["value"][1]))
                for s in api(url, "/api/v1/query", query=q)["result"]
            )
        ]
        assert not not_a_number, f"only NaN for: {not_a_number}"
