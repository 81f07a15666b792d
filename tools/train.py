"""Train the built-in detector on freshly rendered synthetic scenes.

`python -m tools.train [--minutes M] [--out PATH] [--seed S]` renders random training
cameras at random frame sizes around 320x240, degrades them (lighting, blur, noise), round
trips them through JPEG at a random quality (40-95), resizes them to the model input the way
the pipeline does, and trains the CenterNet-style TinyDet within the time budget. It prints
the loss of every epoch and the held-out mAP@0.5 at the end, and writes the weights.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from operators.detector import (
    DEFAULT_INPUT_SIZE,
    DEFAULT_NAME,
    STRIDE,
    TinyDet,
    builtin_weights_path,
    file_version,
    load_detector,
    save_weights,
)
from tools.evaluate import evaluate_with_timing, format_report
from tools.evaluation import TRAIN_CAMERA_RANGE, TRAIN_SEED_RANGE, prepare_jpeg
from tools.scene import CLASSES, FRAME_SIZE, degrade, encode_jpeg, render_frame

FRAMES_PER_CAMERA = 4
MIN_SIGMA = 0.4


@dataclass
class Pool:
    """Training samples: images uint8 [N, H, W, 3]; boxes (input pixels) and labels per image."""

    images: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]


def render_samples(
    count: int, rng: np.random.Generator, input_size: tuple[int, int]
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Render `count` augmented training samples at the model input size."""
    width_in, height_in = input_size
    images = np.empty((count, height_in, width_in, 3), dtype=np.uint8)
    boxes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    camera = seed = width = height = 0
    for i in range(count):
        if i % FRAMES_PER_CAMERA == 0:
            camera = int(rng.integers(*TRAIN_CAMERA_RANGE))
            seed = int(rng.integers(*TRAIN_SEED_RANGE))
            scale = rng.uniform(0.8, 1.3)
            width = round(FRAME_SIZE[0] * scale * rng.uniform(0.9, 1.1))
            height = round(FRAME_SIZE[1] * scale * rng.uniform(0.9, 1.1))
        scene = render_frame(
            camera, int(rng.integers(0, 50_000)), width=width, height=height, seed=seed
        )
        jpeg = encode_jpeg(degrade(scene.rgb, rng), quality=int(rng.integers(40, 96)))
        pixels, w, h = prepare_jpeg(jpeg, input_size)
        images[i] = pixels
        scale_xy = np.array([width_in / w, height_in / h] * 2, dtype=np.float32)
        boxes.append(
            np.array([g.box for g in scene.objects], dtype=np.float32).reshape(-1, 4) * scale_xy
        )
        labels.append(np.array([CLASSES.index(g.label) for g in scene.objects], dtype=np.int64))
    return images, boxes, labels


def build_targets(
    objects: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CenterNet targets for a batch of (boxes [N, 4] in input pixels, labels [N]) pairs.

    Returns heatmaps [B, C, rows, cols] (elliptic Gaussians, 1 at each centre cell), and
    for every object: its flat index (b * rows * cols + cell) [N], offset target [N, 2] in
    [0, 1) and log-size target [N, 2] (log of width/height in stride units).
    """
    heat = np.zeros((len(objects), num_classes, rows, cols), dtype=np.float32)
    ys = np.arange(rows, dtype=np.float32)[:, None]
    xs = np.arange(cols, dtype=np.float32)[None, :]
    index, offsets, sizes = [], [], []
    for b, (frame_boxes, frame_labels) in enumerate(objects):
        for (x1, y1, x2, y2), label in zip(frame_boxes, frame_labels, strict=True):
            w, h = max(x2 - x1, 1.0) / STRIDE, max(y2 - y1, 1.0) / STRIDE
            cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
            ix, iy = min(int(cx), cols - 1), min(int(cy), rows - 1)
            sx, sy = max(0.09 * w, MIN_SIGMA), max(0.09 * h, MIN_SIGMA)
            g = np.exp(-((xs - ix) ** 2) / (2 * sx * sx) - ((ys - iy) ** 2) / (2 * sy * sy))
            np.maximum(heat[b, label], g, out=heat[b, label])
            heat[b, label, iy, ix] = 1.0
            index.append(b * rows * cols + iy * cols + ix)
            offsets.append((cx - ix, cy - iy))
            sizes.append((math.log(w), math.log(h)))
    return (
        heat,
        np.array(index, dtype=np.int64),
        np.array(offsets, dtype=np.float32).reshape(-1, 2),
        np.array(sizes, dtype=np.float32).reshape(-1, 2),
    )


def detection_loss(
    maps: torch.Tensor,
    heat: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor,
    sizes: torch.Tensor,
    num_classes: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Penalty-reduced focal loss on the heatmaps plus L1 on offsets and log sizes."""
    logits = maps[:, :num_classes].float()
    positive = heat.eq(1.0).float()
    count = positive.sum().clamp(min=1.0)
    prob = torch.sigmoid(logits)
    pos_loss = -F.logsigmoid(logits) * (1 - prob) ** 2 * positive
    neg_loss = -F.logsigmoid(-logits) * prob**2 * (1 - heat) ** 4 * (1 - positive)
    focal = (pos_loss.sum() + neg_loss.sum()) / count
    reg = maps[:, num_classes:].float().permute(0, 2, 3, 1).reshape(-1, 4)[index]
    if index.numel():
        off = F.l1_loss(torch.sigmoid(reg[:, :2]), offsets, reduction="sum") / count
        size = F.l1_loss(reg[:, 2:], sizes, reduction="sum") / count
    else:
        off = size = maps.sum() * 0.0
    total = focal + off + size
    return total, {"focal": focal.item(), "offset": off.item(), "size": size.item()}


def flip_batch(
    images: np.ndarray, boxes: list[np.ndarray], flips: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mirror the images (and their boxes) where `flips` is True."""
    width = images.shape[2]
    images = images.copy()
    images[flips] = images[flips, :, ::-1]
    out = []
    for frame_boxes, flip in zip(boxes, flips, strict=True):
        if flip and len(frame_boxes):
            frame_boxes = frame_boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32)
            frame_boxes = frame_boxes + np.array([width, 0, width, 0], np.float32)
        out.append(frame_boxes)
    return images, out


def train(
    minutes: float,
    seed: int,
    *,
    pool_size: int = 4000,
    refresh: float = 0.3,
    batch_size: int = 32,
    lr: float = 3e-3,
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
    eval_reserve_s: float = 45.0,
) -> tuple[TinyDet, dict[str, float]]:
    """Train a TinyDet for about `minutes` (data rendering included); returns it and stats."""
    began = time.perf_counter()
    deadline = began + max(30.0, minutes * 60.0 - eval_reserve_s)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = TinyDet(len(CLASSES)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    print(f"rendering {pool_size} training samples ...", flush=True)
    images, boxes, labels = render_samples(pool_size, rng, input_size)
    print(f"  done in {time.perf_counter() - began:.1f}s", flush=True)
    start_train = time.perf_counter()
    budget = deadline - start_train
    width, height = input_size
    rows, cols = -(-height // STRIDE), -(-width // STRIDE)
    epoch = seen = 0
    while time.perf_counter() < deadline:
        epoch += 1
        if epoch > 1:
            n = int(pool_size * refresh)
            slots = rng.choice(pool_size, size=n, replace=False)
            new_images, new_boxes, new_labels = render_samples(n, rng, input_size)
            images[slots] = new_images
            for slot, b, lab in zip(slots, new_boxes, new_labels, strict=True):
                boxes[slot], labels[slot] = b, lab
        model.train()
        order = rng.permutation(pool_size)
        totals = {"loss": 0.0, "focal": 0.0, "offset": 0.0, "size": 0.0}
        steps = 0
        for start in range(0, pool_size - batch_size + 1, batch_size):
            now = time.perf_counter()
            if now >= deadline:
                break
            progress = (now - start_train) / budget
            warm = min(1.0, progress / 0.03)
            for group in optimizer.param_groups:
                group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            pick = order[start : start + batch_size]
            batch_images, batch_boxes = flip_batch(
                images[pick], [boxes[i] for i in pick], rng.random(len(pick)) < 0.5
            )
            heat, index, offsets, sizes = build_targets(
                list(zip(batch_boxes, [labels[i] for i in pick], strict=True)),
                len(CLASSES),
                rows,
                cols,
            )
            x = torch.from_numpy(batch_images).permute(0, 3, 1, 2).float().div_(255.0)
            maps = model.raw(x)
            loss, parts = detection_loss(
                maps,
                torch.from_numpy(heat),
                torch.from_numpy(index),
                torch.from_numpy(offsets),
                torch.from_numpy(sizes),
                len(CLASSES),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            totals["loss"] += loss.item()
            for key, value in parts.items():
                totals[key] += value
            steps += 1
            seen += len(pick)
        if steps:
            means = "  ".join(f"{k} {v / steps:.4f}" for k, v in totals.items())
            elapsed = time.perf_counter() - began
            print(f"epoch {epoch:3d}  {means}  samples {seen}  {elapsed:.0f}s", flush=True)
    model.eval()
    stats = {"epochs": float(epoch), "samples": float(seen), "seconds": time.perf_counter() - began}
    return model.to(memory_format=torch.contiguous_format), stats


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="time budget, all included")
    parser.add_argument("--out", type=Path, default=builtin_weights_path(), help="weights file")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--eval-frames", type=int, default=300, help="held-out frames at the end")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    print(f"training {DEFAULT_NAME} for {args.minutes:g} min on {torch.get_num_threads()} threads")
    model, stats = train(args.minutes, args.seed)
    meta = {
        "name": DEFAULT_NAME,
        "classes": list(CLASSES),
        "input_size": list(DEFAULT_INPUT_SIZE),
        "train_seed": args.seed,
        "train_samples": int(stats["samples"]),
        "train_seconds": round(stats["seconds"], 1),
    }
    path = save_weights(model, meta, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, version {file_version(path)})")
    report, ms = evaluate_with_timing(load_detector(path), args.eval_frames, seed=0)
    print("held-out evaluation:")
    print(format_report(report))
    print(f"model time {ms:.2f} ms/frame (CPU, batch 16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
