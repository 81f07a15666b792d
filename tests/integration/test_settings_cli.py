"""Bad settings through the real entry points, as separate processes: one line per bad
setting, a non-zero exit, no traceback, and never a secret in anything printed."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows.settings import Settings
from tests.fixtures.kafka import REPO_ROOT, subprocess_env
from tests.unit.flows.test_settings import BAD_VALUES, env_name

pytestmark = pytest.mark.integration

SECRET = "pl4nted-Cli-S3cret-51c0"
# Every secret setting holds the planted secret, on every run of this module.
SECRETS = {
    "STREAMSIGHT_SASL_PASSWORD": SECRET,
    "STREAMSIGHT_SSL_KEY_PASSWORD": SECRET,
    "STREAMSIGHT_SINK": f"postgresql://svc:{SECRET}@127.0.0.1:1/streamsight",
    "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer%20{SECRET}",
}
# The flow's own loading: `flows.video` calls `load_settings()` first thing at import.
LOAD = [sys.executable, "-c", "from flows.settings import load_settings; load_settings()"]
FLOW = [sys.executable, "-m", "bytewax.run", "flows.video"]


def child_env(**extra: str) -> dict[str, str]:
    """A clean environment (no STREAMSIGHT_* or OTEL_* of the caller) with `extra`."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def run(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Exit status and everything printed (stdout and stderr together)."""
    proc = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout


def assert_one_clean_line(code: int, output: str, variable: str) -> None:
    """One line naming `variable`, a non-zero exit, no traceback, no secret."""
    assert code != 0, output
    assert "Traceback" not in output, output
    assert output.count("\n") == 1 and output.endswith(")\n"), output
    assert output.startswith(f"streamsight: {variable}: "), output
    assert_no_secret(output)


def assert_no_secret(output: str) -> None:
    assert SECRET.lower() not in output.lower(), output


def test_every_setting_through_the_flows_loading_path() -> None:
    """Each setting's bad value (from the unit walk, which covers every field) in its own
    process, the planted secrets set alongside."""
    fields = sorted(Settings.model_fields)
    assert sorted(BAD_VALUES) == fields

    def one(field: str) -> tuple[str, int, str]:
        env = child_env(**SECRETS)
        if field == "sink":
            env.pop("STREAMSIGHT_SINK")
        env[env_name(field)] = BAD_VALUES[field]
        return (field, *run(LOAD, env, timeout=60))

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(one, fields))
    for field, code, output in outcomes:
        assert code == 2, (field, output)
        assert_one_clean_line(code, output, env_name(field))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STREAMSIGHT_BATCH_MAX_SIZE", "-1"),
        ("STREAMSIGHT_SECURITY_PROTOCOL", "bogus"),
        ("STREAMSIGHT_METRICS_PORT", "99999"),
        ("STREAMSIGHT_LOG_LEVEL", "LOUD"),
        ("STREAMSIGHT_SINK", "sqlite://"),
        ("STREAMSIGHT_SINK", f"postgresql://svc:{SECRET}@db:port/x"),
        ("STREAMSIGHT_SASL_MECHANISM", ""),  # with a SASL protocol: required
        ("OTEL_EXPORTER_OTLP_HEADERS", f'authorization="Bearer {SECRET}"'),
    ],
)
def test_bytewax_run_prints_one_line(variable: str, value: str) -> None:
    env = child_env(**SECRETS)
    env[variable] = value
    if variable == "STREAMSIGHT_SASL_MECHANISM":
        env.pop(variable)
        env.update(STREAMSIGHT_SECURITY_PROTOCOL="sasl_ssl", STREAMSIGHT_SASL_USERNAME="svc")
    code, output = run(FLOW, env)
    assert code == 2
    assert_one_clean_line(code, output, variable)


def test_bytewax_run_reports_every_bad_setting() -> None:
    env = child_env(
        **SECRETS,
        STREAMSIGHT_BATCH_MAX_SIZE="-1",
        STREAMSIGHT_DEVICE="gpu",
        STREAMSIGHT_METRICS_PORT="99999",
    )
    code, output = run(FLOW, env)
    assert code == 2 and "Traceback" not in output, output
    assert sorted(line.split(": ")[1] for line in output.splitlines()) == [
        "STREAMSIGHT_BATCH_MAX_SIZE",
        "STREAMSIGHT_DEVICE",
        "STREAMSIGHT_METRICS_PORT",
    ], output
    assert_no_secret(output)


def test_unreachable_postgres_sink_is_one_line_without_its_password() -> None:
    # Every setting valid: the flow gets as far as opening the sink.
    env = child_env(**SECRETS, STREAMSIGHT_SINK_RETRY_S="1", OTEL_TRACES_EXPORTER="none")
    code, output = run(FLOW, env)
    assert code != 0 and "Traceback" not in output, output
    assert output.count("\n") == 1 and output.startswith("streamsight: "), output
    assert_no_secret(output)


def test_unsupported_trace_exporter_is_one_line(tmp_path: Path) -> None:
    env = child_env(**SECRETS, OTEL_TRACES_EXPORTER="carrier-pigeon")
    env["STREAMSIGHT_SINK"] = f"sqlite:///{tmp_path / 'detections.db'}"
    code, output = run(FLOW, env)
    assert code != 0 and "Traceback" not in output, output
    assert output.count("\n") == 1 and "OTEL_TRACES_EXPORTER" in output, output
    assert_no_secret(output)


BAD = {"STREAMSIGHT_BATCH_MAX_SIZE": "-1"}


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["-m", "tools.camera", "--brokers", "127.0.0.1:1", "--frames", "1"], {}),
        (["-m", "flows.processes"], {"STREAMSIGHT_BROKERS": "127.0.0.1:1"}),
        (["-m", "tools.embedded"], {}),
        (["-m", "bench.pipeline", "--quick"], {}),
        (["-m", "bench.backlog", "--frames", "1"], {}),
    ],
    ids=["camera", "processes", "embedded", "benchmark-pipeline", "backlog-bench"],
)
def test_every_cli_that_reads_settings_prints_one_line(
    argv: list[str], extra: dict[str, str]
) -> None:
    code, output = run([sys.executable, *argv], child_env(**SECRETS, **BAD, **extra))
    assert code == 2
    assert_one_clean_line(code, output, "STREAMSIGHT_BATCH_MAX_SIZE")


def test_camera_names_a_bad_flag_as_the_flag() -> None:
    argv = [sys.executable, "-m", "tools.camera", "--brokers", "127.0.0.1:1"]
    code, output = run([*argv, "--sasl-mechanism", "MD5"], child_env(**SECRETS))
    assert code == 2
    assert_one_clean_line(code, output, "--sasl-mechanism")
    code, output = run(
        [*argv, "--ssl-key-location", f"/nonexistent/{SECRET}.key"], child_env(**SECRETS)
    )
    assert_one_clean_line(code, output, "--ssl-key-location")


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "tools.evaluate", "--input-size", "wide", "--frames", "1"],
        ["-m", "bench.ceilings", "--device", "gpu"],
        [
            "-m",
            "tools.trace_report",
            "--job-id",
            "j",
            "--jaeger",
            "http://127.0.0.1:1",
            "--timeout",
            "2",
        ],
    ],
    ids=["evaluate", "benchmark-ceilings", "traces"],
)
def test_clis_without_settings_fail_without_a_traceback_or_secret(argv: list[str]) -> None:
    """These read no STREAMSIGHT_* setting; their own bad input ends in an error line (after
    argparse's usage line), never a traceback, with the planted secrets around."""
    code, output = run([sys.executable, *argv], child_env(**SECRETS, **BAD))
    assert code != 0 and "Traceback" not in output, output
    assert "error: " in output.splitlines()[-1], output
    assert_no_secret(output)
