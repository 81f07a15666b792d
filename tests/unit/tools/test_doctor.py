"""The doctor's rules on Prometheus answers: each rule holds on the case it names and not
on a healthy one, each case names its bound with the setting to change; the answers are
parsed into `Readings` the same way from Prometheus and from a process's own registry.

The fixtures in `doctor_data/` are Prometheus API answers: three recorded from real runs
on this machine (`recorded` says how), the rest derived from those by `derive.py`
(`derived` says what was edited), for bounds a 2-core machine without a GPU cannot show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from operators.telemetry.metrics import PipelineMetrics
from tests import metrics_data as data
from tests.metrics_data import free_port
from tests.unit.tools.doctor_data import derive
from tools import doctor
from tools.diagnosis import RULES, Readings, RegistrySample, diagnose, readings_between, verdict

DATA = Path(__file__).parent / "doctor_data"
HEALTHY = "offered_load"


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


def readings(name: str) -> Readings:
    saved = load(name)
    return doctor.readings_from_responses(
        saved["responses"],
        doctor.parse_window(saved["window"]),
        workers_per_process=saved.get("workers"),
    )


# Each case: the bound it names, the rules that hold (bound rule first), and words its
# advice must contain (the setting or flag to change).
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "offered_load": ("offered_load", ["offered-load"], ["nothing, for throughput"]),
    "batch_size_1": (
        "inference",
        ["inference", "batch-size-capped"],
        ["STREAMSIGHT_DEVICE=cuda", "raise STREAMSIGHT_BATCH_MAX_SIZE to 16"],
    ),
    "too_few_partitions": (
        "kafka_ingest",
        ["too-few-partitions", "batch-size-capped"],
        ["at least 2 partitions", "--partitions 2"],
    ),
    "gpu_busy": ("inference", ["gpu-busy"], ["STREAMSIGHT_PRECISION=fp16"]),
    "interpreter_lock": (
        "interpreter_lock",
        ["interpreter-lock"],
        ["python -m flows.processes -n 4", "instead of `-w 4`"],
    ),
    "preprocessing": ("preprocessing", ["preprocessing"], ["python -m flows.processes"]),
    "sink": ("sink", ["sink"], ["STREAMSIGHT_SINK=postgresql://"]),
    "kafka_ingest": ("kafka_ingest", ["kafka-ingest"], ["STREAMSIGHT_FETCH_BATCH_SIZE"]),
    "no_data": ("no_data", ["no-data"], ["`up`"]),
    "thin_batches_idle_gpu": (
        "offered_load",
        ["offered-load", "thin-batches"],
        ["raise STREAMSIGHT_BATCH_MAX_DELAY_MS about 1.7x", "to 80", "BATCH_ADAPTIVE=true"],
    ),
}

# Each rule of the table: the case it names and a healthy case it must not hold on.
RULE_CASES: dict[str, tuple[str, str]] = {
    "no-data": ("no_data", HEALTHY),
    "too-few-partitions": ("too_few_partitions", HEALTHY),
    "kafka-ingest": ("kafka_ingest", HEALTHY),
    "interpreter-lock": ("interpreter_lock", HEALTHY),
    "gpu-busy": ("gpu_busy", HEALTHY),
    "inference": ("batch_size_1", HEALTHY),
    "preprocessing": ("preprocessing", HEALTHY),
    "sink": ("sink", HEALTHY),
    "offered-load": (HEALTHY, "batch_size_1"),
    "batch-size-capped": ("batch_size_1", HEALTHY),
    "thin-batches": ("thin_batches_idle_gpu", HEALTHY),
}


def test_every_rule_has_a_named_and_a_healthy_case() -> None:
    assert {rule.name for rule in RULES} == set(RULE_CASES)
    assert {p.stem for p in DATA.glob("*.json")} == set(CASES)


@pytest.mark.parametrize("rule", RULES, ids=[rule.name for rule in RULES])
def test_rule_holds_on_its_case_and_not_on_the_healthy_one(rule: Any) -> None:
    named, healthy = RULE_CASES[rule.name]
    assert rule.holds(readings(named)), rule.doc
    assert not rule.holds(readings(healthy)), rule.doc


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_names_its_bound_and_what_to_change(case: str) -> None:
    bound, rules, words = CASES[case]
    diagnosis = diagnose(readings(case))
    assert diagnosis.bound == bound
    assert [f.rule for f in diagnosis.findings] == rules
    assert diagnosis.findings[0].bound == bound
    advice = " ".join(f"{f.evidence} {f.change} {f.effect}" for f in diagnosis.findings)
    for word in words:
        assert word in advice, (word, advice)
    for finding in diagnosis.findings:
        assert finding.evidence and finding.change and finding.effect


def test_recorded_cases_say_how_they_were_recorded_and_derived_ones_what_was_edited() -> None:
    derived = set(derive.CASES)
    for case in CASES:
        saved = load(case)
        if case in derived:
            assert saved["derived"].startswith(f"from {derive.CASES[case][0]}.json")
        else:
            assert "real Prometheus" in saved["recorded"]


def test_derived_fixtures_are_what_derive_writes() -> None:
    for name, (source, edits, note) in derive.CASES.items():
        assert load(name) == json.loads(json.dumps(derive.derive(source, edits, note)))


def test_recorded_figures() -> None:
    offered = readings("offered_load")
    assert offered.processes == 1 and offered.workers_per_process == 1
    assert offered.device == "cpu" and offered.gpu_utilization is None
    assert offered.partitions == 4 and not offered.lag_growing and not offered.saturated
    assert 3.5 < offered.ingest_per_s < 4.5
    capped = readings("batch_size_1")
    assert capped.batch_max_size == 1 and capped.batch_mean_size == 1
    assert capped.flushes["size"] > 0 and capped.deadline_share == 0
    assert capped.lag_growing and capped.dominant == "inference"
    assert capped.share("inference") > 0.9


def test_verdict_lines() -> None:
    assert diagnose(readings("batch_size_1")).verdict == "bound by: inference on cpu"
    assert diagnose(readings("gpu_busy")).verdict == "bound by: inference on cuda, GPU 93% busy"
    assert (
        diagnose(readings("too_few_partitions")).verdict
        == "bound by: Kafka ingest, 1 partition for 2 workers"
    )
    with_threads = Readings(
        window_s=1, frames_per_s=1, ingest_per_s=1, device="cpu", model_threads=2
    )
    assert verdict("inference", with_threads) == "bound by: inference on cpu, 2 threads"


def test_missing_answers_read_as_unknown() -> None:
    saved = load("batch_size_1")
    responses = {k: v for k, v in saved["responses"].items() if k not in {"written", "workers"}}
    r = doctor.readings_from_responses(responses, 20.0)
    assert r.written_per_s == 0.0 and r.workers_per_process is None and r.workers == 1
    assert diagnose(r).bound == "inference"


def test_parse_window() -> None:
    assert doctor.parse_window("10m") == 600
    assert doctor.parse_window("1h30m") == 5400
    assert doctor.parse_window("90s") == 90
    for bad in ("", "10", "m", "10 m", "0s", "-5m"):
        with pytest.raises(ValueError):
            doctor.parse_window(bad)


def test_queries_use_the_window_and_the_match_everywhere() -> None:
    named = doctor.queries("5m", 'job="streamsight"')
    assert set(named) >= set(load("batch_size_1")["responses"])
    for name, expr in named.items():
        selectors = expr.count("{")
        assert selectors > 0 and expr.count('job="streamsight"') == selectors, name
        if "rate(" in expr or "over_time" in expr:
            assert "[5m]" in expr or "[5m:5s]" in expr, name
    assert "{}" not in "".join(doctor.queries("5m").values())


def test_cli_replays_a_saved_answer_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main(["--replay", str(DATA / "batch_size_1.json")]) == 0
    text = capsys.readouterr().out
    assert "bound by: inference on cpu" in text
    assert "change: raise STREAMSIGHT_BATCH_MAX_SIZE to 16" in text
    assert doctor.main(["--replay", str(DATA / "too_few_partitions.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bound"] == "kafka_ingest"
    assert report["readings"]["workers"] == 2
    assert report["findings"][0]["rule"] == "too-few-partitions"


def test_cli_job_share(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(DATA / "batch_size_1.json")
    assert doctor.main(["--replay", path, "--job-id", "doctor"]) == 0
    assert "job doctor: 87.4 frames/s, 100% of the frames, 100% of the device" in (
        capsys.readouterr().out
    )
    assert doctor.main(["--replay", path, "--job-id", "absent"]) == 0
    assert "job absent: no frames in the window" in capsys.readouterr().out


def test_cli_unreachable_prometheus_is_one_line_and_status_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert doctor.main(["--prometheus", url, "--window", "1m"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"streamsight-doctor: cannot read Prometheus at {url}")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_bad_window_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        doctor.main(["--prometheus", "http://127.0.0.1:1", "--window", "ten minutes"])
    assert exc.value.code == 2


# The same readings from the process's own registry (the demo's verdict) ----------------


def test_readings_between_registry_samples() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    before = RegistrySample.read(100.0, registry)
    metas = [data.meta(i) for i in range(4)]
    for _ in range(10):  # 10 batches of 4 in the second, 90 ms of model each
        b = data.batch(metas, wait_ns=1_000_000)
        metrics.record_batch(b, max_size=16)
        metrics.record_inference(b, 0.09, device="cpu")
        metrics.stage_duration.labels("infer").observe(0.09)
        metrics.stage_cpu.labels("infer").inc(0.18)
        metrics.stage_duration.labels("decode").observe(0.004)
    ingest = metrics.wrap("ingest", lambda message: message)
    for message in range(40):  # the ingest stage is called once per message read
        ingest(message)
    after = RegistrySample.read(101.0, registry)

    r = readings_between(before, after, workers_per_process=1, model_threads=2)
    assert r.window_s == pytest.approx(1.0)
    assert r.frames_per_s == pytest.approx(40.0)
    assert r.ingest_per_s == pytest.approx(40.0)
    assert r.stage_busy["infer"] == pytest.approx(0.9)
    assert r.forward_pass_cores == pytest.approx(2.0)
    assert r.batch_mean_size == pytest.approx(4.0)
    assert r.batch_fill == pytest.approx(0.25)
    assert r.batch_max_size == 16
    assert r.batch_wait_mean_s == pytest.approx(0.001)
    assert r.inference_batch_s == pytest.approx(0.09)
    assert r.device == "cpu"
    assert r.flushes["size"] == pytest.approx(10.0)
    d = diagnose(r)
    assert d.bound == "inference"
    assert d.verdict == "bound by: inference on cpu, 2 threads"


def test_quantile_from_buckets_matches_prometheus_interpolation() -> None:
    from tools.diagnosis import quantile_from_buckets

    buckets = {"0.01": 0.0, "0.05": 50.0, "0.1": 100.0, "+Inf": 100.0}
    assert quantile_from_buckets(0.5, buckets) == pytest.approx(0.05)
    assert quantile_from_buckets(0.9, buckets) == pytest.approx(0.09)
    assert quantile_from_buckets(0.5, {"+Inf": 0.0}) is None


def test_credentials_in_the_url_never_show_in_errors(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    url = f"http://viewer:planted-Secr3t@127.0.0.1:{port}/"
    assert doctor.main(["--prometheus", url, "--window", "1m"]) == 1
    err = capsys.readouterr().err
    assert "planted-Secr3t" not in err and "viewer" not in err
    assert f"http://127.0.0.1:{port}" in err


def test_credentials_in_the_url_become_basic_auth() -> None:
    client = doctor.Prometheus("https://viewer:p%40ss@prometheus.example:9090/prom/")
    assert client.url == "https://prometheus.example:9090/prom"
    assert client.headers["Authorization"] == "Basic dmlld2VyOnBAc3M="  # viewer:p@ss
    assert "Authorization" not in doctor.Prometheus("http://[::1]:9090").headers
    assert doctor.Prometheus("http://[::1]:9090").url == "http://[::1]:9090"
