"""The exporters beside the pipeline: the Kafka broker's (Prometheus JMX exporter), the
hosts' (node-exporter) and the GPUs' (NVIDIA dcgm-exporter).

- Every metric name the dashboards and rule files use is this project's or listed, with
  the exporter, its pinned version and the documentation it comes from, in the one table
  of deploy/README.md; every row is used, and its version is the one the stack pins.
- The JMX exporter's rules file passes the checks its configuration reference documents,
  and its rules, applied to the MBeans Kafka's monitoring documentation lists, name the
  table's Kafka series. (No Kafka broker can run here: the rules are applied by a
  re-implementation of the exporter's documented matching, below.)
- Debian's node-exporter, run here, serves every node-exporter name of the table, and a
  real Prometheus scraping it answers every query of the hosts dashboard and the host
  alerts with data. The Kafka broker dashboard's queries get data too from a real
  Prometheus scraping a stand-in for the broker's exporter that serves the series the
  rules make of those MBeans.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.metric_names import (
    DASHBOARD_DIR,
    ROOT,
    dashboard_expressions,
    exported_names,
    external_metrics,
    is_own,
    metric_names,
    rules,
    used_names,
)
from tests.integration.test_prometheus import api, require
from tests.metrics_data import free_port

pytestmark = pytest.mark.integration

COMPOSE_FILE = ROOT / "docker-compose.yml"
KAFKA_DIR = ROOT / "deploy" / "kafka"
JMX_RULES = KAFKA_DIR / "jmx-exporter.yml"
START_TIMEOUT_S = 20.0

# The JMX exporter's configuration reference (1.6.0), "Top-level collector keys", the
# remote-connection and filter keys, and "Rule keys":
# https://prometheus.github.io/jmx_exporter/reference/configuration/
JMX_TOP_LEVEL_KEYS = {
    "startDelaySeconds", "lowercaseOutputName", "lowercaseOutputLabelNames",
    "inferCounterTypeFromName", "rules", "excludeJvmMetrics", "hostPort", "jmxUrl",
    "username", "password", "ssl", "includeObjectNames", "excludeObjectNames",
    "whitelistObjectNames", "blacklistObjectNames", "includeObjectNameAttributes",
    "excludeObjectNameAttributes", "autoExcludeObjectNameAttributes", "metricCustomizers",
    "httpServer", "openTelemetry",
}  # fmt: skip
JMX_RULE_KEYS = {
    "pattern", "name", "value", "valueFactor", "labels", "help", "cache", "type",
    "attrNameSnakeCase",
}  # fmt: skip
JMX_RULE_TYPES = {"GAUGE", "COUNTER", "UNTYPED"}

# MBeans from Kafka's monitoring documentation (https://kafka.apache.org/39/documentation.html
# #monitoring), with the attribute the exporter reads (Yammer meters: Count; gauges: Value;
# timers: Count and percentiles), and the series the table says they become.
KAFKA_MBEANS: list[tuple[str, str, str, dict[str, str]]] = [
    ("kafka.server:type=BrokerTopicMetrics,name=BytesInPerSec", "Count",
     "kafka_server_brokertopicmetrics_bytesin_total", {}),
    ("kafka.server:type=BrokerTopicMetrics,name=BytesInPerSec,topic=frames", "Count",
     "kafka_server_brokertopicmetrics_bytesin_total", {"topic": "frames"}),
    ("kafka.server:type=BrokerTopicMetrics,name=BytesOutPerSec", "Count",
     "kafka_server_brokertopicmetrics_bytesout_total", {}),
    ("kafka.server:type=BrokerTopicMetrics,name=BytesOutPerSec,topic=frames", "Count",
     "kafka_server_brokertopicmetrics_bytesout_total", {"topic": "frames"}),
    ("kafka.server:type=BrokerTopicMetrics,name=MessagesInPerSec,topic=detections", "Count",
     "kafka_server_brokertopicmetrics_messagesin_total", {"topic": "detections"}),
    ("kafka.server:type=BrokerTopicMetrics,name=TotalProduceRequestsPerSec,topic=frames",
     "Count", "kafka_server_brokertopicmetrics_totalproducerequests_total",
     {"topic": "frames"}),
    ("kafka.server:type=BrokerTopicMetrics,name=TotalFetchRequestsPerSec,topic=frames",
     "Count", "kafka_server_brokertopicmetrics_totalfetchrequests_total", {"topic": "frames"}),
    ("kafka.network:type=RequestMetrics,name=RequestsPerSec,request=Produce,version=11",
     "Count", "kafka_network_requestmetrics_requests_total",
     {"request": "Produce", "version": "11"}),
    ("kafka.network:type=RequestMetrics,name=TotalTimeMs,request=FetchConsumer",
     "99thPercentile", "kafka_network_requestmetrics_totaltimems",
     {"request": "FetchConsumer", "quantile": "0.99"}),
    ("kafka.server:type=ReplicaManager,name=UnderReplicatedPartitions", "Value",
     "kafka_server_replicamanager_underreplicatedpartitions", {}),
    ("kafka.server:type=ReplicaManager,name=PartitionCount", "Value",
     "kafka_server_replicamanager_partitioncount", {}),
    ("kafka.server:type=ReplicaManager,name=LeaderCount", "Value",
     "kafka_server_replicamanager_leadercount", {}),
    ("kafka.controller:type=KafkaController,name=OfflinePartitionsCount", "Value",
     "kafka_controller_kafkacontroller_offlinepartitionscount", {}),
    ("kafka.controller:type=KafkaController,name=ActiveControllerCount", "Value",
     "kafka_controller_kafkacontroller_activecontrollercount", {}),
]  # fmt: skip


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    """The external metric table of deploy/README.md."""
    return external_metrics()


def test_every_metric_name_used_is_ours_or_in_the_table(table: dict[str, Any]) -> None:
    exported = exported_names()
    unknown = {
        name: sorted(where)
        for name, where in used_names().items()
        if not is_own(name, exported) and name not in table
    }
    assert not unknown, f"add these to deploy/README.md's external metric table: {unknown}"


def test_every_table_row_is_used_cited_and_pinned(table: dict[str, Any]) -> None:
    used = used_names()
    stack = COMPOSE_FILE.read_text() + (KAFKA_DIR / "Dockerfile").read_text()
    assert table
    for row in table.values():
        assert row.name in used, f"{row.name} is in the table but no dashboard or rule uses it"
        assert re.search(r"https://\S+", row.documentation), row
        version = re.search(r"\bv?\d+\.\d+\.\d+(?:-\d+\.\d+\.\d+)?\b", row.served_by)
        assert version, f"{row.name}: no version in {row.served_by!r}"
        # The version the table names is the one the stack runs.
        assert version.group() in stack, f"{row.name}: {version.group()} is not what we pin"


def test_every_image_of_the_stack_is_pinned() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    # Pulled images only: those built here (the dataflow's, Kafka's) are tagged by us.
    images = [s["image"] for s in compose["services"].values() if "build" not in s]
    images += re.findall(r"^FROM\s+(\S+)", (KAFKA_DIR / "Dockerfile").read_text(), re.M)
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image} has no tag"
        assert tag not in ("latest", "") and re.search(r"\d", tag), f"{image} is not pinned"


# The JMX exporter's rules file -------------------------------------------------------------


@pytest.fixture(scope="module")
def jmx_config() -> dict[str, Any]:
    """deploy/kafka/jmx-exporter.yml, parsed."""
    return yaml.safe_load(JMX_RULES.read_text())


def test_jmx_exporter_config_follows_its_configuration_reference(
    jmx_config: dict[str, Any],
) -> None:
    assert set(jmx_config) <= JMX_TOP_LEVEL_KEYS, set(jmx_config) - JMX_TOP_LEVEL_KEYS
    assert isinstance(jmx_config.get("lowercaseOutputName", False), bool)
    # The java agent reads its own JVM: a remote connection would be another exporter.
    assert not {"hostPort", "jmxUrl"} & set(jmx_config)
    assert jmx_config["rules"]
    for rule in jmx_config["rules"]:
        assert set(rule) <= JMX_RULE_KEYS, (rule, set(rule) - JMX_RULE_KEYS)
        # The configuration reference's own validation: labels and help need a name, a
        # name needs a pattern.
        if "labels" in rule or "help" in rule:
            assert "name" in rule, rule
        if "name" in rule:
            assert "pattern" in rule, rule
            assert isinstance(rule["name"], str) and rule["name"], rule
        if "type" in rule:
            assert rule["type"] in JMX_RULE_TYPES, rule
        for key, value in rule.get("labels", {}).items():
            assert isinstance(key, str) and isinstance(value, str), rule
        if "pattern" in rule:
            # A valid regular expression, whose groups cover every $n the rule uses.
            groups = re.compile(rule["pattern"]).groups
            templates = [rule.get("name", ""), *rule.get("labels", {}).items()]
            referenced = re.findall(r"\$(\d+)", str(templates))
            assert all(int(n) <= groups for n in referenced), rule


def _safe_name(name: str) -> str:
    """JmxCollector.toSafeName: illegal characters and runs of underscores become one
    underscore; a leading digit gets an underscore in front."""
    safe = re.sub(r"[^a-zA-Z0-9:_]+", "_", name)
    safe = re.sub(r"_+", "_", safe)
    return "_" + safe if safe[:1].isdigit() else safe


def apply_jmx_rules(
    config: dict[str, Any], object_name: str, attribute: str, value: str = "1.0"
) -> tuple[str, dict[str, str]] | None:
    """The (metric name, labels) the JMX exporter makes of one MBean attribute, or None
    when no rule matches. A re-implementation of JmxCollector.Receiver.recordBean for rules
    that name their metric, as its rules documentation describes it: the input is
    `domain<key=value, ...><>attribute: value` with the ObjectName's properties in order,
    each pattern is wrapped as `^.*(?:pattern).*$`, the first rule that matches wins, `$n`
    refers to its groups, names go through toSafeName and lowercaseOutputName."""
    domain, properties = object_name.split(":", 1)
    pairs = ", ".join(properties.split(","))
    bean = f"{domain}<{pairs}><>{attribute}: {value}"

    for rule in config["rules"]:
        match = re.fullmatch(rf"^.*(?:{rule['pattern']}).*$", bean)
        if match is None:
            continue

        def expand(template: str, match: re.Match[str] = match) -> str:
            return re.sub(r"\$(\d+)", lambda g: match.group(int(g.group(1))) or "", template)

        name = _safe_name(expand(rule["name"]))
        if config.get("lowercaseOutputName"):
            name = name.lower()
        labels = {}
        for key, template in rule.get("labels", {}).items():
            label, label_value = _safe_name(expand(key)), expand(template)
            if label and label_value:
                labels[label] = label_value
        return name, labels
    return None


def test_rule_emulation_matches_the_exporters_documented_examples() -> None:
    # Examples from the exporter's rules documentation and its Kafka rules' comments.
    config = {
        "lowercaseOutputName": True,
        "rules": [
            {
                "pattern": "kafka.(\\w+)<type=(.+), name=(.+)Percent\\w*><>MeanRate",
                "name": "kafka_$1_$2_$3_percent",
            },
            {"pattern": ".*", "name": "fallback"},
        ],
    }
    assert apply_jmx_rules(
        config,
        "kafka.server:type=KafkaRequestHandlerPool,name=RequestHandlerAvgIdlePercent",
        "MeanRate",
    ) == ("kafka_server_kafkarequesthandlerpool_requesthandleravgidle_percent", {})
    assert apply_jmx_rules(config, "java.lang:type=Memory", "HeapMemoryUsage") == (
        "fallback",
        {},
    )
    assert _safe_name("a..b__c") == "a_b_c" and _safe_name("9x") == "_9x"


def test_kafkas_documented_mbeans_become_the_tables_kafka_series(
    jmx_config: dict[str, Any], table: dict[str, Any]
) -> None:
    derived: set[str] = set()
    for object_name, attribute, name, labels in KAFKA_MBEANS:
        assert apply_jmx_rules(jmx_config, object_name, attribute) == (name, labels), object_name
        derived.add(name)
    kafka_rows = {row for row in table if row.startswith("kafka_")}
    assert kafka_rows == derived


# The Kafka image, and what Prometheus expects of it ------------------------------------------


def test_kafka_image_loads_the_agent_for_the_broker_only() -> None:
    dockerfile = (KAFKA_DIR / "Dockerfile").read_text()
    add = re.search(r"^ADD (.+?)(?<!\\)$", dockerfile, re.M | re.S)
    assert add, "the agent jar is added from the release"
    assert re.search(r"--checksum=sha256:[0-9a-f]{64}\b", add.group(1))
    assert "jmx_exporter/releases/download/1.6.0/jmx_prometheus_javaagent-1.6.0.jar" in add.group(1)
    assert "COPY --chmod=0644 jmx-exporter.yml /opt/jmx-exporter/kafka.yml" in dockerfile
    assert "JMX_EXPORTER_AGENT_ARGS=9404:/opt/jmx-exporter/kafka.yml" in dockerfile
    (cmd,) = re.findall(r"^CMD (.+)$", dockerfile, re.M)
    assert "KAFKA_OPTS" in cmd and "-javaagent:/opt/jmx-exporter/" in cmd
    assert cmd.rstrip().endswith('exec /etc/kafka/docker/run"]')
    # Every other JVM in the container (the health check, tools run with exec) must start
    # without the agent, or it could not bind 9404 and would not start at all.
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    kafka = compose["services"]["kafka"]
    assert "KAFKA_OPTS" not in kafka["environment"]
    assert "KAFKA_OPTS" not in "".join(kafka["healthcheck"]["test"])
    assert kafka["build"]["context"] == "deploy/kafka"
    assert "9404:9404" in kafka["ports"]
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["kafka"]["static_configs"] == [{"targets": ["kafka:9404"]}]


# node-exporter, run here ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_exporter() -> Iterator[tuple[int, set[str]]]:
    """A real node-exporter (Debian's package) on loopback: (its port, the metric names it
    serves on this machine)."""
    binary = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if binary is None:
        reason = "node-exporter not installed (Debian package prometheus-node-exporter)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}: .ci/install-system-packages.sh installs it")
        pytest.skip(reason)
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, process.stderr.read().decode(errors="replace")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "node-exporter did not answer in 20 s"
                time.sleep(0.1)
        yield (
            port,
            {
                re.split(r"[{ ]", line, maxsplit=1)[0]
                for line in body.splitlines()
                if line and not line.startswith("#")
            },
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_node_exporter_serves_every_node_name_of_the_table(
    node_exporter: tuple[int, set[str]], table: dict[str, Any]
) -> None:
    _, served = node_exporter
    node_rows = {name for name in table if name.startswith("node_")}
    assert node_rows
    assert node_rows <= served, node_rows - served


@contextlib.contextmanager
def prometheus_scraping(
    job: str, target: str, tmp_path: Path, *more: dict[str, Any]
) -> Iterator[str]:
    """A real Prometheus scraping `target` every second as job `job` (and the scrape
    configs in `more`); yields its URL."""
    binary = require("prometheus")
    web_port = free_port()
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]},
            *more,
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{web_port}"
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def queries_without_data(url: str, queries: list[str]) -> list[str]:
    """Ask Prometheus until every query has data (rates need two scrapes), at most 20 s;
    the queries that still have none."""
    empty = list(queries)
    deadline = time.monotonic() + START_TIMEOUT_S
    while empty and time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # not listening yet
            empty = [q for q in empty if not api(url, "/api/v1/query", query=q)["result"]]
        time.sleep(0.5)
    return empty


def host_queries() -> list[str]:
    """Every query on node-exporter's series: the hosts dashboard's, the overview's that
    read only node_* series, and the host alerts' (without their thresholds), with the
    dashboard variables filled in as Grafana would for "All"."""
    host = json.loads((DASHBOARD_DIR / "host.json").read_text())
    overview = json.loads((DASHBOARD_DIR / "overview.json").read_text())
    queries = dashboard_expressions(host)
    queries += [
        expr
        for expr in dashboard_expressions(overview)
        if metric_names(expr) and all(n.startswith("node_") for n in metric_names(expr))
    ]
    queries += [
        re.sub(r"\s*[<>]=?\s*[\d.]+$", "", rule["expr"].strip())
        for rule in rules("infrastructure-alerts.yml")
        if all(n.startswith("node_") for n in metric_names(rule["expr"]))
    ]
    return [q.replace("$host", ".*").replace("$__rate_interval", "5s") for q in queries]


def test_host_queries_return_data_from_a_real_node_exporter(
    node_exporter: tuple[int, set[str]], tmp_path: Path
) -> None:
    port, _ = node_exporter
    queries = host_queries()
    assert len(queries) >= 15
    with prometheus_scraping("node-exporter", f"127.0.0.1:{port}", tmp_path) as url:
        empty = queries_without_data(url, queries)
    assert not empty, f"no data for: {empty}"


# The Kafka broker dashboard against a stand-in broker exporter --------------------------------

# What the JMX exporter's agent adds from client_java's JVM metrics (names as in
# https://prometheus.github.io/client_java/instrumentation/jvm/).
JVM_SERIES = [
    ("process_cpu_seconds_total", {}),
    ("process_resident_memory_bytes", {}),
    ("jvm_memory_used_bytes", {"area": "heap"}),
    ("jvm_memory_max_bytes", {"area": "heap"}),
]


def fake_broker_exposition(config: dict[str, Any]) -> bytes:
    """A FAKE of the broker's JMX exporter (no Kafka broker can run here): the Prometheus
    text exposition of the series the rules make of KAFKA_MBEANS, plus the JVM series."""
    series = [apply_jmx_rules(config, bean, attribute) for bean, attribute, _, _ in KAFKA_MBEANS]
    lines = []
    for name, labels in [s for s in series if s] + JVM_SERIES:
        pairs = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        lines.append(f"{name}{{{pairs}}} 1")
    return ("\n".join(lines) + "\n").encode()


def test_kafka_broker_dashboard_queries_return_data(
    jmx_config: dict[str, Any], tmp_path: Path
) -> None:
    body = fake_broker_exposition(jmx_config)

    class Exporter(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Exporter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dashboard = json.loads((DASHBOARD_DIR / "kafka-broker.json").read_text())
    queries = [
        q.replace("$broker", ".*").replace("$__rate_interval", "5s")
        for q in dashboard_expressions(dashboard)
    ]
    try:
        target = f"127.0.0.1:{server.server_port}"
        with prometheus_scraping("kafka", target, tmp_path) as url:
            empty = queries_without_data(url, queries)
        assert not empty, f"no data for: {empty}"
    finally:
        server.shutdown()
        server.server_close()
