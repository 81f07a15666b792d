"""Write the doctor's derived fixtures: recorded Prometheus answers with some series edited.

The recorded fixtures (`offered_load`, `batch_size_1`, `too_few_partitions`) come from real
runs on a 2-core machine without a GPU. The bounds that machine cannot show (a busy GPU,
worker threads held by the interpreter lock, preprocessing or the sink as the limit, a
broker that cannot keep up, nothing flowing) are made here by editing named series of a
recorded file; each derived file says what it was derived from and what was edited.

    python -m tests.unit.tools.doctor_data.derive
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _vector(samples: list[tuple[dict[str, str], float]], at: float) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": labels, "value": [at, repr(v)]} for labels, v in samples],
        },
    }


def derive(source: str, edits: dict[str, Any], note: str) -> dict[str, Any]:
    """`source`'s answers with `edits` (query name -> a number, None for an empty answer,
    {label value: number} for a `by` answer, or a list of (labels, number))."""
    recorded = json.loads((HERE / f"{source}.json").read_text())
    responses = copy.deepcopy(recorded["responses"])
    at = responses["frames"]["data"]["result"][0]["value"][0]
    for name, value in edits.items():
        if value is None:
            samples: list[tuple[dict[str, str], float]] = []
        elif isinstance(value, dict):
            label = {
                "stage_busy": "stage", "stage_cpu": "stage", "device": "device",
                "flushes": "reason", "job_frames": "job_id", "job_device": "job_id",
            }[name]  # fmt: skip
            samples = [({label: k}, v) for k, v in value.items()]
        elif isinstance(value, list):
            samples = [(dict(labels), v) for labels, v in value]
        else:
            samples = [({}, float(value))]
        responses[name] = _vector(samples, at)
    return {
        "derived": f"from {source}.json: {note}; edited: {', '.join(sorted(edits))}",
        "window": recorded["window"],
        "workers": None,
        "responses": responses,
    }


def _cpus(*cores: float) -> list[tuple[dict[str, str], float]]:
    return [
        ({"instance": f"10.0.0.{i}:9464", "job": "streamsight"}, c) for i, c in enumerate(cores)
    ]


GPU_SPREAD = {"device": {"cuda": 0.9}, "gpu_utilization": 0.93}

CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "gpu_busy": (
        "batch_size_1",
        {
            **GPU_SPREAD,
            "batch_max_size": 64, "batch_mean_size": 62.0, "batch_fill": 0.97,
            "flushes": {"size": 1.4, "deadline": 0.0, "end_of_input": 0.0},
            "inference_batch": 0.68,
        },
        "a GPU 93% busy with full batches of 64 (NVML series and the device label of a "
        "CUDA run)",
    ),
    "interpreter_lock": (
        "batch_size_1",
        {
            "workers": 4, "bytewax_processes": 1, "process_cpu": _cpus(1.04),
            "stage_busy": {"ingest": 0.35, "decode": 1.55, "batch": 0.3, "infer": 0.7,
                           "sink": 0.85, "dead_letter_sink": 0.0},
            "stage_cpu": {"ingest": 0.08, "decode": 0.38, "batch": 0.07, "infer": 0.3,
                          "sink": 0.2, "dead_letter_sink": 0.0},
            "device": {"cuda": 0.7}, "gpu_utilization": 0.06,
            "batch_max_size": 16, "batch_mean_size": 15.2, "batch_fill": 0.95,
            "flushes": {"size": 180.0, "deadline": 4.0, "end_of_input": 0.0},
        },
        "4 worker threads in one process at 1.04 cores, a GPU 6% busy (the shape of the "
        "H100 run with the shipped detector)",
    ),
    "preprocessing": (
        "batch_size_1",
        {
            "processes": 2, "process_cpu": _cpus(0.97, 0.95),
            "stage_busy": {"ingest": 0.1, "decode": 0.45, "batch": 0.05, "infer": 0.15,
                           "sink": 0.1, "dead_letter_sink": 0.0},
            "stage_cpu": {"ingest": 0.09, "decode": 0.44, "batch": 0.05, "infer": 0.12,
                          "sink": 0.06, "dead_letter_sink": 0.0},
            "device": {"cuda": 0.15}, "gpu_utilization": 0.04,
            "batch_max_size": 16, "batch_mean_size": 16.0, "batch_fill": 1.0,
            "flushes": {"size": 120.0, "deadline": 0.0, "end_of_input": 0.0},
        },
        "2 single-worker processes at 0.96 cores each, decode the largest stage, a GPU 4% "
        "busy",
    ),
    "sink": (
        "batch_size_1",
        {
            "stage_busy": {"ingest": 0.01, "decode": 0.04, "batch": 0.01, "infer": 0.2,
                           "sink": 0.7, "dead_letter_sink": 0.0},
            "sink_write": 0.25,
            "batch_max_size": 16, "batch_mean_size": 16.0, "batch_fill": 1.0,
            "flushes": {"size": 6.0, "deadline": 0.0, "end_of_input": 0.0},
        },
        "sink writes of 250 ms taking 70% of the worker's time",
    ),
    "kafka_ingest": (
        "offered_load",
        {
            "lag_records": 24000, "lag_growth": 210.0, "lag_seconds": 95.0,
            "partitions": 8, "workers": 2, "bytewax_processes": 1,
        },
        "lag growing by 210 records/s over 8 partitions while 2 workers stay 3% busy",
    ),
    "no_data": (
        "offered_load",
        {
            "frames": 0, "written": 0, "ingest": 0, "stage_busy": {}, "stage_cpu": {},
            "batch_mean_size": None, "batch_fill": None, "inference_batch": None,
        },
        "no frames in the window",
    ),
    "thin_batches_idle_gpu": (
        "offered_load",
        {
            **GPU_SPREAD, "gpu_utilization": 0.05,
            "batch_max_size": 16, "batch_mean_size": 4.8, "batch_fill": 0.3,
            "batch_wait_mean": 0.05, "batch_wait_p90": 0.05,
            "flushes": {"size": 0.0, "deadline": 0.83, "end_of_input": 0.0},
        },
        "batches 30% full at 50 ms while a GPU is 5% busy",
    ),
}  # fmt: skip


def main() -> None:
    """Write every derived case next to this file."""
    for name, (source, edits, note) in CASES.items():
        text = json.dumps(derive(source, edits, note), indent=1)
        (HERE / f"{name}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
