"""Stage ceilings: `python -m bench.ceilings [--device auto] [--batch-sizes 1,8,16]
[--frame-size 1280x720] [--input-size 640x360]` (the pipeline against them:
`python -m bench.pipeline`).

Measures, on frames already in memory (no Kafka, no Bytewax): JPEG decode + resize per
frame, the model alone per batch size, and decode + model together; prints a table and
optionally writes JSON. These are the ceilings the pipeline's throughput is compared to.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from flows.settings import is_device, parse_size
from operators.decode import FrameLimits, decode_pixels
from operators.detector import load_detector
from operators.inference import Inferencer
from tools.camera import synthetic_frames


def timed(work: Callable[[], object], *, min_seconds: float, device: torch.device) -> float:
    """Mean seconds per call of `work`, after a warm-up, over at least `min_seconds`."""
    for _ in range(3):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    calls, started = 0, time.perf_counter()
    while True:
        work()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and calls >= 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - started) / calls


def stage_ceilings(
    inferencer: Inferencer, jpegs: list[bytes], batch_sizes: list[int], seconds: float
) -> dict[str, Any]:
    """Decode + resize per frame and the model alone per batch size, frames in memory."""
    device = inferencer.device
    limits = FrameLimits(64 * 1024 * 1024, 100_000_000, inferencer.detector.input_size)
    decoded = [decode_pixels(j, limits) for j in jpegs]
    pixels = np.stack([d[0] for d in decoded])
    state = {"i": 0}

    def decode_one() -> None:
        decode_pixels(jpegs[state["i"] % len(jpegs)], limits)
        state["i"] += 1

    decode_s = timed(decode_one, min_seconds=seconds, device=torch.device("cpu"))
    rows = []
    for size in batch_sizes:
        batch = (
            pixels[:size] if size <= len(pixels) else np.resize(pixels, (size, *pixels.shape[1:]))
        )
        model_s = timed(lambda b=batch: inferencer.forward(b), min_seconds=seconds, device=device)
        per_frame = model_s / size
        rows.append(
            {
                "batch_size": size,
                "model_ms_per_batch": model_s * 1e3,
                "model_frames_per_s": size / model_s,
                "decode_plus_model_frames_per_s": 1.0 / (per_frame + decode_s),
            }
        )
    detector = inferencer.detector
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": str(device),
        "device_name": name or platform.machine(),
        "precision": str(inferencer.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": f"{detector.name} {detector.version}",
        "input_size": list(detector.input_size),
        "frame_size": list(decoded[0][1:]),
        "decode_ms_per_frame": decode_s * 1e3,
        "decode_frames_per_s": 1.0 / decode_s,
        "batches": rows,
    }


def ceilings_main(argv: list[str]) -> None:
    """Measure the stage ceilings and print them."""
    parser = argparse.ArgumentParser(description="Stage ceilings: frames in memory")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--batch-sizes", default="1,4,8,16,32,64")
    parser.add_argument("--frames", type=int, default=256, help="distinct frames in memory")
    parser.add_argument("--frame-size", default="320x240", help="WxH of the frames")
    parser.add_argument(
        "--input-size", help="WxH to run the detector at (default: its own, 160x120)"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not is_device(args.device):
        parser.error("--device must be auto, cpu, cuda or cuda:N")
    try:
        width, height = parse_size(args.frame_size)
        input_size = parse_size(args.input_size) if args.input_size else None
    except ValueError:
        parser.error("--frame-size and --input-size are WxH, e.g. 1280x720")
    if width < 16 or height < 16:
        parser.error("--frame-size is at least 16x16")

    detector = load_detector(input_size=input_size)
    try:
        inferencer = Inferencer.create(detector, device=args.device, precision=args.precision)
    except ValueError as exc:  # e.g. cuda asked for on a machine without CUDA
        raise SystemExit(f"streamsight: {exc}") from None
    jpegs = [
        f.jpeg
        for tick in synthetic_frames(4, max(args.frames // 4, 1), width=width, height=height)
        for f in tick
    ]
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    report = stage_ceilings(inferencer, jpegs, sizes, args.seconds)
    rows = report["batches"]
    decode_s = report["decode_ms_per_frame"] / 1e3
    in_w, in_h = report["input_size"]
    table = Table(
        title=f"{report['model']} at {in_w}x{in_h} on {report['device']}"
        f" ({report['device_name']}, {report['precision']}); {width}x{height} frames:"
        f" decode+resize {decode_s * 1e3:.2f} ms/frame"
    )
    for column in ("batch", "model ms/batch", "model frames/s", "decode+model frames/s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["batch_size"]),
            f"{row['model_ms_per_batch']:.2f}",
            f"{row['model_frames_per_s']:.0f}",
            f"{row['decode_plus_model_frames_per_s']:.0f}",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    """The stage ceilings, with the command line's arguments."""
    ceilings_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
