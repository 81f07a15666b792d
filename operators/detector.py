"""The object detector: the built-in tiny CenterNet-style model, loading and export.

Model contract (every detector the pipeline runs obeys it, built-in or plugged in):

- input: a float tensor ``[B, 3, H, W]``, RGB scaled to ``[0, 1]``, at the model's input
  size ``(W, H)`` (the frame is decoded, resized to ``W x H`` with bilinear filtering and
  divided by 255); float32, float16 or bfloat16, contiguous or channels_last;
- output: a float tensor ``[B, K, 6]`` (any float dtype; the built-in model answers in the
  input's dtype), one row per detection ``(x1, y1, x2, y2, score, class_index)``, boxes in
  INPUT pixel coordinates, rows sorted by score descending; ``K`` is fixed per model and
  rows past the last detection have score 0;
- all post-processing (peak picking, top-K) happens inside ``forward``, so the module can be
  scripted, exported and run as one graph.

Plugged-in models are TorchScript files (``torch.jit.save``) or ``torch.export`` programs
(``.pt2``) that carry their metadata in an extra file named ``streamsight.json``::

    {"name": "my-detector", "version": "2024-06-01", "classes": ["person", "car"],
     "input_size": [640, 480]}

Missing ``classes`` or ``input_size`` must then be given by the settings
``STREAMSIGHT_MODEL_CLASSES`` and ``STREAMSIGHT_MODEL_INPUT_SIZE``, which also override the
metadata. The built-in weights (``operators/weights/tinydet.pt``) are a ``torch.save`` dict
of a state_dict and metadata, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

METADATA_FILE = "streamsight.json"
ARCHITECTURE = "tinydet-centernet-v1"
DEFAULT_NAME = "streamsight-tinydet"
DEFAULT_INPUT_SIZE = (160, 120)
DEFAULT_MAX_DETECTIONS = 32
DEFAULT_WIDTHS = (16, 32, 64, 96)
STRIDE = 4


class ConvBN(nn.Module):
    """3x3 (or 1x1) convolution, batch norm and ReLU; `fuse` folds the norm into the conv."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, c_in, H, W] -> [B, c_out, H / stride, W / stride]."""
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the batch norm (eval statistics) into the convolution's weight and bias."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = nn.Conv2d(
            self.conv.in_channels,
            self.conv.out_channels,
            self.conv.kernel_size,
            self.conv.stride,
            self.conv.padding,
            bias=True,
        )
        conv.weight.copy_(self.conv.weight * scale[:, None, None, None])
        conv.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv = conv
        self.bn = nn.Identity()


class TinyDet(nn.Module):
    """A small anchor-free detector with a stride-4 CenterNet head and built-in decoding.

    Backbone: four stride-2 stages (widths `widths`, down to stride 32 for the last) with
    one extra 3x3 conv each; a top-down path merges strides 16 -> 8 -> 4. The head predicts
    per-class centre heatmaps plus (offset x, offset y, log width, log height) per cell.
    `forward` returns the decoded `[B, K, 6]` detections of the model contract;
    `raw` returns the head maps for training.
    """

    def __init__(
        self,
        num_classes: int,
        max_detections: int = DEFAULT_MAX_DETECTIONS,
        widths: Sequence[int] = DEFAULT_WIDTHS,
    ) -> None:
        super().__init__()
        w1, w2, w3, w4 = (int(w) for w in widths)
        self.num_classes = int(num_classes)
        self.max_detections = int(max_detections)
        self.stride = STRIDE
        self.stem = ConvBN(3, w1, stride=2)
        self.stage4 = nn.Sequential(ConvBN(w1, w2, stride=2), ConvBN(w2, w2))
        self.stage8 = nn.Sequential(ConvBN(w2, w3, stride=2), ConvBN(w3, w3))
        self.stage16 = nn.Sequential(ConvBN(w3, w4, stride=2), ConvBN(w4, w4))
        self.lateral16 = ConvBN(w4, w3, kernel=1)
        self.merge8 = ConvBN(w3, w3)
        self.lateral8 = ConvBN(w3, w2, kernel=1)
        self.merge4 = ConvBN(w2, w2)
        self.head = nn.Conv2d(w2, self.num_classes + 4, 1)
        nn.init.constant_(self.head.bias, 0.0)
        with torch.no_grad():
            self.head.bias[: self.num_classes].fill_(-math.log((1 - 0.01) / 0.01))

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> head maps [B, C + 4, ceil(H / 4), ceil(W / 4)] (logits)."""
        x = images * 2.0 - 1.0
        f4 = self.stage4(self.stem(x))
        f8 = self.stage8(f4)
        f16 = self.stage16(f8)
        up = F.interpolate(self.lateral16(f16), size=f8.shape[-2:], mode="nearest")
        m8 = self.merge8(f8 + up)
        up = F.interpolate(self.lateral8(m8), size=f4.shape[-2:], mode="nearest")
        m4 = self.merge4(f4 + up)
        return self.head(m4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] RGB in [0, 1] -> [B, K, 6] (x1, y1, x2, y2, score, class) by score."""
        maps = self.raw(images)
        batch, _, rows, cols = maps.shape
        cells = rows * cols
        heat = torch.sigmoid(maps[:, : self.num_classes])
        peaks = F.max_pool2d(heat, kernel_size=3, stride=1, padding=1)
        heat = torch.where(peaks == heat, heat, torch.zeros_like(heat))
        k = min(self.max_detections, self.num_classes * cells)
        scores, index = torch.topk(heat.reshape(batch, -1), k, dim=1)
        label = torch.div(index, cells, rounding_mode="floor")
        cell = index - label * cells
        y = torch.div(cell, cols, rounding_mode="floor")
        x = cell - y * cols
        reg = maps[:, self.num_classes :].reshape(batch, 4, cells)
        reg = torch.gather(reg, 2, cell.unsqueeze(1).expand(batch, 4, k))
        offset = torch.sigmoid(reg[:, :2])
        size = torch.exp(torch.clamp(reg[:, 2:], min=-4.0, max=6.0)) * self.stride
        cx = (offset[:, 0] + x) * self.stride  # int + float keeps the float dtype
        cy = (offset[:, 1] + y) * self.stride
        width = float(images.shape[-1])
        height = float(images.shape[-2])
        x1 = torch.clamp(cx - size[:, 0] / 2, min=0.0, max=width)
        y1 = torch.clamp(cy - size[:, 1] / 2, min=0.0, max=height)
        x2 = torch.clamp(cx + size[:, 0] / 2, min=0.0, max=width)
        y2 = torch.clamp(cy + size[:, 1] / 2, min=0.0, max=height)
        label_value = torch.zeros_like(scores) + label
        out = torch.stack([x1, y1, x2, y2, scores, label_value], dim=2)
        out = torch.where((scores > 0).unsqueeze(2), out, torch.zeros_like(out))
        if out.shape[1] < self.max_detections:
            out = F.pad(out, (0, 0, 0, self.max_detections - out.shape[1]))
        return out

    def fuse(self) -> TinyDet:
        """Fold every batch norm into its convolution (for inference); returns self."""
        for module in self.modules():
            if isinstance(module, ConvBN):
                module.fuse()
        return self


class ProgramModule(nn.Module):
    """Wraps the module of a loaded `torch.export` program so it behaves like any other.

    Exported graphs are inference-only and refuse `train()`/`eval()`; here both are no-ops,
    while `.to(device / dtype / memory_format)` still reaches the graph's weights.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, K, 6], as the wrapped program computes it."""
        return self.program(images)

    def train(self, mode: bool = True) -> ProgramModule:
        """No-op: the exported graph has no training mode."""
        return self


@dataclass(frozen=True)
class LoadedDetector:
    """A detector ready to run: the module (eval mode, CPU) and what the pipeline needs."""

    module: torch.nn.Module
    name: str
    version: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]


def builtin_weights_path() -> Path:
    """The path of the shipped weights file `operators/weights/tinydet.pt`."""
    try:
        return Path(str(resources.files("operators").joinpath("weights", "tinydet.pt")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent / "weights" / "tinydet.pt"


def file_version(path: str | Path) -> str:
    """The first 12 hex digits of a file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def build_model(meta: dict[str, Any]) -> TinyDet:
    """A fresh (untrained) TinyDet for the metadata of a weights file."""
    return TinyDet(
        num_classes=len(meta["classes"]),
        max_detections=int(meta.get("max_detections", DEFAULT_MAX_DETECTIONS)),
        widths=tuple(meta.get("widths", DEFAULT_WIDTHS)),
    )


def save_weights(model: TinyDet, meta: dict[str, Any], path: str | Path) -> Path:
    """Write a TinyDet's (unfused) state_dict and metadata with `torch.save`; returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    full_meta = {
        "architecture": ARCHITECTURE,
        "name": DEFAULT_NAME,
        "max_detections": model.max_detections,
        "widths": list(DEFAULT_WIDTHS),
        "input_size": list(DEFAULT_INPUT_SIZE),
        **meta,
    }
    torch.save({"state_dict": state, "meta": full_meta}, path)
    return path


def _override(
    path: Path,
    meta: dict[str, Any],
    input_size: tuple[int, int] | None,
    classes: tuple[str, ...] | None,
) -> tuple[tuple[int, int], tuple[str, ...]]:
    """Resolve input size and classes: explicit arguments win over the metadata."""
    size: Any = input_size if input_size is not None else meta.get("input_size")
    names: Any = classes if classes is not None else meta.get("classes")
    missing = []
    if size is None:
        missing.append("its input size: set STREAMSIGHT_MODEL_INPUT_SIZE (WxH, e.g. 640x480)")
    if names is None:
        missing.append("its classes: set STREAMSIGHT_MODEL_CLASSES (e.g. person,car)")
    if missing:
        raise ValueError(
            f"model {path} does not say {' and '.join(missing)}, or ship a "
            f"{METADATA_FILE} extra file with 'input_size' and 'classes'"
        )
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model {path}: input size must be (width, height), got {size!r}") from exc
    if width <= 0 or height <= 0:
        raise ValueError(f"model {path}: input size must be positive, got {size!r}")
    if isinstance(names, str):
        names = tuple(n.strip() for n in names.split(",") if n.strip())
    names = tuple(str(n) for n in names)
    if not names:
        raise ValueError(f"model {path}: the class list is empty")
    return (width, height), names


def _load_builtin_format(path: Path) -> tuple[TinyDet, dict[str, Any]]:
    """Load a `torch.save` dict of {state_dict, meta} (weights_only) into a fused TinyDet."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read detector weights {path}: {exc}") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "meta" not in payload:
        raise ValueError(f"{path} is not a streamsight weights file (no state_dict/meta)")
    meta = dict(payload["meta"])
    if meta.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise ValueError(f"{path}: unknown architecture {meta.get('architecture')!r}")
    model = build_model(meta)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"weights {path} do not fit the {ARCHITECTURE} model: {exc}") from exc
    return model.eval().fuse(), meta


def _is_torchscript(path: Path) -> bool:
    """Whether a file is a TorchScript archive (a zip with a code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def _parse_metadata(path: Path, text: str | bytes) -> dict[str, Any]:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"model {path}: {METADATA_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"model {path}: {METADATA_FILE} must hold a JSON object")
    return meta


def load_detector(
    path: str | Path | None = None,
    *,
    input_size: tuple[int, int] | None = None,
    classes: tuple[str, ...] | None = None,
) -> LoadedDetector:
    """Load a detector: the built-in weights (`path` None), a `.pt2` program, or TorchScript.

    A file written by `tools.train` (state_dict + metadata) is also accepted. `input_size`
    (width, height) and `classes` override the model's metadata. Raises ValueError naming the
    path when the file is missing or unreadable, or the setting to provide when metadata
    lacks the input size or classes.
    """
    source = builtin_weights_path() if path is None else Path(path)
    if not source.is_file():
        raise ValueError(f"model file {source} does not exist")
    version = file_version(source)
    module: nn.Module
    if source.suffix == ".pt2":
        extra = {METADATA_FILE: ""}
        try:
            program = torch.export.load(str(source), extra_files=extra)
            module = ProgramModule(program.module())
        except Exception as exc:
            raise ValueError(f"cannot load torch.export program {source}: {exc}") from exc
        meta = _parse_metadata(source, extra[METADATA_FILE])
    elif path is None or not _is_torchscript(source):
        try:
            module, meta = _load_builtin_format(source)
        except ValueError as exc:
            if path is None:
                raise
            raise ValueError(
                f"cannot load model {source}: neither TorchScript nor streamsight weights ({exc})"
            ) from exc
        meta.setdefault("version", version)
    else:
        extra = {METADATA_FILE: ""}
        try:
            module = torch.jit.load(str(source), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise ValueError(f"cannot load TorchScript model {source}: {exc}") from exc
        meta = _parse_metadata(source, extra[METADATA_FILE])
    size, names = _override(source, meta, input_size, classes)
    if isinstance(module, TinyDet) and len(names) != module.num_classes:
        raise ValueError(
            f"model {source} has {module.num_classes} classes, but {len(names)} were given"
        )
    if hasattr(module, "eval"):
        module.eval()
    return LoadedDetector(
        module=module,
        name=str(meta.get("name") or source.stem),
        version=str(meta.get("version") or version),
        classes=names,
        input_size=size,
    )


def metadata_json(detector: LoadedDetector) -> str:
    """The `streamsight.json` text describing a loaded detector."""
    return json.dumps(
        {
            "name": detector.name,
            "version": detector.version,
            "classes": list(detector.classes),
            "input_size": list(detector.input_size),
        }
    )


def example_input(detector: LoadedDetector, batch: int = 2) -> torch.Tensor:
    """A deterministic [batch, 3, H, W] float32 input at the detector's input size."""
    width, height = detector.input_size
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, height, width, generator=generator)


def export_torchscript(detector: LoadedDetector, path: str | Path) -> Path:
    """Save the detector as TorchScript with its `streamsight.json` metadata; returns path."""
    module = detector.module
    if isinstance(module, ProgramModule):
        raise ValueError("a torch.export program cannot be converted to TorchScript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(module, torch.jit.ScriptModule):
        try:
            module = torch.jit.script(module)
        except Exception:
            with torch.no_grad():
                module = torch.jit.trace(module, example_input(detector), check_trace=False)
    torch.jit.save(module, str(path), _extra_files={METADATA_FILE: metadata_json(detector)})
    return path


def export_program(detector: LoadedDetector, path: str | Path) -> Path:
    """Save the detector as a `torch.export` program (.pt2, dynamic batch) with metadata."""
    if isinstance(detector.module, torch.jit.ScriptModule):
        raise ValueError("a TorchScript model cannot be re-exported with torch.export")
    module = detector.module
    if isinstance(module, ProgramModule):
        module = module.program
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(
            module, (example_input(detector),), dynamic_shapes=({0: batch},)
        )
    torch.export.save(program, str(path), extra_files={METADATA_FILE: metadata_json(detector)})
    return path
