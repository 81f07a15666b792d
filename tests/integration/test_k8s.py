"""Kubernetes manifests: every overlay builds with `kubectl kustomize`, every resource
validates against the Kubernetes schemas (custom resources are checked by hand), every
container meets the "restricted" pod security level, and the StatefulSet is wired the
way `bytewax.run` expects (checked by running its init container's command here). The
optional monitoring examples (broker and node scrapes, infrastructure alerts) build too,
and every PrometheusRule carries the rules of its Prometheus rule file."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from operators.workers import run_options
from tests.fixtures.kafka import REPO_ROOT, subprocess_env
from tests.integration.tools import require_command, require_module

pytestmark = pytest.mark.integration

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
CUSTOM_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule", "ScaledObject"}
KUBECTL_HOW = "bash .ci/install-system-packages.sh (Debian package kubernetes-client)"

Resource = dict[str, Any]


def load_yaml_documents(text: str) -> list[Resource]:
    """The non-empty YAML documents in `text`."""
    yaml = require_module("yaml", "pyyaml")
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def kubectl() -> str:
    """The kubectl executable."""
    return require_command("kubectl", KUBECTL_HOW)


def kustomize(kubectl: str, directory: Path) -> list[Resource]:
    """The resources `kubectl kustomize` builds from `directory`."""
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return load_yaml_documents(result.stdout)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, kubectl: str) -> tuple[str, list[Resource]]:
    """(name, resources) of each overlay, built with `kubectl kustomize`."""
    name: str = request.param
    return name, kustomize(kubectl, K8S / "overlays" / name)


def named(resources: list[Resource], kind: str, name: str) -> Resource:
    """The resource of `kind` called `name`."""
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def rule_groups(file_name: str) -> list[Resource]:
    """The groups of a Prometheus rule file in deploy/prometheus."""
    yaml = require_module("yaml", "pyyaml")
    path = REPO_ROOT / "deploy" / "prometheus" / file_name
    assert path.exists(), f"deploy/prometheus/{file_name} is missing"
    return yaml.safe_load(path.read_text())["groups"]


def one(resources: list[Resource], kind: str) -> Resource:
    """The single resource of `kind`."""
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_specs(resources: list[Resource]) -> Iterator[tuple[str, Resource]]:
    """(resource name, pod spec) of every workload."""
    for resource in resources:
        if resource["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            yield resource["metadata"]["name"], resource["spec"]["template"]["spec"]


def env_of(container: Resource) -> dict[str, Resource]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def settings_of(resources: list[Resource]) -> dict[str, str]:
    """The data of the settings ConfigMap."""
    maps = [r for r in resources if r["kind"] == "ConfigMap"]
    found = [m for m in maps if m["metadata"]["name"].startswith("streamsight-settings")]
    assert len(found) == 1
    return found[0]["data"]


def test_every_resource_validates_against_the_kubernetes_schemas(
    overlay: tuple[str, list[Resource]],
) -> None:
    validator = require_module("kubernetes_validate", "kubernetes-validate")
    _, resources = overlay
    version = validator.latest_version()
    checked = 0
    for resource in resources:
        if resource["kind"] in CUSTOM_KINDS:
            continue  # no schema ships for custom resources: checked below
        try:
            validator.validate(resource, version, strict=True)
        except validator.ValidationError as error:
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {error.message}")
        checked += 1
    kinds = {r["kind"] for r in resources}
    assert {"StatefulSet", "Service", "ConfigMap", "NetworkPolicy", "Namespace"} <= kinds
    assert {"PodMonitor", "PrometheusRule"} <= kinds
    assert checked == len([r for r in resources if r["kind"] not in CUSTOM_KINDS])


def test_every_container_meets_the_restricted_pod_security_level(
    overlay: tuple[str, list[Resource]],
) -> None:
    _, resources = overlay
    specs = list(pod_specs(resources))
    assert specs
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        assert spec.get("automountServiceAccountToken") is False, name
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret"}, volume
        containers = spec["containers"] + spec.get("initContainers", [])
        for container in containers:
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            assert context["seccompProfile"]["type"] == "RuntimeDefault", where
            assert context["readOnlyRootFilesystem"] is True, where
            assert not context.get("privileged"), where
            # Writable places: emptyDir volumes and the per-pod recovery volume only.
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in {"tmp", "hostfile", "recovery"}, (where, mount)


def test_statefulset_is_wired_the_way_bytewax_run_expects(
    overlay: tuple[str, list[Resource]],
) -> None:
    name, resources = overlay
    statefulset = one(resources, "StatefulSet")
    service = [r for r in resources if r["kind"] == "Service"]
    headless = [s for s in service if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [statefulset["spec"]["serviceName"]]
    assert headless[0]["spec"]["publishNotReadyAddresses"] is True
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"

    spec = statefulset["spec"]["template"]["spec"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert headless[0]["spec"]["selector"].items() <= labels.items()
    settings = settings_of(resources)
    assert int(settings["STREAMSIGHT_REPLICAS"]) == statefulset["spec"]["replicas"]
    assert settings["STREAMSIGHT_BROKERS"]
    assert settings["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")

    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    assert claims == {"recovery"}
    for container in spec["containers"] + spec["initContainers"]:
        env = env_of(container)
        assert env["BYTEWAX_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["BYTEWAX_STATEFULSET_NAME"]["value"] == statefulset["metadata"]["name"]
        assert env["BYTEWAX_HOSTFILE_PATH"]["value"] == "/etc/bytewax/hostfile"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["recovery"] == env["BYTEWAX_RECOVERY_DIRECTORY"]["value"]
        assert mounts["hostfile"] == "/etc/bytewax"
        refs = [e["configMapRef"]["name"] for e in container["envFrom"]]
        assert any(ref.startswith("streamsight-settings") for ref in refs)

    (dataflow,) = spec["containers"]
    # Recovery is on, as bytewax.run reads its variables (a complete set: it would refuse
    # a directory without both intervals).
    values = {name: e["value"] for name, e in env_of(dataflow).items() if "value" in e}
    options = run_options([], values)
    assert options.recovery_directory is not None and options.recovery_problem() is None
    # On CPU one single-worker process per pod (threads would share the interpreter
    # lock); on a GPU two worker threads per process share its CUDA context. Either way
    # the cluster runs 4 workers, one per input partition, within the recovery partitions.
    workers = {"cpu": 1, "gpu": 2}[name]
    command = ["python", "-m", "bytewax.run", "flows.video", "-w", str(workers)]
    assert dataflow["command"] == command
    assert statefulset["spec"]["replicas"] * workers == 4
    assert int(settings["STREAMSIGHT_RECOVERY_PARTITIONS"]) >= 4
    if name == "cpu":
        assert dataflow["resources"]["requests"]["cpu"] == "1"
    secret = env_of(dataflow)["STREAMSIGHT_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"]
    ports = {p["name"]: p["containerPort"] for p in dataflow["ports"]}
    assert ports == {"peers": 2101, "metrics": 9464, "bytewax-api": 3030}
    init = env_of(spec["initContainers"][0])
    assert init["STREAMSIGHT_PEER_SERVICE"]["value"] == statefulset["spec"]["serviceName"]
    assert int(init["STREAMSIGHT_PEER_PORT"]["value"]) == ports["peers"]


def test_init_container_writes_the_hostfile_and_partitions_of_each_pod(
    overlay: tuple[str, list[Resource]], tmp_path: Path
) -> None:
    _, resources = overlay
    statefulset = one(resources, "StatefulSet")
    namespace = statefulset["metadata"]["namespace"]
    replicas = statefulset["spec"]["replicas"]
    settings = settings_of(resources)
    (init,) = statefulset["spec"]["template"]["spec"]["initContainers"]
    hostfiles: list[str] = []
    for ordinal in range(replicas + 1):
        pod = f"{statefulset['metadata']['name']}-{ordinal}"
        env = {name: e["value"] for name, e in env_of(init).items() if "value" in e}
        env.update(settings)
        env.update(
            BYTEWAX_POD_NAME=pod,
            POD_NAMESPACE=namespace,
            BYTEWAX_HOSTFILE_PATH=str(tmp_path / pod / "hostfile"),
            BYTEWAX_RECOVERY_DIRECTORY=str(tmp_path / pod / "recovery"),
        )
        result = subprocess.run(
            [sys.executable, *init["command"][1:]],
            cwd=REPO_ROOT,
            env=subprocess_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if ordinal == replicas:
            # A pod outside STREAMSIGHT_REPLICAS refuses to start.
            assert result.returncode != 0
            assert "STREAMSIGHT_REPLICAS" in result.stderr
            continue
        assert result.returncode == 0, result.stderr
        hostfiles.append((tmp_path / pod / "hostfile").read_text())
        partitions = list((tmp_path / pod / "recovery").glob("part-*.sqlite3"))
        expected = int(settings["STREAMSIGHT_RECOVERY_PARTITIONS"]) if ordinal == 0 else 0
        assert len(partitions) == expected
    service = statefulset["spec"]["serviceName"]
    assert hostfiles == [hostfiles[0]] * replicas
    assert hostfiles[0].splitlines() == [
        f"streamsight-{i}.{service}.{namespace}.svc.cluster.local:2101" for i in range(replicas)
    ]


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not(
    overlay: tuple[str, list[Resource]],
) -> None:
    name, resources = overlay
    (dataflow,) = one(resources, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    limits = dataflow["resources"]["limits"]
    device = env_of(dataflow)["STREAMSIGHT_DEVICE"]["value"]
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert device == "cuda"
    else:
        assert "nvidia.com/gpu" not in limits
        assert device == "cpu"
    assert dataflow["image"].endswith(f":{name}")


def test_network_policy_limits_ingress_to_prometheus_and_peers(
    overlay: tuple[str, list[Resource]],
) -> None:
    _, resources = overlay
    policy = one(resources, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    labels = one(resources, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    metrics_rules = [
        rule for rule in policy["ingress"] if {"port": "metrics"} in rule.get("ports", [])
    ]
    assert len(metrics_rules) == 1
    sources = metrics_rules[0]["from"]
    assert [s["podSelector"]["matchLabels"] for s in sources] == [
        {"app.kubernetes.io/name": "prometheus"}
    ]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    # Peers, Kafka, OTLP, PostgreSQL, DNS.
    assert {2101, 9092, 4317, 5432, 53} <= egress_ports


def test_pod_monitor_scrapes_the_metrics_ports(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    monitor = one(resources, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    statefulset = one(resources, "StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (dataflow,) = statefulset["spec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in dataflow["ports"]}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == {"metrics", "bytewax-api"} <= ports
    assert all(e["path"] == "/metrics" for e in endpoints)


def check_prometheus_rule(rule: Resource, file_name: str) -> None:
    """`rule` is a PrometheusRule carrying exactly the groups of rule file `file_name`."""
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule["spec"]["groups"]
    assert groups == rule_groups(file_name), "run: python deploy/k8s/prometheusrule.py"
    for group in groups:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert ("alert" in item) != ("record" in item) and item["expr"]


def test_prometheus_rule_carries_the_alerts_of_the_prometheus_config(
    overlay: tuple[str, list[Resource]],
) -> None:
    name, resources = overlay
    check_prometheus_rule(named(resources, "PrometheusRule", "streamsight"), "alerts.yml")
    # The GPU overlay adds DCGM's series joined to the dataflow's pods; the CPU one does not.
    rules = {r["metadata"]["name"] for r in resources if r["kind"] == "PrometheusRule"}
    if name == "gpu":
        assert rules == {"streamsight", "streamsight-dcgm"}
        dcgm = named(resources, "PrometheusRule", "streamsight-dcgm")
        assert dcgm["metadata"]["namespace"] == "streamsight"
        check_prometheus_rule(dcgm, "dcgm-rules.yml")
    else:
        assert rules == {"streamsight"}


def test_generated_prometheus_rules_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(K8S / "prometheusrule.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_optional_monitoring_scrapes_broker_and_nodes_under_the_alerts_job_names(
    kubectl: str,
) -> None:
    resources = kustomize(kubectl, K8S / "optional" / "monitoring")
    assert {r["kind"] for r in resources} == {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    rule = named(resources, "PrometheusRule", "streamsight-infrastructure")
    check_prometheus_rule(rule, "infrastructure-alerts.yml")
    alert_jobs = {
        job
        for group in rule["spec"]["groups"]
        for item in group["rules"]
        for job in re.findall(r'job="([^"]+)"', item["expr"])
    }
    # Each monitor sets the job its series must carry for the rules and dashboards.
    jobs = {}
    for monitor in resources:
        if monitor["kind"] == "PrometheusRule":
            continue
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["namespace"] == "streamsight"
        endpoints = monitor["spec"].get("podMetricsEndpoints") or monitor["spec"]["endpoints"]
        (endpoint,) = endpoints
        assert endpoint["path"] == "/metrics" and endpoint["port"]
        (job,) = [r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
        jobs[monitor["kind"]] = job
        assert monitor["spec"]["selector"]["matchLabels"]
    assert jobs == {"PodMonitor": "kafka", "ServiceMonitor": "node-exporter"}
    assert alert_jobs <= set(jobs.values())
    # Strimzi's broker pods serve the JMX exporter on the port it names tcp-prometheus.
    kafka = named(resources, "PodMonitor", "kafka-brokers")
    assert kafka["spec"]["podMetricsEndpoints"][0]["port"] == "tcp-prometheus"
    assert kafka["spec"]["selector"]["matchLabels"]["strimzi.io/kind"] == "Kafka"


def test_optional_keda_scaled_object_targets_the_statefulset(
    overlay: tuple[str, list[Resource]],
) -> None:
    _, resources = overlay
    path = K8S / "optional" / "keda-scaledobject.yaml"
    (scaled,) = load_yaml_documents(path.read_text())
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    statefulset = one(resources, "StatefulSet")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", statefulset["metadata"]["name"])
    partitions = int(settings_of(resources)["STREAMSIGHT_RECOVERY_PARTITIONS"])
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["maxReplicaCount"] <= partitions
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert {"serverAddress", "query", "threshold"} <= trigger["metadata"].keys()
    # Not in any overlay: it is opt-in.
    assert all(r["kind"] != "ScaledObject" for r in resources)
