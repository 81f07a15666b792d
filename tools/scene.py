"""Synthetic camera scenes with exact ground truth, for the demo camera, training and tests.

Each camera has its own background (gradient, texture and static clutter) and 1-5 objects
("person", "car", "ball") moving on bouncing trajectories computed in closed form from the
frame sequence number, so a frame depends only on (camera, seq, seed) and consecutive
frames move smoothly. Objects are drawn with hard-edged masks and every ground-truth box
is the exact extent of the pixels its object painted, clipped to the frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import simplejpeg

CLASSES: tuple[str, ...] = ("person", "car", "ball")
FRAME_SIZE = (320, 240)

_REF_W, _REF_H = FRAME_SIZE
_MIN_VISIBLE_FRACTION = 0.3
_MIN_VISIBLE_PIXELS = 40.0  # at the reference size; scaled with the frame area


@dataclass(frozen=True, slots=True)
class GroundTruth:
    """One drawn object: box (x1, y1, x2, y2) in frame pixels and its class name."""

    box: tuple[float, float, float, float]
    label: str


@dataclass(frozen=True, slots=True)
class SceneFrame:
    """A rendered frame (`rgb`: uint8, H x W x 3) and the objects visible in it."""

    rgb: np.ndarray
    objects: tuple[GroundTruth, ...]


@dataclass(frozen=True, slots=True)
class _Actor:
    """The fixed description of one moving object of a camera."""

    label: str
    size: float  # reference pixels: person height, car width, ball diameter
    x0: float  # normalised start of the centre
    y0: float
    vx: float  # normalised displacement per frame
    vy: float
    wobble: float  # relative amplitude of the slow size change
    wobble_freq: float
    wobble_phase: float
    colours: tuple[tuple[int, int, int], ...]  # painting colours of the parts
    variant: int


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in keys] + [0x5C3E])


def _bounce(start: float, velocity: float, t: int, low: float, high: float) -> float:
    """Position at time t of a point moving at `velocity`, reflecting between low and high."""
    span = high - low
    phase = (start - low + velocity * t) % (2.0 * span)
    return low + (phase if phase <= span else 2.0 * span - phase)


Colour = tuple[int, int, int]


def _colour(values: np.ndarray | Sequence[int]) -> Colour:
    """Three channel values (any integers) as an RGB tuple clipped to 0-255."""
    r, g, b = (min(255, max(0, int(v))) for v in values)
    return (r, g, b)


def _vivid(rng: np.random.Generator, low: int = 40) -> Colour:
    """A saturated colour: one channel high, one low, one anywhere."""
    channels = rng.permutation(3)
    colour = [0, 0, 0]
    colour[channels[0]] = int(rng.integers(170, 256))
    colour[channels[1]] = int(rng.integers(0, low + 1))
    colour[channels[2]] = int(rng.integers(0, 256))
    return (colour[0], colour[1], colour[2])


def _actor(rng: np.random.Generator) -> _Actor:
    label = CLASSES[int(rng.choice(3, p=[0.38, 0.34, 0.28]))]
    if label == "person":
        size = float(rng.uniform(30, 80))
        speed = rng.uniform(0.002, 0.008)
        angle = rng.normal(0.0, 0.35) + (math.pi if rng.random() < 0.5 else 0.0)
        skin = (int(rng.integers(120, 250)), int(rng.integers(80, 200)), int(rng.integers(60, 170)))
        shirt = _vivid(rng)
        trousers = _colour(rng.integers(10, 90, size=3))
        colours: tuple[Colour, ...] = (skin, shirt, trousers)
    elif label == "car":
        size = float(rng.uniform(34, 80))
        speed = rng.uniform(0.003, 0.011)
        angle = rng.normal(0.0, 0.15) + (math.pi if rng.random() < 0.5 else 0.0)
        if rng.random() < 0.25:
            grey = int(rng.integers(170, 235))
            body = (grey, grey, min(255, grey + int(rng.integers(0, 20))))
        else:
            body = _vivid(rng)
        window = (int(rng.integers(120, 190)), int(rng.integers(170, 220)), 235)
        colours = (body, window, (20, 20, 24), (180, 180, 185))
    else:
        size = float(rng.uniform(16, 40))
        speed = rng.uniform(0.004, 0.014)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        palette = ((250, 220, 30), (255, 140, 20), (245, 245, 245), (90, 220, 60), (240, 60, 160))
        main = palette[int(rng.integers(len(palette)))]
        jitter = rng.integers(-20, 21, size=3)
        main = _colour(np.add(main, jitter))
        colours = (main, _colour(np.add(main, 60)), _colour(np.subtract(main, 110)))
    return _Actor(
        label=label,
        size=size,
        x0=float(rng.uniform(0.0, 1.0)),
        y0=float(rng.uniform(0.15, 0.95)),
        vx=float(speed * math.cos(angle)),
        vy=float(speed * math.sin(angle) * 1.33),
        wobble=float(rng.uniform(0.0, 0.2)),
        wobble_freq=float(rng.uniform(0.005, 0.03)),
        wobble_phase=float(rng.uniform(0.0, 2.0 * math.pi)),
        colours=colours,
        variant=int(rng.integers(0, 4)),
    )


@lru_cache(maxsize=256)
def _actors(camera: int, seed: int) -> tuple[_Actor, ...]:
    """The 1-5 objects of one camera (fixed for the camera's lifetime)."""
    rng = _rng(seed, camera, 1)
    count = int(rng.integers(1, 6))
    return tuple(_actor(rng) for _ in range(count))


@lru_cache(maxsize=64)
def _background(camera: int, seed: int, width: int, height: int) -> np.ndarray:
    """The static background of a camera at one frame size: uint8 H x W x 3 (read-only)."""
    rng = _rng(seed, camera, 2)
    ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
    xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
    top = rng.uniform(60, 220, size=3).astype(np.float32)
    bottom = rng.uniform(30, 180, size=3).astype(np.float32)
    horizon = rng.uniform(0.25, 0.6)
    ground = 1.0 / (1.0 + np.exp(-(ys - horizon) * rng.uniform(8, 60)))
    gradient = top * (1.0 - ground[..., None]) + bottom * ground[..., None]  # H x 1 x 3
    light = np.zeros((height, width), dtype=np.float32)
    for _ in range(3):
        fx, fy = rng.uniform(0.5, 6.0, size=2)
        phase = rng.uniform(0, 2 * math.pi)
        amplitude = rng.uniform(3, 12)
        ax, ay = 2 * math.pi * fx * xs, 2 * math.pi * fy * ys + phase
        light += (np.sin(ay) * amplitude) * np.cos(ax) + (np.cos(ay) * amplitude) * np.sin(ax)
    cells_h, cells_w = -(-height // 8), -(-width // 8)
    grain = rng.normal(0.0, rng.uniform(2, 9), size=(cells_h, cells_w)).astype(np.float32)
    light += np.repeat(np.repeat(grain, 8, axis=0), 8, axis=1)[:height, :width]
    image = gradient + light[..., None]
    scale = min(width / _REF_W, height / _REF_H)
    for _ in range(int(rng.integers(3, 10))):
        w = rng.uniform(10, 90) * scale
        h = rng.uniform(10, 70) * scale
        x = rng.uniform(-0.1, 1.0) * width
        y = rng.uniform(0.0, 1.0) * height - h
        colour = rng.uniform(40, 200, size=3).astype(np.float32)
        grey = colour.mean()
        colour = grey + (colour - grey) * 0.35
        x1, y1 = max(0, int(x)), max(0, int(y))
        x2, y2 = min(width, int(x + w)), min(height, int(y + h))
        if x2 > x1 and y2 > y1:
            image[y1:y2, x1:x2] = image[y1:y2, x1:x2] * 0.3 + colour * 0.7
    for _ in range(int(rng.integers(1, 5))):
        thickness = max(1, int(rng.uniform(1, 4) * scale))
        colour = rng.uniform(50, 210, size=3).astype(np.float32)
        if rng.random() < 0.5:
            x = int(rng.uniform(0, width))
            image[:, x : x + thickness] = colour
        else:
            y = int(rng.uniform(0, height))
            image[y : y + thickness, :] = colour
    out = np.clip(image, 0, 255).astype(np.uint8)
    out.flags.writeable = False
    return out


def _shape(actor: _Actor, u: np.ndarray, v: np.ndarray, bw: float, bh: float) -> list:
    """The parts of an actor as (mask, colour) pairs, in painting order.

    `u` (1 x W) and `v` (H x 1) are the pixel centres in box-normalised coordinates.
    """
    c = actor.colours
    if actor.label == "person":
        head_r = 0.12 * bh
        head = ((u - 0.5) * bw) ** 2 + ((v - 0.12) * bh) ** 2 <= head_r**2
        torso = (u >= 0.12) & (u <= 0.88) & (v >= 0.22) & (v <= 0.62)
        arms = ((u <= 0.1) | (u >= 0.9)) & (v >= 0.25) & (v <= 0.56)
        legs = (((u >= 0.16) & (u <= 0.45)) | ((u >= 0.55) & (u <= 0.84))) & (v >= 0.6)
        return [(legs, c[2]), (torso | arms, c[1]), (head, c[0])]
    if actor.label == "car":
        body = (v >= 0.36) & (v <= 0.82)
        slope = 0.14 * (1.0 - v / 0.4)
        cabin = (v >= 0.0) & (v < 0.4) & (u >= 0.2 + slope) & (u <= 0.78 - slope)
        window = ((v >= 0.08) & (v <= 0.36) & (u >= 0.26 + slope) & (u <= 0.72 - slope)) & ~(
            (u >= 0.47) & (u <= 0.51)
        )
        wheel_r = 0.2 * bh
        dy = (v - 0.8) * bh
        d1 = ((u - 0.22) * bw) ** 2 + dy**2
        d2 = ((u - 0.78) * bw) ** 2 + dy**2
        wheels = (d1 <= wheel_r**2) | (d2 <= wheel_r**2)
        hubs = (d1 <= (0.4 * wheel_r) ** 2) | (d2 <= (0.4 * wheel_r) ** 2)
        body = body & (u >= 0.0) & (u <= 1.0)
        return [(body | cabin, c[0]), (window, c[1]), (wheels, c[2]), (hubs, c[3])]
    r = 0.5 * bw
    du, dv = (u - 0.5) * bw, (v - 0.5) * bh
    ball = du**2 + dv**2 <= r**2
    parts = [(ball, c[0])]
    if actor.variant % 2 == 0:
        parts.append((ball & (np.abs(dv + 0.25 * du) <= 0.09 * bw), c[2]))
    parts.append((((du + 0.3 * r) ** 2 + (dv + 0.3 * r) ** 2 <= (0.3 * r) ** 2) & ball, c[1]))
    return parts


def _extent(actor: _Actor, seq: int, width: int, height: int) -> tuple[float, float, float, float]:
    """The actor's unclipped drawing box (x, y, w, h) in frame pixels at `seq`."""
    scale = min(width / _REF_W, height / _REF_H)
    size = (
        actor.size
        * scale
        * (1.0 + actor.wobble * math.sin(actor.wobble_freq * seq + actor.wobble_phase))
    )
    if actor.label == "person":
        bw, bh = 0.4 * size, size
    elif actor.label == "car":
        bw, bh = size, 0.5 * size
    else:
        bw, bh = size, size
    cx = _bounce(actor.x0, actor.vx, seq, -0.04, 1.04) * width
    cy = _bounce(actor.y0, actor.vy, seq, 0.12, 1.02) * height
    return cx - bw / 2.0, cy - bh / 2.0, bw, bh


def render_frame(
    camera: int, seq: int, *, width: int = FRAME_SIZE[0], height: int = FRAME_SIZE[1], seed: int = 0
) -> SceneFrame:
    """Render frame `seq` of synthetic camera `camera` (deterministic in camera, seq, seed).

    Returns the RGB image (uint8, height x width x 3) and the ground truth of every object
    with a usefully visible area, boxes clipped to the frame.
    """
    if width < 16 or height < 16:
        raise ValueError(f"frame size {width}x{height} is too small (minimum 16x16)")
    image = _background(camera, seed, width, height).copy()
    owner = np.full((height, width), -1, dtype=np.int8)
    actors = _actors(camera, seed)
    placed = [(actor, _extent(actor, seq, width, height)) for actor in actors]
    placed.sort(key=lambda item: item[1][1] + item[1][3])  # farther (higher) objects first
    drawn: list[tuple[str, int, int, tuple[int, int, int, int]]] = []
    for index, (actor, (x, y, bw, bh)) in enumerate(placed):
        fx1, fy1 = math.floor(x), math.floor(y)
        fx2, fy2 = math.ceil(x + bw), math.ceil(y + bh)
        u = ((np.arange(fx1, fx2, dtype=np.float32) + 0.5 - x) / bw)[None, :]
        v = ((np.arange(fy1, fy2, dtype=np.float32) + 0.5 - y) / bh)[:, None]
        parts = _shape(actor, u, v, bw, bh)
        full = np.zeros((fy2 - fy1, fx2 - fx1), dtype=bool)
        for mask, _ in parts:
            full |= mask
        total = int(full.sum())
        cx1, cy1 = max(fx1, 0), max(fy1, 0)
        cx2, cy2 = min(fx2, width), min(fy2, height)
        if total == 0 or cx2 <= cx1 or cy2 <= cy1:
            continue
        sub = (slice(cy1 - fy1, cy2 - fy1), slice(cx1 - fx1, cx2 - fx1))
        region = image[cy1:cy2, cx1:cx2]
        for mask, colour in parts:
            m = np.broadcast_to(mask, full.shape)[sub]
            region[m] = colour
        clipped = full[sub]
        owner[cy1:cy2, cx1:cx2][clipped] = index
        rows = np.flatnonzero(clipped.any(axis=1))
        cols = np.flatnonzero(clipped.any(axis=0))
        if rows.size == 0:
            continue
        box = (
            cx1 + int(cols[0]),
            cy1 + int(rows[0]),
            cx1 + int(cols[-1]) + 1,
            cy1 + int(rows[-1]) + 1,
        )
        drawn.append((actor.label, index, total, box))
    min_pixels = _MIN_VISIBLE_PIXELS * (width * height) / (_REF_W * _REF_H)
    objects = []
    for label, index, total, (x1, y1, x2, y2) in drawn:
        visible = int(np.count_nonzero(owner[y1:y2, x1:x2] == index))
        if visible >= min_pixels and visible >= _MIN_VISIBLE_FRACTION * total:
            objects.append(GroundTruth((float(x1), float(y1), float(x2), float(y2)), label))
    return SceneFrame(rgb=image, objects=tuple(objects))


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """Encode an RGB uint8 H x W x 3 image as JPEG bytes (4:2:0, like most cameras)."""
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(rgb), quality=int(quality), colorspace="RGB", colorsubsampling="420"
    )


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable 5-tap Gaussian blur of a float32 H x W x C image (edges replicated)."""
    taps = np.exp(-0.5 * (np.arange(-2, 3, dtype=np.float32) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, ((2, 2), (0, 0), (0, 0)), mode="edge")
    rows = sum(taps[i] * padded[i : i + image.shape[0]] for i in range(5))
    padded = np.pad(rows, ((0, 0), (2, 2), (0, 0)), mode="edge")
    return sum(taps[i] * padded[:, i : i + image.shape[1]] for i in range(5))


def degrade(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return a randomly degraded copy of an RGB uint8 image (training augmentation).

    Applies lighting and colour-cast changes, sometimes a Gaussian blur, and sensor noise;
    the result has the same shape and dtype.
    """
    image = rgb.astype(np.float32)
    gain = rng.uniform(0.7, 1.25) * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    image = image * gain + np.float32(rng.uniform(-25, 25))
    if rng.random() < 0.5:
        image = _blur(image, float(rng.uniform(0.5, 1.4)))
    sigma = rng.uniform(0.0, 10.0)
    if sigma > 0.5:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(image, 0, 255).astype(np.uint8)
