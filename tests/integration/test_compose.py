"""docker-compose.yml: valid against the compose specification's schema (the copy that
check-jsonschema ships), every file it mounts or builds from exists, and the start order
and settings make `docker compose up` come up clean."""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from flows.settings import Settings
from operators.workers import RECOVERY_ENV, run_options
from tests.fixtures.kafka import REPO_ROOT
from tests.integration.tools import require_module

pytestmark = pytest.mark.integration

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file, parsed (anchors and merge keys resolved)."""
    yaml = require_module("yaml", "pyyaml")
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    jsonschema = require_module("jsonschema", "check-jsonschema")
    require_module("check_jsonschema", "check-jsonschema")
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_every_mounted_or_built_file_exists(compose: dict[str, Any]) -> None:
    missing: list[str] = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")) and not (REPO_ROOT / source).exists():
                missing.append(f"{name}: {source}")
        build = service.get("build")
        if build:
            context = REPO_ROOT / build["context"]
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                missing.append(f"{name}: {dockerfile}")
            missing.extend(f"{name}: {p}" for p in _dockerfile_sources(dockerfile, context))
    assert not missing, "missing: " + ", ".join(missing)


def test_files_the_jaeger_config_names_are_mounted(compose: dict[str, Any]) -> None:
    config = REPO_ROOT / "jaeger" / "config.yaml"
    assert config.exists(), "jaeger/config.yaml is missing"
    targets = {v.split(":")[1] for v in compose["services"]["jaeger"]["volumes"]}
    named = set(re.findall(r"/etc/jaeger/[\w.-]+", config.read_text()))
    assert named <= targets, f"not mounted into the jaeger service: {named - targets}"


def _dockerfile_sources(dockerfile: Path, context: Path) -> list[str]:
    """Sources of the Dockerfile's COPY/ADD instructions that are absent from `context`
    (instructions continued over lines with a backslash; URLs are not in the context)."""
    if not dockerfile.is_file():
        return []
    absent: list[str] = []
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in text.splitlines():
        match = re.match(r"\s*(COPY|ADD)\s+(?!--from)(.+)", line)
        if match:
            *sources, _ = match.group(2).split()
            absent.extend(
                s
                for s in sources
                if not s.startswith("--") and "://" not in s and not (context / s).exists()
            )
    return absent


def test_start_order_waits_for_health_and_topic_creation(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
            if condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", (name, dependency)
    for consumer in ("streamsight", "streamsight-gpu", "camera"):
        depends = services[consumer]["depends_on"]
        assert depends["kafka-init"]["condition"] == "service_completed_successfully"
    assert services["streamsight"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    # The broker is Apache's image plus the JMX exporter's agent, the same Kafka release
    # as the tools that create the topics.
    assert services["kafka-init"]["image"].startswith("apache/kafka:")
    dockerfile = REPO_ROOT / services["kafka"]["build"]["context"] / "Dockerfile"
    assert f"FROM {services['kafka-init']['image']}\n" in dockerfile.read_text()
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2")
    assert "kafka-topics.sh" in "".join(services["kafka-init"]["command"])


def test_dataflow_and_camera_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    dataflow = services["streamsight"]["environment"]
    for key in [k for k in os.environ if k.startswith("STREAMSIGHT_")]:
        monkeypatch.delenv(key)
    for key, value in dataflow.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()  # the dataflow's settings parse
    assert settings.sink.startswith("postgresql://") and settings.brokers == "kafka:9092"
    # Recovery is on, as bytewax.run reads it, in the named volume (the GPU service too).
    for name in ("streamsight", "streamsight-gpu"):
        environment = {k: str(v) for k, v in services[name]["environment"].items()}
        options = run_options([], environment)
        assert options.recovery_directory is not None and options.recovery_problem() is None
        volumes = services[name]["volumes"]
        assert f"recovery:{options.recovery_directory}" in volumes
    assert dataflow["STREAMSIGHT_METRICS_PORT"] == "9464"
    # On CPU one single-worker process per core, each publishing its own metrics port;
    # on the GPU one process with worker threads.
    command = services["streamsight"]["command"]
    assert command[:3] == ["python", "-m", "flows.processes"]
    processes = int(command[command.index("-n") + 1])
    assert services["streamsight"]["ports"] == [f"{9464 + i}:{9464 + i}" for i in range(processes)]
    gpu = services["streamsight-gpu"]["command"]
    assert gpu[:4] == ["python", "-m", "bytewax.run", "flows.video"] and "-w" in gpu
    assert services["streamsight-gpu"]["ports"] == ["9464:9464"]
    for name in ("streamsight", "camera"):
        environment = services[name]["environment"]
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert environment["OTEL_SERVICE_NAME"]
    camera = services["camera"]["command"]
    assert camera[:3] == ["python", "-m", "tools.camera"]
    assert camera[camera.index("--source") + 1] == "synthetic"
    # Named volumes for Kafka, the sink and recovery.
    assert {"kafka-data", "postgres-data", "recovery"} <= compose["volumes"].keys()


def test_gpu_profile_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu = services["streamsight-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert "profiles" not in services["streamsight"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["STREAMSIGHT_DEVICE"] == "cuda"
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] != services["streamsight"]["build"].get(
        "args", {}
    ).get("TORCH_INDEX_URL")


def test_image_runs_as_a_non_root_user() -> None:
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "FROM python:3.11-slim" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile


def test_image_turns_recovery_on_in_the_directory_it_owns() -> None:
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    statements = re.findall(r"^ENV ((?:.*\\\n)*.*)$", dockerfile, flags=re.MULTILINE)
    variables = dict(re.findall(r"(\w+)=(\S+)", "\n".join(statements)))
    assert set(RECOVERY_ENV) <= variables.keys()
    options = run_options([], variables)
    assert options.recovery_problem() is None
    assert f"mkdir -p {options.recovery_directory}" in dockerfile
    assert f"chown -R streamsight:streamsight {options.recovery_directory.parent}" in dockerfile


def test_prometheus_scrapes_services_that_exist(compose: dict[str, Any]) -> None:
    yaml = require_module("yaml", "pyyaml")
    config_file = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
    assert config_file.exists(), "deploy/prometheus/prometheus.yml is missing"
    config = yaml.safe_load(config_file.read_text())
    hosts = {
        target.split(":")[0]
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    hosts |= {
        name
        for job in config["scrape_configs"]
        for dns in job.get("dns_sd_configs", [])
        for name in dns["names"]
    }
    # Names Prometheus's container resolves to the host (node-exporter's network).
    host_aliases = {
        entry.split(":")[0] for entry in compose["services"]["prometheus"].get("extra_hosts", [])
    }
    unknown = hosts - compose["services"].keys() - {"localhost"} - host_aliases
    assert not unknown, f"scrape targets with no compose service: {unknown}"
    # Every process of the CPU dataflow service is scraped: its metrics and Bytewax's API.
    command = compose["services"]["streamsight"]["command"]
    processes = range(int(command[command.index("-n") + 1]))
    jobs = {
        job["job_name"]: [t for static in job.get("static_configs", []) for t in static["targets"]]
        for job in config["scrape_configs"]
    }
    assert jobs["streamsight"] == [f"streamsight:{9464 + i}" for i in processes]
    assert jobs["bytewax"] == [f"streamsight:{3030 + i}" for i in processes]


def test_prometheus_gets_every_rule_file_it_loads(compose: dict[str, Any]) -> None:
    yaml = require_module("yaml", "pyyaml")
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    mounts = dict(
        reversed(volume.split(":")[:2]) for volume in compose["services"]["prometheus"]["volumes"]
    )
    for rule_file in config["rule_files"]:
        source = mounts.get(f"/etc/prometheus/{rule_file}")
        assert source == f"./deploy/prometheus/{rule_file}", rule_file


def test_host_and_gpu_exporters(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # node-exporter sees the host, not its container: the host's network and processes,
    # the host's root filesystem read-only under the --path.rootfs it is told.
    node = services["node-exporter"]
    assert node["network_mode"] == "host" and node["pid"] == "host"
    assert "/:/host:ro,rslave" in node["volumes"]
    assert "--path.rootfs=/host" in node["command"]
    assert "profiles" not in node
    assert "host.docker.internal:host-gateway" in services["prometheus"]["extra_hosts"]
    # dcgm-exporter only with the GPU profile, on every GPU of the host.
    dcgm = services["dcgm-exporter"]
    assert dcgm["profiles"] == ["gpu"]
    assert dcgm["image"].startswith("nvcr.io/nvidia/k8s/dcgm-exporter:")
    (device,) = dcgm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == "all"
    assert "gpu" in device["capabilities"]
    assert dcgm["ports"] == ["9400:9400"]
