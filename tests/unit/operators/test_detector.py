"""Tests of the built-in detector, its model contract, loading and export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from operators.detector import (
    DEFAULT_MAX_DETECTIONS,
    METADATA_FILE,
    LoadedDetector,
    TinyDet,
    builtin_weights_path,
    export_program,
    export_torchscript,
    load_detector,
    save_weights,
)
from tools.evaluate import held_out_frames, to_tensor
from tools.evaluation import iou
from tools.scene import CLASSES
from tools.train import build_targets

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def detector() -> LoadedDetector:
    return load_detector()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return to_tensor([f.pixels for f in held_out_frames(6, 3, (160, 120))])


def _confident(rows: torch.Tensor, threshold: float = 0.5) -> list[tuple[list[float], int]]:
    return [(r[:4], round(r[5])) for r in rows.float().tolist() if r[4] >= threshold]


def _same_detections(a: torch.Tensor, b: torch.Tensor, min_iou: float = 0.9) -> None:
    """Every confident detection of `a` has a same-class twin in `b` (per frame)."""
    for rows_a, rows_b in zip(a, b, strict=True):
        found_b = _confident(rows_b, 0.3)
        for box, label in _confident(rows_a):
            assert any(lb == label and iou(box, bb) >= min_iou for bb, lb in found_b), box


def test_builtin_weights(detector: LoadedDetector) -> None:
    path = builtin_weights_path()
    assert path.is_file()
    assert path.stat().st_size < 2_000_000
    assert detector.classes == CLASSES
    assert detector.input_size == (160, 120)
    assert detector.name == "streamsight-tinydet"
    assert detector.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert not detector.module.training


def test_output_contract(detector: LoadedDetector, frames: torch.Tensor) -> None:
    with torch.inference_mode():
        out = detector.module(frames)
    assert out.shape == (frames.shape[0], DEFAULT_MAX_DETECTIONS, 6)
    assert out.dtype == torch.float32
    scores = out[..., 4]
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert torch.all((scores >= 0) & (scores <= 1))
    assert torch.all(out[..., 0] <= out[..., 2]) and torch.all(out[..., 1] <= out[..., 3])
    assert torch.all(out[..., [0, 2]] >= 0) and torch.all(out[..., [0, 2]] <= 160)
    assert torch.all(out[..., [1, 3]] >= 0) and torch.all(out[..., [1, 3]] <= 120)
    labels = out[..., 5]
    assert torch.all(labels == labels.round()) and torch.all((labels >= 0) & (labels < 3))
    assert torch.all(out[scores == 0] == 0)
    assert (scores[:, 0] > 0.5).all()


def test_detects_rendered_objects(detector: LoadedDetector) -> None:
    data = held_out_frames(8, 5, detector.input_size)
    with torch.inference_mode():
        out = detector.module(to_tensor([f.pixels for f in data]))
    found = total = 0
    for frame, rows in zip(data, out, strict=True):
        sx, sy = frame.frame_size[0] / 160, frame.frame_size[1] / 120
        boxes = [([b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], c) for b, c in _confident(rows)]
        for truth in frame.truths:
            total += 1
            label = CLASSES.index(truth.label)
            found += any(c == label and iou(b, truth.box) >= 0.5 for b, c in boxes)
    assert total > 0 and found >= 0.8 * total


def test_channels_last_matches(detector: LoadedDetector, frames: torch.Tensor) -> None:
    with torch.inference_mode():
        plain = detector.module(frames)
        channels_last = detector.module(frames.contiguous(memory_format=torch.channels_last))
    _same_detections(plain, channels_last, 0.98)


def test_reduced_precision(frames: torch.Tensor) -> None:
    reference = load_detector()
    with torch.inference_mode():
        expected = reference.module(frames)
    dtype = torch.float16
    try:
        with torch.inference_mode():
            load_detector().module.half()(frames[:1].half())
    except RuntimeError:
        dtype = torch.bfloat16
    module = load_detector().module.to(dtype)
    with torch.inference_mode():
        out = module(frames.to(dtype))
    assert out.dtype == dtype and out.shape == expected.shape
    _same_detections(expected, out, 0.8)


def test_flops_budget(detector: LoadedDetector) -> None:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        detector.module(torch.zeros(1, 3, 120, 160))
    assert counter.get_total_flops() <= 0.15e9


def test_targets_decode_back_to_boxes() -> None:
    boxes = np.array([[10.0, 20.0, 50.0, 44.0], [100.0, 30.0, 112.5, 90.0]], np.float32)
    labels = np.array([1, 0])
    heat, index, offsets, sizes = build_targets([(boxes, labels)], 3, 30, 40)
    assert heat.shape == (1, 3, 30, 40) and (heat == 1.0).sum() == 2
    maps = torch.full((1, 7, 30, 40), -12.0)
    maps[:, :3] = torch.logit(torch.from_numpy(heat).clamp(1e-4, 1 - 1e-4)) - 3.0
    flat = maps.permute(0, 2, 3, 1).reshape(-1, 7)
    for i, cell in enumerate(index):
        lab = int(labels[i])
        flat[cell, lab] = 8.0
        flat[cell, 3:5] = torch.logit(torch.from_numpy(offsets[i]).clamp(1e-6, 1 - 1e-6))
        flat[cell, 5:7] = torch.from_numpy(sizes[i])
    maps = flat.reshape(1, 30, 40, 7).permute(0, 3, 1, 2)
    model = TinyDet(3).eval()
    model.raw = lambda images: maps  # type: ignore[method-assign]
    out = model(torch.zeros(1, 3, 120, 160))[0]
    top = out[:2]
    assert sorted(top[:, 5].tolist()) == [0.0, 1.0]
    for row in top:
        expected = boxes[list(labels).index(int(row[5]))]
        assert np.allclose(row[:4].numpy(), expected, atol=1e-3)
    assert torch.all(out[2:, 4] < 0.3)


def test_torchscript_round_trip(
    detector: LoadedDetector, frames: torch.Tensor, tmp_path: Path
) -> None:
    path = export_torchscript(detector, tmp_path / "model.ts")
    loaded = load_detector(path)
    assert loaded.classes == detector.classes
    assert loaded.input_size == detector.input_size
    assert loaded.name == detector.name and loaded.version == detector.version
    with torch.inference_mode():
        assert torch.allclose(loaded.module(frames), detector.module(frames), atol=1e-4)
    overridden = load_detector(path, input_size=(320, 240), classes=("a", "b", "c"))
    assert overridden.input_size == (320, 240) and overridden.classes == ("a", "b", "c")


def test_program_round_trip(detector: LoadedDetector, frames: torch.Tensor, tmp_path: Path) -> None:
    path = export_program(detector, tmp_path / "model.pt2")
    loaded = load_detector(path)
    assert loaded.classes == detector.classes
    assert loaded.input_size == detector.input_size
    assert loaded.version == detector.version
    with torch.inference_mode():
        for batch in (frames, frames[:1], frames[:5]):
            assert torch.allclose(loaded.module(batch), detector.module(batch), atol=1e-4)


def test_missing_metadata_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.script(TinyDet(2).eval()), str(path))
    with pytest.raises(ValueError) as info:
        load_detector(path)
    message = str(info.value)
    assert str(path) in message
    assert "STREAMSIGHT_MODEL_INPUT_SIZE" in message and "STREAMSIGHT_MODEL_CLASSES" in message
    with pytest.raises(ValueError, match="STREAMSIGHT_MODEL_CLASSES"):
        load_detector(path, input_size=(64, 48))
    loaded = load_detector(path, input_size=(64, 48), classes=("x", "y"))
    assert loaded.input_size == (64, 48) and loaded.classes == ("x", "y")
    assert loaded.name == "bare"
    assert loaded.module(torch.rand(1, 3, 48, 64)).shape == (1, DEFAULT_MAX_DETECTIONS, 6)


def test_partial_metadata(tmp_path: Path) -> None:
    path = tmp_path / "partial.pt"
    meta = json.dumps({"classes": ["x", "y"], "name": "mine", "version": "7"})
    torch.jit.save(
        torch.jit.script(TinyDet(2).eval()), str(path), _extra_files={METADATA_FILE: meta}
    )
    with pytest.raises(ValueError, match="STREAMSIGHT_MODEL_INPUT_SIZE"):
        load_detector(path)
    loaded = load_detector(path, input_size=(96, 64))
    assert (loaded.name, loaded.version, loaded.classes) == ("mine", "7", ("x", "y"))


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match=r"nope\.pt.*does not exist"):
        load_detector(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"garbage\.pt"):
        load_detector(garbage)
    bad_program = tmp_path / "garbage.pt2"
    bad_program.write_bytes(b"not a program")
    with pytest.raises(ValueError, match=r"garbage\.pt2"):
        load_detector(bad_program)


def test_trained_weights_file_loads_by_path(tmp_path: Path) -> None:
    model = TinyDet(2)
    path = save_weights(model, {"classes": ["x", "y"], "input_size": [128, 96]}, tmp_path / "w.pt")
    loaded = load_detector(path)
    assert loaded.classes == ("x", "y") and loaded.input_size == (128, 96)
    assert loaded.module(torch.rand(2, 3, 96, 128)).shape == (2, DEFAULT_MAX_DETECTIONS, 6)
