"""Explore a job's traces in Jaeger: per-stage latency, the slowest frames, the dominant stage.

    python -m tools.trace_report --job-id shop-42 --jaeger http://localhost:16686

Fetches the traces whose spans carry `job.id` = JOB through Jaeger's HTTP query API
(`/api/traces`), keeps the per-frame spans (`streamsight.span.scope=frame`) and prints,
per stage, p50/p95/max of the time spent, then the slowest frames (camera send to sink
write) with their trace IDs, and which stage dominates.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from operators.telemetry.tracing import SCOPE_ATTR, STAGE, STAGES

SERVICE_PREFIX = "streamsight"
# By `streamsight.stage`: the camera's send, then the flow's stages by their step ids.
STAGE_LABELS = {
    "send": "camera send",
    "ingest": "kafka + ingest",
    "decode": "decode",
    "batch": "batch wait",
    "infer": "inference",
    "sink": "sink write",
}


@dataclass
class FrameTrace:
    """One frame's trace: its stage durations (ms) and end-to-end time."""

    trace_id: str
    frame_id: str
    camera: str
    stages: dict[str, float] = field(default_factory=dict)
    total_ms: float = 0.0
    error: str | None = None
    batch_id: str | None = None


@dataclass
class Breakdown:
    """What the command prints, computed from the traces."""

    job_id: str
    frames: list[FrameTrace]
    stages: dict[str, tuple[float, float, float, int]]
    dominant: str | None
    batches: int

    @property
    def errors(self) -> list[FrameTrace]:
        """Frames whose trace ended with an error (dead letters)."""
        return [f for f in self.frames if f.error]


def _tags(span: Mapping[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag.get("value") for tag in span.get("tags", [])}


def frame_traces(payload: Mapping[str, Any], job_id: str) -> tuple[list[FrameTrace], int]:
    """The frame traces of `job_id` in a Jaeger `/api/traces` response, and how many
    distinct batches their inference ran in."""
    frames: list[FrameTrace] = []
    batches: set[str] = set()
    for trace in payload.get("data") or []:
        spans = [(span, _tags(span)) for span in trace.get("spans", [])]
        spans = [(s, t) for s, t in spans if t.get(SCOPE_ATTR) == "frame"]
        if not spans or not any(t.get("job.id") == job_id for _, t in spans):
            continue
        start = min(s["startTime"] for s, _ in spans)
        end = max(s["startTime"] + s["duration"] for s, _ in spans)
        frame = FrameTrace(
            trace_id=trace.get("traceID", spans[0][0].get("traceID", "")),
            frame_id=next(
                (str(t["streamsight.frame.id"]) for _, t in spans if t.get("streamsight.frame.id")),
                "?",
            ),
            camera=str(next((t["camera.id"] for _, t in spans if "camera.id" in t), "?")),
            total_ms=(end - start) / 1000.0,
        )
        for span, tags in spans:
            stage = tags.get(STAGE)
            if stage in STAGES:
                frame.stages[stage] = frame.stages.get(stage, 0.0) + span["duration"] / 1000.0
            if tags.get("error") in (True, "true") or tags.get("otel.status_code") == "ERROR":
                frame.error = str(
                    tags.get("streamsight.dead_letter.reason") or tags.get("error.type") or "error"
                )
            if tags.get("streamsight.batch.id"):
                frame.batch_id = str(tags["streamsight.batch.id"])
        if frame.batch_id:
            batches.add(frame.batch_id)
        frames.append(frame)
    return frames, len(batches)


def breakdown(payload: Mapping[str, Any], job_id: str) -> Breakdown:
    """Per-stage p50/p95/max (ms) and frame count, and the stage with the most time."""
    frames, batches = frame_traces(payload, job_id)
    per_stage: dict[str, list[float]] = defaultdict(list)
    for frame in frames:
        for stage, ms in frame.stages.items():
            per_stage[stage].append(ms)
    stages: dict[str, tuple[float, float, float, int]] = {}
    for stage in STAGES:
        values = per_stage.get(stage)
        if values:
            p50, p95 = np.percentile(values, [50, 95])
            stages[stage] = (float(p50), float(p95), float(max(values)), len(values))
    totals = {stage: sum(per_stage[stage]) for stage in stages}
    dominant = max(totals, key=lambda s: totals[s]) if totals else None
    return Breakdown(job_id, frames, stages, dominant, batches)


def _get(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.load(response)


def services(jaeger: str, timeout_s: float) -> list[str]:
    """The services Jaeger knows whose name starts with `streamsight`."""
    names = _get(f"{jaeger.rstrip('/')}/api/services", timeout_s).get("data") or []
    return sorted(name for name in names if str(name).startswith(SERVICE_PREFIX))


def fetch_traces(
    jaeger: str,
    job_id: str,
    *,
    service: str | None,
    limit: int,
    lookback: str,
    timeout_s: float,
) -> dict[str, Any]:
    """GET `/api/traces` for spans tagged `job.id` = `job_id`, in `service` or else in
    every `streamsight*` service; traces found in several services are merged."""
    names = [service] if service else services(jaeger, timeout_s) or [SERVICE_PREFIX]
    merged: dict[str, dict[str, Any]] = {}
    for name in names:
        query = urllib.parse.urlencode(
            {
                "service": name,
                "tags": json.dumps({"job.id": job_id}),
                "limit": str(limit),
                "lookback": lookback,
            }
        )
        payload = _get(f"{jaeger.rstrip('/')}/api/traces?{query}", timeout_s)
        for trace in payload.get("data") or []:
            known = merged.get(trace.get("traceID", ""))
            if known is None or len(trace.get("spans", [])) > len(known.get("spans", [])):
                merged[trace.get("traceID", "")] = trace
    return {"data": list(merged.values())}


def render(result: Breakdown, *, top: int) -> str:
    """The report as text."""
    lines = [f"job {result.job_id}: {len(result.frames)} frame traces"]
    if result.batches:
        lines[0] += f", {result.batches} inference batches"
    if not result.frames:
        lines.append("no traces found for this job (check the job ID, service and lookback)")
        return "\n".join(lines)
    lines.append("")
    lines.append(f"{'stage':<16}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}{'frames':>8}")
    for stage, (p50, p95, peak, count) in result.stages.items():
        label = STAGE_LABELS.get(stage, stage)
        lines.append(f"{label:<16}{p50:>10.1f}{p95:>10.1f}{peak:>10.1f}{count:>8}")
    totals = sorted(f.total_ms for f in result.frames)
    p50, p95 = np.percentile(totals, [50, 95])
    lines.append(f"{'end to end':<16}{p50:>10.1f}{p95:>10.1f}{totals[-1]:>10.1f}{len(totals):>8}")
    lines.append("")
    lines.append(f"slowest {min(top, len(result.frames))} frames:")
    for frame in sorted(result.frames, key=lambda f: f.total_ms, reverse=True)[:top]:
        worst = max(frame.stages, key=lambda s: frame.stages[s]) if frame.stages else "?"
        note = f"  [{frame.error}]" if frame.error else ""
        lines.append(
            f"  {frame.total_ms:8.1f} ms  trace {frame.trace_id}  {frame.frame_id}"
            f"  (most in {STAGE_LABELS.get(worst, worst)}){note}"
        )
    if result.errors:
        lines.append(f"\n{len(result.errors)} frames ended with an error (dead letters)")
    if result.dominant:
        share = _share(result, result.dominant)
        lines.append(
            f"\ndominant stage: {STAGE_LABELS.get(result.dominant, result.dominant)}"
            f" ({share:.0%} of the time spent in stages)"
        )
    return "\n".join(lines)


def _share(result: Breakdown, stage: str) -> float:
    totals: dict[str, float] = defaultdict(float)
    for frame in result.frames:
        for name, ms in frame.stages.items():
            totals[name] += ms
    whole = sum(totals.values())
    return totals[stage] / whole if whole > 0 else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 on success, 1 when Jaeger cannot be queried."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.trace_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--job-id", required=True, help="job ID to look up")
    parser.add_argument("--jaeger", default="http://localhost:16686", help="Jaeger query URL")
    parser.add_argument(
        "--service", default=None, help="service to search (default: every streamsight* service)"
    )
    parser.add_argument("--limit", type=int, default=1500, help="most traces to fetch")
    parser.add_argument("--lookback", default="24h", help="how far back to search (e.g. 1h, 2d)")
    parser.add_argument("--top", type=int, default=5, help="slowest frames to list")
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")
    args = parser.parse_args(argv)
    try:
        payload = fetch_traces(
            args.jaeger,
            args.job_id,
            service=args.service,
            limit=args.limit,
            lookback=args.lookback,
            timeout_s=args.timeout,
        )
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"error: cannot query Jaeger at {args.jaeger}: {exc}", file=sys.stderr)
        return 1
    print(render(breakdown(payload, args.job_id), top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
