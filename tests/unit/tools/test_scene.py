"""Tests of the synthetic scene generator."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg

from tools.scene import (
    CLASSES,
    FRAME_SIZE,
    GroundTruth,
    SceneFrame,
    _background,
    degrade,
    encode_jpeg,
    render_frame,
)


def _centre(box: tuple[float, float, float, float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_frame_shape_and_types() -> None:
    frame = render_frame(0, 0)
    assert isinstance(frame, SceneFrame)
    assert frame.rgb.shape == (FRAME_SIZE[1], FRAME_SIZE[0], 3)
    assert frame.rgb.dtype == np.uint8
    assert all(isinstance(obj, GroundTruth) for obj in frame.objects)


def test_render_is_deterministic() -> None:
    a = render_frame(3, 41, seed=7)
    b = render_frame(3, 41, seed=7)
    assert np.array_equal(a.rgb, b.rgb)
    assert a.objects == b.objects
    assert not np.array_equal(a.rgb, render_frame(3, 41, seed=8).rgb)
    assert not np.array_equal(a.rgb, render_frame(4, 41, seed=7).rgb)
    assert not np.array_equal(a.rgb, render_frame(3, 60, seed=7).rgb)


def test_returned_frame_is_independent_of_cache() -> None:
    a = render_frame(5, 1)
    a.rgb[:] = 0
    assert render_frame(5, 1).rgb.any()


def test_objects_valid() -> None:
    counts = []
    for camera in range(30):
        for seq in (0, 50, 400):
            frame = render_frame(camera, seq, seed=11)
            counts.append(len(frame.objects))
            assert len(frame.objects) <= 5
            for obj in frame.objects:
                assert obj.label in CLASSES
                x1, y1, x2, y2 = obj.box
                assert 0 <= x1 < x2 <= FRAME_SIZE[0]
                assert 0 <= y1 < y2 <= FRAME_SIZE[1]
                assert max(x2 - x1, y2 - y1) <= 100
    assert max(counts) >= 4
    assert np.mean(counts) >= 1.5
    labels = {obj.label for camera in range(30) for obj in render_frame(camera, 0, seed=11).objects}
    assert labels == set(CLASSES)


def test_object_sizes_span_range() -> None:
    sides = [
        max(o.box[2] - o.box[0], o.box[3] - o.box[1])
        for camera in range(60)
        for o in render_frame(camera, 9, seed=2).objects
    ]
    assert min(sides) < 24
    assert max(sides) > 60


def test_motion_is_smooth() -> None:
    moved = 0.0
    for camera in range(8):
        previous = render_frame(camera, 100, seed=3).objects
        for seq in range(101, 131):
            current = render_frame(camera, seq, seed=3).objects
            for obj in current:
                same = [p for p in previous if p.label == obj.label]
                if len(current) != len(previous) or not same:
                    continue
                cx, cy = _centre(obj.box)
                step = min(np.hypot(cx - _centre(p.box)[0], cy - _centre(p.box)[1]) for p in same)
                assert step <= 8.0, (camera, seq, obj)
                moved += step
            previous = current
    assert moved > 50.0


def test_boxes_match_drawn_pixels() -> None:
    inside = outside = 0
    for camera in range(12):
        for seq in (0, 77, 300):
            frame = render_frame(camera, seq, seed=5)
            background = _background(camera, 5, FRAME_SIZE[0], FRAME_SIZE[1])
            changed = np.any(frame.rgb != background, axis=2)
            covered = np.zeros_like(changed)
            for obj in frame.objects:
                x1, y1, x2, y2 = (int(v) for v in obj.box)
                assert tuple(float(v) for v in (x1, y1, x2, y2)) == obj.box
                region = changed[y1:y2, x1:x2]
                assert region[0].any() and region[-1].any(), obj
                assert region[:, 0].any() and region[:, -1].any(), obj
                assert region.mean() > 0.3, obj
                covered[y1:y2, x1:x2] = True
            inside += int((changed & covered).sum())
            outside += int((changed & ~covered).sum())
    assert outside <= 0.02 * inside


def test_other_frame_sizes_scale() -> None:
    for camera in range(6):
        small = render_frame(camera, 20, seed=4)
        large = render_frame(camera, 20, seed=4, width=640, height=480)
        assert large.rgb.shape == (480, 640, 3)
        assert [o.label for o in small.objects] == [o.label for o in large.objects]
        for a, b in zip(small.objects, large.objects, strict=True):
            assert np.allclose(np.array(a.box) * 2, b.box, atol=3.0)


def test_odd_size_works() -> None:
    frame = render_frame(1, 5, width=200, height=150)
    assert frame.rgb.shape == (150, 200, 3)
    for obj in frame.objects:
        assert obj.box[2] <= 200 and obj.box[3] <= 150


def test_too_small_frame_rejected() -> None:
    with pytest.raises(ValueError, match="too small"):
        render_frame(0, 0, width=8, height=8)


def test_jpeg_round_trip() -> None:
    rgb = render_frame(2, 3).rgb
    data = encode_jpeg(rgb, quality=95)
    assert data[:2] == b"\xff\xd8"
    decoded = simplejpeg.decode_jpeg(data, colorspace="RGB")
    assert decoded.shape == rgb.shape
    mse = np.mean((decoded.astype(np.float64) - rgb) ** 2)
    assert 10 * np.log10(255**2 / mse) > 28
    assert len(encode_jpeg(rgb, quality=40)) < len(data)


def test_degrade() -> None:
    rgb = render_frame(2, 3).rgb
    a = degrade(rgb, np.random.default_rng(1))
    b = degrade(rgb, np.random.default_rng(1))
    assert a.shape == rgb.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    outputs = [degrade(rgb, np.random.default_rng(seed)) for seed in range(6)]
    assert all(not np.array_equal(o, rgb) for o in outputs)
    diffs = [np.abs(o.astype(int) - rgb).mean() for o in outputs]
    assert max(diffs) < 60
    assert len({round(d, 3) for d in diffs}) > 1
