"""Evaluate a detector on held-out synthetic frames.

`python -m tools.evaluate [--model PATH] [--frames N] [--seed S] [--frame-size WxH]
[--input-size WxH]` renders frames (320x240 by default) from cameras and seeds never used
in training, round-trips them through JPEG, applies the
pipeline's preprocessing (decode, bilinear resize to the model input, / 255), runs the model
in batches, maps the boxes back to frame pixels and prints mAP@0.5, per-class AP, precision
and recall at the score threshold, and the model's CPU time per frame.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from operators.detector import LoadedDetector, load_detector
from operators.frames import Detection
from tools.evaluation import (
    HELD_OUT_CAMERA_BASE,
    HELD_OUT_SEED_BASE,
    EvalReport,
    evaluate_detections,
    prepare_jpeg,
)
from tools.scene import FRAME_SIZE, GroundTruth, encode_jpeg, render_frame

HELD_OUT_CAMERAS = 40
SCORE_THRESHOLD = 0.35


@dataclass(frozen=True)
class HeldOutFrame:
    """One held-out frame after the pipeline's preprocessing, with its truth."""

    pixels: np.ndarray
    frame_size: tuple[int, int]
    truths: tuple[GroundTruth, ...]


def held_out_frames(
    count: int,
    seed: int,
    input_size: tuple[int, int],
    *,
    frame_size: tuple[int, int] = FRAME_SIZE,
    quality: int = 85,
) -> list[HeldOutFrame]:
    """Render `count` held-out frames (JPEG round trip, resized to `input_size`)."""
    frames = []
    for i in range(count):
        camera = HELD_OUT_CAMERA_BASE + i % HELD_OUT_CAMERAS
        seq = 11 * (i // HELD_OUT_CAMERAS) + 3 * (i % 7)
        scene = render_frame(
            camera, seq, width=frame_size[0], height=frame_size[1], seed=HELD_OUT_SEED_BASE + seed
        )
        pixels, width, height = prepare_jpeg(encode_jpeg(scene.rgb, quality), input_size)
        frames.append(HeldOutFrame(pixels, (width, height), scene.objects))
    return frames


def to_tensor(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack uint8 H x W x 3 images into a float [B, 3, H, W] tensor in [0, 1]."""
    batch = torch.from_numpy(np.stack(pixels))
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def decode_rows(
    rows: torch.Tensor,
    classes: Sequence[str],
    input_size: tuple[int, int],
    frame_size: tuple[int, int],
    min_score: float = 0.0,
) -> tuple[Detection, ...]:
    """Turn one frame's [K, 6] model output into Detections in frame pixels."""
    sx = frame_size[0] / input_size[0]
    sy = frame_size[1] / input_size[1]
    out = []
    for x1, y1, x2, y2, score, cls in rows.float().tolist():
        index = round(cls)
        if score <= min_score or not 0 <= index < len(classes):
            continue
        box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
        out.append(Detection(box=box, label=classes[index], score=float(score)))
    return tuple(out)


def run_detector(
    detector: LoadedDetector, frames: Sequence[HeldOutFrame], batch_size: int = 16
) -> tuple[list[tuple[Detection, ...]], float]:
    """Run the detector over frames in batches: (detections per frame, model ms per frame)."""
    results: list[tuple[Detection, ...]] = []
    spent = 0.0
    with torch.inference_mode():
        for start in range(0, len(frames), batch_size):
            chunk = frames[start : start + batch_size]
            batch = to_tensor([f.pixels for f in chunk])
            began = time.perf_counter()
            output = detector.module(batch)
            spent += time.perf_counter() - began
            for frame, rows in zip(chunk, output, strict=True):
                results.append(
                    decode_rows(rows, detector.classes, detector.input_size, frame.frame_size)
                )
    return results, 1000.0 * spent / max(1, len(frames))


def evaluate_model(
    detector: LoadedDetector, frames: int, seed: int, frame_size: tuple[int, int] = FRAME_SIZE
) -> EvalReport:
    """mAP@0.5, precision and recall of `detector` on `frames` held-out frames of
    `frame_size` (W, H)."""
    report, _ = evaluate_with_timing(detector, frames, seed, frame_size)
    return report


def evaluate_with_timing(
    detector: LoadedDetector, frames: int, seed: int, frame_size: tuple[int, int] = FRAME_SIZE
) -> tuple[EvalReport, float]:
    """Like `evaluate_model`, also returning the model's ms per frame (batches of 16)."""
    data = held_out_frames(frames, seed, detector.input_size, frame_size=frame_size)
    detections, ms = run_detector(detector, data)
    report = evaluate_detections(
        detections, [f.truths for f in data], score_threshold=SCORE_THRESHOLD
    )
    return report, ms


def format_report(report: EvalReport) -> str:
    """A few human-readable lines describing an EvalReport."""
    lines = [
        f"frames {report.frames}  truths {report.truths}  "
        f"predictions >= {SCORE_THRESHOLD} {report.predictions}",
        f"mAP@0.5 {report.map50:.4f}",
    ]
    lines += [f"  AP {label:<8} {ap:.4f}" for label, ap in report.per_class_ap.items()]
    lines.append(
        f"precision {report.precision:.4f}  recall {report.recall:.4f}  "
        f"(score >= {SCORE_THRESHOLD})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model file (default: built-in weights)")
    parser.add_argument("--frames", type=int, default=500, help="held-out frames to render")
    parser.add_argument("--seed", type=int, default=0, help="held-out scene seed")
    parser.add_argument(
        "--frame-size", default="320x240", help="WxH of the rendered frames (default 320x240)"
    )
    parser.add_argument(
        "--input-size",
        default=None,
        help="WxH to run the model at (default: its metadata's; the shipped model's is 160x120)",
    )
    parser.add_argument("--classes", default=None, help="comma-separated class names")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from flows.settings import parse_size  # pydantic is only needed for this option

    try:
        size = parse_size(args.input_size) if args.input_size else None
    except ValueError:
        parser.error("--input-size must be WxH with positive whole numbers, e.g. 320x320")
    try:
        frame_size = parse_size(args.frame_size)
    except ValueError:
        parser.error("--frame-size must be WxH with positive whole numbers, e.g. 1280x720")
    if min(frame_size) < 16:
        parser.error("--frame-size must be at least 16x16")
    classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
    detector = load_detector(args.model, input_size=size, classes=classes)
    print(f"model {detector.name} version {detector.version} input {detector.input_size}")
    print(f"held-out {frame_size[0]}x{frame_size[1]} frames, seed {args.seed}")
    report, ms = evaluate_with_timing(detector, args.frames, args.seed, frame_size)
    print(format_report(report))
    print(f"model time {ms:.2f} ms/frame (CPU, batch 16, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
