"""`streamsight-doctor`: read the pipeline's metrics from Prometheus over a window and say
what holds it back and what to change.

    python -m tools.doctor --prometheus http://localhost:9090 [--window 10m] [--job-id J]
        [--match 'namespace="video"'] [--workers N] [--at TIME] [--json] [--save FILE]
    python -m tools.doctor --replay FILE [--json]

It runs the instant queries of `queries` through Prometheus' HTTP API (`/api/v1/query`),
turns the answers into `Readings` (`readings_from_responses`, no I/O) and applies the rule
table of `tools.diagnosis`. `--save` keeps Prometheus' answers in a file that `--replay`
reads back (to diagnose elsewhere, or attach to a bug report). Exit status: 0 with a
verdict, 1 when Prometheus (or the replayed file) cannot be read, 2 for bad arguments.

Workers per process come from Bytewax's own series (`bytewax_item_inp_count_total`, one
per worker), served on Bytewax's API port (`BYTEWAX_DATAFLOW_API_ENABLED`); when Prometheus
does not scrape it, `--workers` gives the number, else one worker per process is assumed.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.diagnosis import STAGE_GROUPS, Diagnosis, Readings, diagnose

DEFAULT_WINDOW = "10m"
TIMEOUT_S = 10.0
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class DoctorError(Exception):
    """Prometheus could not be read or answered with an error."""


def parse_window(text: str) -> float:
    """A Prometheus duration (`90s`, `10m`, `1h30m`) in seconds; ValueError otherwise."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 10m, 1h)")
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("the window must be longer than 0")
    return seconds


def queries(window: str, match: str = "") -> dict[str, str]:
    """The PromQL the doctor runs, by name, over `window`; `match` (label matchers such as
    `job="streamsight"`) narrows every selector."""
    seconds = parse_window(window)
    step = f"{max(1, int(seconds // 60))}s"
    extra = match.strip().strip(",")

    def s(name: str, *matchers: str) -> str:
        inner = ", ".join([*matchers, *([extra] if extra else [])])
        return f"{name}{{{inner}}}" if inner else name

    def rate(name: str, *matchers: str) -> str:
        return f"rate({s(name, *matchers)}[{window}])"

    def ratio(prefix: str, *matchers: str) -> str:
        return (
            f"sum({rate(prefix + '_sum', *matchers)}) / sum({rate(prefix + '_count', *matchers)})"
        )

    def quantile(q: float, prefix: str) -> str:
        return f"histogram_quantile({q}, sum by (le) ({rate(prefix + '_bucket')}))"

    stage_series = s("streamsight_stage_cpu_seconds_total")
    rate_cpu = rate("streamsight_stage_cpu_seconds_total")
    rate_items = rate("bytewax_item_inp_count_total")
    lag = s("streamsight_kafka_consumer_lag_records")
    results, ingest = 'sink="results"', 'stage="ingest"'
    return {
        "frames": f"sum({rate('streamsight_inference_frames_total')})",
        "written": f"sum({rate('streamsight_sink_rows_written_total', results)})",
        # One ingest call per message read (items per step are Bytewax's, on another port).
        "ingest": f"sum({rate('streamsight_stage_duration_seconds_count', ingest)})",
        "stage_busy": f"sum by (stage) ({rate('streamsight_stage_duration_seconds_sum')})",
        "stage_cpu": f"sum by (stage) ({rate('streamsight_stage_cpu_seconds_total')})",
        "process_cpu": (
            f"{rate('process_cpu_seconds_total')} and on (instance, job) "
            f"group by (instance, job) ({stage_series})"
        ),
        # Counted from rates: series of processes gone before the window do not count.
        "processes": f"count(group by (instance, job) ({rate_cpu}))",
        "workers": f"count(group by (instance, worker_index) ({rate_items}))",
        "bytewax_processes": f"count(group by (instance) ({rate_items}))",
        "device": f"sum by (device) ({rate('streamsight_job_device_seconds_total')})",
        "gpu_utilization": (
            f"avg(avg_over_time({s('streamsight_gpu_utilization_ratio')}[{window}]))"
        ),
        "lag_records": f"sum({lag})",
        "lag_growth": f"deriv(sum({lag})[{window}:{step}])",
        "lag_seconds": f"max({s('streamsight_kafka_consumer_lag_seconds')})",
        "partitions": f"count(group by (topic, partition) ({lag}))",
        "batch_mean_size": ratio("streamsight_batch_size_frames"),
        "batch_max_size": f"max({s('streamsight_batch_max_size_frames')})",
        "batch_fill": ratio("streamsight_batch_fill_ratio"),
        "batch_wait_mean": ratio("streamsight_batch_wait_seconds"),
        "batch_wait_p90": quantile(0.9, "streamsight_batch_wait_seconds"),
        "flushes": f"sum by (reason) ({rate('streamsight_batch_flushes_total')})",
        "inference_batch": ratio("streamsight_inference_batch_duration_seconds"),
        "sink_write": ratio("streamsight_sink_write_duration_seconds", results),
        "dead_letters": f"sum({rate('streamsight_dead_letters_total')})",
        "latency_p50": quantile(0.5, "streamsight_end_to_end_latency_seconds"),
        "latency_p99": quantile(0.99, "streamsight_end_to_end_latency_seconds"),
        "job_frames": f"sum by (job_id) ({rate('streamsight_job_frames_total')})",
        "job_device": f"sum by (job_id) ({rate('streamsight_job_device_seconds_total')})",
    }


# Parsing API answers (pure) ---------------------------------------------------------------


def _samples(response: Mapping[str, Any] | None) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each element of an instant-query answer; NaN values left out."""
    if not response or response.get("status") != "success":
        return []
    data = response.get("data", {})
    result = data.get("result", [])
    if data.get("resultType") == "scalar":
        result = [{"metric": {}, "value": result}]
    out = []
    for element in result:
        value = float(element["value"][1])
        if not math.isnan(value):
            out.append((dict(element.get("metric", {})), value))
    return out


def _scalar(response: Mapping[str, Any] | None) -> float | None:
    samples = _samples(response)
    return samples[0][1] if samples else None


def _by(response: Mapping[str, Any] | None, label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in _samples(response) if label in labels}


def readings_from_responses(
    responses: Mapping[str, Mapping[str, Any]],
    window_s: float,
    *,
    workers_per_process: int | None = None,
) -> Readings:
    """`Readings` from the answers to `queries` (name -> API response body).
    `workers_per_process` overrides what Bytewax's series say."""
    r = responses.get

    def value(name: str, default: float | None = None) -> float | None:
        found = _scalar(r(name))
        return default if found is None else found

    if workers_per_process is None:
        workers = value("workers")
        bytewax_processes = value("bytewax_processes")
        if workers and bytewax_processes:
            workers_per_process = max(1, round(workers / bytewax_processes))
    devices = _by(r("device"), "device")
    active = {d: v for d, v in devices.items() if v > 0}
    processes = int(value("processes", 0) or 0)
    return Readings(
        window_s=window_s,
        frames_per_s=value("frames", 0.0) or 0.0,
        ingest_per_s=value("ingest", 0.0) or 0.0,
        written_per_s=value("written", 0.0) or 0.0,
        stage_busy=_by(r("stage_busy"), "stage"),
        stage_cpu=_by(r("stage_cpu"), "stage"),
        processes=max(processes, 1),
        workers_per_process=workers_per_process,
        process_cpu=tuple(v for _, v in _samples(r("process_cpu"))),
        device=max(active, key=lambda d: active[d]) if active else None,
        gpu_utilization=value("gpu_utilization"),
        lag_records=value("lag_records"),
        lag_growth_per_s=value("lag_growth"),
        lag_seconds=value("lag_seconds"),
        partitions=int(p) if (p := value("partitions")) else None,
        batch_mean_size=value("batch_mean_size"),
        batch_max_size=value("batch_max_size"),
        batch_fill=value("batch_fill"),
        batch_wait_mean_s=value("batch_wait_mean"),
        batch_wait_p90_s=value("batch_wait_p90"),
        flushes=_by(r("flushes"), "reason"),
        inference_batch_s=value("inference_batch"),
        sink_write_s=value("sink_write"),
        dead_letters_per_s=value("dead_letters", 0.0) or 0.0,
        latency_p50_s=value("latency_p50"),
        latency_p99_s=value("latency_p99"),
    )


@dataclass(frozen=True)
class JobShare:
    """One job's frames and device time in the window, and its share of each."""

    job_id: str
    frames_per_s: float
    frame_share: float
    device_share: float


def job_share(responses: Mapping[str, Mapping[str, Any]], job_id: str) -> JobShare | None:
    """`job_id`'s share of the window's frames and device time; None when it had none
    (it may also be folded into `other` past STREAMSIGHT_METRICS_MAX_JOBS)."""
    frames = _by(responses.get("job_frames"), "job_id")
    device = _by(responses.get("job_device"), "job_id")
    if frames.get(job_id, 0.0) <= 0:
        return None
    all_frames, all_device = sum(frames.values()), sum(device.values())
    return JobShare(
        job_id,
        frames[job_id],
        frames[job_id] / all_frames,
        device.get(job_id, 0.0) / all_device if all_device > 0 else 0.0,
    )


# The HTTP client --------------------------------------------------------------------------


class Prometheus:
    """Instant queries against a Prometheus server's HTTP API. A user and password in the
    URL (`http://user:password@host:9090`) are sent as HTTP basic auth and never shown."""

    def __init__(self, url: str, *, timeout_s: float = TIMEOUT_S, at: str | None = None):
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        self.headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        self.url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        self.timeout_s = timeout_s
        self.at = at

    def query(self, expr: str) -> dict[str, Any]:
        """The API's answer to `expr` (evaluated at `at`, else now)."""
        params = {"query": expr, **({"time": self.at} if self.at else {})}
        request = urllib.request.Request(
            f"{self.url}/api/v1/query",
            data=urllib.parse.urlencode(params).encode(),
            headers=self.headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                body = json.load(exc)
            except ValueError:
                raise DoctorError(f"Prometheus at {self.url}: HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:
            raise DoctorError(f"cannot read Prometheus at {self.url}: {exc}") from None
        if body.get("status") != "success":
            raise DoctorError(f"Prometheus rejected a query: {body.get('error', body)}")
        return body

    def run(self, named: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Every query of `named`; name -> answer."""
        return {name: self.query(expr) for name, expr in named.items()}


# Output -----------------------------------------------------------------------------------


def _f(value: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f} ms"


def report_lines(r: Readings, d: Diagnosis, job: JobShare | None, job_id: str | None) -> list[str]:
    """The human-readable report: figures, then the verdict and what to change."""
    workers = (
        f"{r.workers_per_process} worker{'s' if r.workers_per_process > 1 else ''}"
        if r.workers_per_process
        else "workers per process unknown (taken as 1: scrape Bytewax's API port or pass --workers)"
    )
    lag = (
        "no lag series"
        if r.lag_records is None
        else f"lag {r.lag_records:.0f} records ({_f(r.lag_growth_per_s, '+.1f', '/s')}"
        f", {_f(r.lag_seconds, '.1f', ' s')} behind)"
    )
    lines = [
        f"window {r.window_s:.0f} s, {r.processes} process{'es' if r.processes > 1 else ''}"
        f" x {workers}",
        f"throughput  {r.frames_per_s:.1f} frames/s through the model ({r.ingest_per_s:.1f} "
        f"read, {r.written_per_s:.1f} stored); {lag}; dead letters {r.dead_letters_per_s:.2f}/s",
        f"latency     capture->sink p50 {_ms(r.latency_p50_s)}, p99 {_ms(r.latency_p99_s)}",
    ]
    stages = sorted(r.stage_busy, key=lambda s: -r.stage_busy[s])
    per_frame = " | ".join(
        f"{stage} {_f(r.per_frame_ms(stage), '.2f')} ms "
        f"(cpu {_f(r.cpu_per_frame_ms(stage), '.2f')})"
        for stage in stages
        if r.stage_busy[stage] > 0
    )
    lines.append(f"per frame   {per_frame or 'n/a'}")
    shares = ", ".join(f"{group} {r.share(group):.0%}" for group in STAGE_GROUPS)
    lines.append(f"worker time {shares}; workers {r.worker_busy:.0%} busy in stages")
    flushes = sum(r.flushes.values())
    reasons = ", ".join(
        f"{reason} {value / flushes:.0%}" for reason, value in sorted(r.flushes.items()) if value
    )
    lines.append(
        f"batching    {_f(r.batch_mean_size, '.1f')} frames per batch of at most "
        f"{_f(r.batch_max_size, '.0f')} (fill {_f(r.batch_fill, '.0%')}); first frame waits "
        f"{_ms(r.batch_wait_mean_s)} mean, {_ms(r.batch_wait_p90_s)} p90; flushed by "
        f"{reasons or 'n/a'}"
    )
    cores = r.forward_pass_cores
    gpu = "no GPU series" if r.gpu_utilization is None else f"GPU {r.gpu_utilization:.0%} busy"
    lines.append(
        f"inference   {_ms(r.inference_batch_s)} per forward pass on {r.device or 'n/a'}"
        f" ({_f(cores, '.1f')} cores per pass); {gpu}"
    )
    cpu = ", ".join(f"{v:.2f}" for v in r.process_cpu) or "n/a"
    lines.append(f"cpu         cores per process: {cpu}")
    if job_id is not None:
        lines.append(
            f"job {job_id}: no frames in the window (or folded into `other`)"
            if job is None
            else f"job {job.job_id}: {job.frames_per_s:.1f} frames/s, {job.frame_share:.0%} of "
            f"the frames, {job.device_share:.0%} of the device time (the verdict is the "
            "pipeline's)"
        )
    lines.append(d.verdict)
    for finding in d.findings:
        label = "why" if finding.bound else "also"
        lines.append(f"  {label}: {finding.evidence} [{finding.rule}]")
        lines.append(f"  change: {finding.change}")
        lines.append(f"  effect: {finding.effect}")
    return lines


def report_json(r: Readings, d: Diagnosis, job: JobShare | None) -> dict[str, Any]:
    """The report for machines."""
    readings = asdict(r)
    readings.update(
        workers=r.workers,
        worker_busy=r.worker_busy,
        shares={group: r.share(group) for group in STAGE_GROUPS},
        lag_growing=r.lag_growing,
        saturated=r.saturated,
    )
    return {
        **d.as_dict(),
        "readings": readings,
        "job": None if job is None else asdict(job),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsight-doctor",
        description="Name what holds the pipeline back, from its metrics in Prometheus.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prometheus", help="base URL, e.g. http://host:9090")
    source.add_argument(
        "--replay", type=Path, help="read the answers a --save run wrote instead of Prometheus"
    )
    parser.add_argument(
        "--window", default=DEFAULT_WINDOW, help="how far back to look (default 10m)"
    )
    parser.add_argument("--job-id", help="also show this job's share of frames and device time")
    parser.add_argument(
        "--match", default="", help='extra label matchers for every series, e.g. job="streamsight"'
    )
    parser.add_argument(
        "--workers", type=int, help="Bytewax workers per process (when its API is not scraped)"
    )
    parser.add_argument("--at", help="end of the window (RFC 3339 or Unix time; default now)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of text")
    parser.add_argument("--save", type=Path, help="also write Prometheus' answers to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the doctor; the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        window_s = parse_window(args.window)
    except ValueError as exc:
        parser.error(str(exc))
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        if args.replay:
            saved = json.loads(args.replay.read_text())
            responses, window_s = saved["responses"], parse_window(saved["window"])
            if args.workers is None:
                args.workers = saved.get("workers")
        else:
            client = Prometheus(args.prometheus, at=args.at)
            responses = client.run(queries(args.window, args.match))
    except DoctorError as exc:
        print(f"streamsight-doctor: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as exc:
        print(f"streamsight-doctor: cannot replay {args.replay}: {exc}", file=sys.stderr)
        return 1
    if args.save:
        saved = {"window": args.window, "workers": args.workers, "responses": responses}
        args.save.write_text(json.dumps(saved))
    readings = readings_from_responses(responses, window_s, workers_per_process=args.workers)
    diagnosis = diagnose(readings)
    job = job_share(responses, args.job_id) if args.job_id else None
    if args.json:
        print(json.dumps(report_json(readings, diagnosis, job), indent=2))
    else:
        print("\n".join(report_lines(readings, diagnosis, job, args.job_id)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
