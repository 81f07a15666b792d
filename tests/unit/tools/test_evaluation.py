"""Tests of the detection metrics and of the shipped weights' held-out quality."""

from __future__ import annotations

import math

import numpy as np
import pytest

from operators.detector import load_detector
from operators.frames import Detection
from tools.evaluate import evaluate_model, held_out_frames, main
from tools.evaluation import (
    HELD_OUT_CAMERA_BASE,
    HELD_OUT_SEED_BASE,
    TRAIN_CAMERA_RANGE,
    TRAIN_SEED_RANGE,
    evaluate_detections,
    iou,
    prepare_rgb,
)
from tools.scene import GroundTruth


def gt(x1: float, y1: float, x2: float, y2: float, label: str = "car") -> GroundTruth:
    return GroundTruth((x1, y1, x2, y2), label)


def det(x1: float, y1: float, x2: float, y2: float, score: float, label: str = "car") -> Detection:
    return Detection((x1, y1, x2, y2), label, score)


def test_iou() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_perfect_predictions() -> None:
    truths = [[gt(0, 0, 10, 10), gt(20, 20, 40, 30, "ball")], [gt(5, 5, 15, 25, "person")]]
    preds = [[det(*t.box, 0.9, t.label) for t in frame] for frame in truths]
    report = evaluate_detections(preds, truths)
    assert report.map50 == 1.0
    assert report.per_class_ap == {"ball": 1.0, "car": 1.0, "person": 1.0}
    assert (report.precision, report.recall) == (1.0, 1.0)
    assert (report.frames, report.truths, report.predictions) == (2, 3, 3)


def test_false_positive_lowers_precision() -> None:
    truths = [[gt(0, 0, 10, 10)], [gt(0, 0, 10, 10)]]
    preds = [[det(0, 0, 10, 10, 0.9), det(50, 50, 60, 60, 0.8)], [det(1, 0, 10, 10, 0.9)]]
    report = evaluate_detections(preds, truths)
    assert report.precision == pytest.approx(2 / 3)
    assert report.recall == 1.0
    assert report.map50 == 1.0  # the false positive ranks below every true positive


def test_confident_false_positive_lowers_ap() -> None:
    truths = [[gt(0, 0, 10, 10)], [gt(0, 0, 10, 10)]]
    preds = [[det(0, 0, 10, 10, 0.9)], [det(50, 50, 60, 60, 0.8), det(0, 0, 10, 10, 0.7)]]
    report = evaluate_detections(preds, truths)
    assert report.map50 == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_miss_lowers_recall() -> None:
    truths = [[gt(0, 0, 10, 10), gt(30, 30, 50, 50)]]
    preds = [[det(0, 0, 10, 10, 0.9)]]
    report = evaluate_detections(preds, truths)
    assert report.recall == 0.5
    assert report.precision == 1.0
    assert report.map50 == 0.5


def test_wrong_class_and_poor_overlap_do_not_match() -> None:
    truths = [[gt(0, 0, 10, 10)]]
    assert evaluate_detections([[det(0, 0, 10, 10, 0.9, "ball")]], truths).recall == 0.0
    assert evaluate_detections([[det(5, 5, 15, 15, 0.9)]], truths).recall == 0.0
    assert evaluate_detections([[det(0, 0, 10, 12, 0.9)]], truths).recall == 1.0


def test_duplicates_count_once() -> None:
    truths = [[gt(0, 0, 10, 10)]]
    report = evaluate_detections([[det(0, 0, 10, 10, 0.9), det(0, 0, 10, 11, 0.8)]], truths)
    assert report.recall == 1.0 and report.precision == 0.5


def test_score_threshold() -> None:
    truths = [[gt(0, 0, 10, 10), gt(30, 30, 50, 50)]]
    preds = [[det(0, 0, 10, 10, 0.9), det(30, 30, 50, 50, 0.2)]]
    report = evaluate_detections(preds, truths, score_threshold=0.35)
    assert report.recall == 0.5 and report.predictions == 1
    assert report.map50 == 1.0  # AP uses every prediction
    assert evaluate_detections(preds, truths, score_threshold=0.1).recall == 1.0


def test_iou_parameter() -> None:
    truths = [[gt(0, 0, 10, 10)]]
    preds = [[det(0, 0, 10, 14, 0.9)]]  # IoU 0.714
    assert evaluate_detections(preds, truths, iou=0.5).recall == 1.0
    assert evaluate_detections(preds, truths, iou=0.75).recall == 0.0


def test_empty_and_mismatched() -> None:
    report = evaluate_detections([[]], [[]])
    assert report.map50 == 0.0 and report.per_class_ap == {}
    assert (report.precision, report.recall) == (1.0, 1.0)
    with pytest.raises(ValueError):
        evaluate_detections([[]], [[], []])


def test_ap_matches_hand_computation() -> None:
    truths = [[gt(0, 0, 10, 10), gt(20, 0, 30, 10), gt(40, 0, 50, 10)]]
    preds = [
        [
            det(0, 0, 10, 10, 0.95),
            det(60, 0, 70, 10, 0.9),
            det(20, 0, 30, 10, 0.8),
            det(80, 0, 90, 10, 0.7),
        ]
    ]
    # precision/recall points: (1, 1/3), (1/2, 1/3), (2/3, 2/3), (1/2, 2/3); third truth missed
    report = evaluate_detections(preds, truths)
    assert math.isclose(report.map50, 1 / 3 * 1.0 + 1 / 3 * 2 / 3)


def test_held_out_split_is_disjoint() -> None:
    assert TRAIN_SEED_RANGE[1] <= HELD_OUT_SEED_BASE
    assert TRAIN_CAMERA_RANGE[1] <= HELD_OUT_CAMERA_BASE


def test_prepare_rgb_resizes() -> None:
    rgb = np.zeros((240, 320, 3), np.uint8)
    rgb[:, 160:] = 200
    out = prepare_rgb(rgb, (160, 120))
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    assert out[:, :79].max() == 0 and out[:, 81:].min() == 200


def test_held_out_frames_are_preprocessed() -> None:
    frames = held_out_frames(3, 0, (160, 120))
    assert all(f.pixels.shape == (120, 160, 3) and f.frame_size == (320, 240) for f in frames)


def test_shipped_weights_reach_target() -> None:
    report = evaluate_model(load_detector(), frames=150, seed=1)
    assert report.frames == 150 and report.truths > 200
    assert report.map50 >= 0.85, report
    assert report.precision >= 0.8 and report.recall >= 0.8, report


def test_the_evaluation_renders_the_frame_size_asked(capsys: pytest.CaptureFixture[str]) -> None:
    frames = held_out_frames(2, 0, (160, 120), frame_size=(1280, 720))
    assert all(f.pixels.shape == (120, 160, 3) and f.frame_size == (1280, 720) for f in frames)
    assert all(t.box[2] <= 1280 and t.box[3] <= 720 for f in frames for t in f.truths)
    assert main(["--frames", "4", "--frame-size", "640x360", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "640x360 frames" in out and "input (160, 120)" in out
    with pytest.raises(SystemExit):
        main(["--frame-size", "640"])
