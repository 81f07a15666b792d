"""Detection quality: IoU, VOC-style average precision and precision/recall at a threshold.

Also holds the split of synthetic scenes between training and held-out evaluation, and the
preprocessing shared by training and evaluation (JPEG decode, bilinear resize to the
model input), which is the pipeline's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from tools.scene import GroundTruth

TRAIN_SEED_RANGE = (1, 2**31)
HELD_OUT_SEED_BASE = 2**31
TRAIN_CAMERA_RANGE = (0, 1_000_000)
HELD_OUT_CAMERA_BASE = 1_000_000


@dataclass(frozen=True)
class EvalReport:
    """Quality of a detector over a set of frames.

    `map50`: mean over classes (those with at least one truth) of all-point interpolated AP
    at IoU 0.5 (or the chosen IoU), using every prediction; `precision`/`recall`: greedy
    matching of the predictions at or above the score threshold; `predictions` counts those.
    """

    map50: float
    per_class_ap: dict[str, float]
    precision: float
    recall: float
    frames: int
    truths: int
    predictions: int


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when both are empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _average_precision(hits: list[tuple[float, bool]], positives: int) -> float:
    """All-point interpolated AP from (score, is_true_positive) pairs and the truth count."""
    if positives == 0:
        return 0.0
    if not hits:
        return 0.0
    hits = sorted(hits, key=lambda h: -h[0])
    tp = np.cumsum([1.0 if hit else 0.0 for _, hit in hits])
    fp = np.cumsum([0.0 if hit else 1.0 for _, hit in hits])
    recall = np.concatenate([[0.0], tp / positives, [1.0]])
    precision = np.concatenate([[0.0], tp / np.maximum(tp + fp, 1e-12), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _match(
    preds: Sequence[Any], truths: Sequence[GroundTruth], threshold: float
) -> list[tuple[float, str, bool]]:
    """Greedy matching of one frame's predictions (by score) to same-class truths.

    Each prediction takes the truth of its class with the highest IoU (the VOC rule); it is a
    true positive if that IoU reaches `threshold` and no higher-scored prediction took that
    truth already. Returns (score, label, is_true_positive) per prediction.
    """
    taken = [False] * len(truths)
    out = []
    for pred in sorted(preds, key=lambda p: -float(p.score)):
        best, best_iou = -1, 0.0
        for j, truth in enumerate(truths):
            if truth.label != pred.label:
                continue
            overlap = iou(pred.box, truth.box)
            if overlap > best_iou:
                best, best_iou = j, overlap
        hit = best >= 0 and best_iou >= threshold and not taken[best]
        if hit:
            taken[best] = True
        out.append((float(pred.score), str(pred.label), hit))
    return out


def evaluate_detections(
    predictions: Sequence[Sequence[Any]],
    truths: Sequence[Sequence[GroundTruth]],
    *,
    iou: float = 0.5,
    score_threshold: float = 0.35,
) -> EvalReport:
    """Score per-frame predictions (objects with .box, .label, .score) against truths.

    `predictions[i]` and `truths[i]` belong to frame i. Raises ValueError if the two
    sequences have different lengths.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} prediction frames but {len(truths)} truth frames")
    per_class_hits: dict[str, list[tuple[float, bool]]] = {}
    positives: dict[str, int] = {}
    true_pos = kept = total_truths = 0
    for preds, frame_truths in zip(predictions, truths, strict=True):
        for truth in frame_truths:
            positives[truth.label] = positives.get(truth.label, 0) + 1
        total_truths += len(frame_truths)
        for score, label, hit in _match(preds, frame_truths, iou):
            per_class_hits.setdefault(label, []).append((score, hit))
        confident = [p for p in preds if float(p.score) >= score_threshold]
        kept += len(confident)
        true_pos += sum(hit for _, _, hit in _match(confident, frame_truths, iou))
    per_class_ap = {
        label: _average_precision(per_class_hits.get(label, []), count)
        for label, count in sorted(positives.items())
    }
    map50 = float(np.mean(list(per_class_ap.values()))) if per_class_ap else 0.0
    return EvalReport(
        map50=map50,
        per_class_ap=per_class_ap,
        precision=true_pos / kept if kept else 1.0,
        recall=true_pos / total_truths if total_truths else 1.0,
        frames=len(truths),
        truths=total_truths,
        predictions=kept,
    )


def prepare_rgb(rgb: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 frame to the model input (width, height) with Pillow bilinear."""
    width, height = input_size
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return np.ascontiguousarray(rgb)
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def prepare_jpeg(jpeg: bytes, input_size: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """Decode a JPEG and resize it to the model input: (uint8 H x W x 3, frame w, frame h)."""
    rgb = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
    return prepare_rgb(rgb, input_size), rgb.shape[1], rgb.shape[0]
