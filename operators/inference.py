"""Inference: one forward pass per batch, per-frame detections out.

The model is loaded once per process and shared by its workers. Frames travel as uint8
and become float on the device (4x less to copy); on CUDA the host buffer is pinned, the
copy is non-blocking, each worker thread has its own stream, and the model runs in
reduced precision. On CPU the cores are shared among the workers: each worker's forward
pass runs on cores / workers threads (`operators.workers.threads_per_worker`), so workers
that infer at once do not run more threads than there are cores. `infer_batches` is the
stage's operator: a model that fails turns its batch into dead letters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import bytewax.operators as op
import numpy as np
import torch
from bytewax.dataflow import Stream, operator

from operators import dead_letters as dl
from operators import stages
from operators.adaptive import AdaptiveBatching
from operators.detector import LoadedDetector, load_detector
from operators.frames import DeadLetter, Detection, FrameBatch, FrameResult
from operators.stages import Instrument, uninstrumented

log = logging.getLogger(__name__)

STAGE = stages.INFER
Infer = Callable[[FrameBatch], list[FrameResult]]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return PRECISIONS[name]


@dataclass
class Inferencer:
    """A loaded detector on its device, turning batches into per-frame results."""

    detector: LoadedDetector
    device: torch.device
    dtype: torch.dtype
    score_threshold: float

    @classmethod
    def create(
        cls,
        detector: LoadedDetector,
        *,
        device: str = "auto",
        precision: str = "auto",
        score_threshold: float = 0.35,
        cpu_threads: int = 0,
    ) -> Inferencer:
        """Move `detector` to its device and precision and warm it up. On CPU,
        `cpu_threads` (> 0) sets the threads of each forward pass, for every worker
        thread started after this (torch's threads are a process-wide setting)."""
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        if dev.type == "cpu" and cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        module = detector.module.to(dev)
        if dtype != torch.float32:
            module = module.to(dtype)
        if dev.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        module.eval()
        inferencer = cls(detector, dev, dtype, score_threshold)
        width, height = detector.input_size
        inferencer.forward(np.zeros((1, height, width, 3), dtype=np.uint8))
        return inferencer

    @property
    def device_name(self) -> str:
        """`cpu` or `cuda:N`."""
        return str(self.device)

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] in, float32 [B, K, 6] (x1, y1, x2, y2, score, class) out."""
        tensor = torch.from_numpy(pixels)
        if self.device.type != "cuda":
            with torch.inference_mode():
                return self._run(tensor).cpu().numpy()
        # Each worker thread has its own CUDA stream: one worker's upload, forward and copy
        # back overlap another's, instead of queueing behind them on the default stream.
        with torch.cuda.stream(self._stream()), torch.inference_mode():
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            return self._run(tensor).cpu().numpy()

    def _run(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.permute(0, 3, 1, 2).to(self.dtype).div_(255.0)
        return self.detector.module(x).float()

    def _stream(self) -> torch.cuda.Stream:
        """This thread's CUDA stream on the model's device."""
        streams: dict[torch.device, torch.cuda.Stream] | None = getattr(_streams, "by_device", None)
        if streams is None:
            streams = _streams.by_device = {}
        stream = streams.get(self.device)
        if stream is None:
            stream = streams[self.device] = torch.cuda.Stream(device=self.device)
        return stream

    def infer(self, batch: FrameBatch) -> list[FrameResult]:
        """Run one forward pass over `batch`; boxes come back in original image pixels."""
        pixels = np.stack([frame.pixels for frame in batch.frames])
        raw = self.forward(pixels)
        done_ns = time.time_ns()
        in_w, in_h = self.detector.input_size
        classes = self.detector.classes
        results = []
        for frame, rows in zip(batch.frames, raw, strict=True):
            meta = frame.meta
            kept = rows[rows[:, 4] >= self.score_threshold]
            scale = np.array([meta.width / in_w, meta.height / in_h] * 2, dtype=np.float32)
            limit = np.array([meta.width, meta.height] * 2, dtype=np.float32)
            boxes = np.minimum(np.maximum(kept[:, :4] * scale, 0), limit).tolist()
            detections = tuple(
                Detection(
                    box=(x1, y1, x2, y2),
                    label=classes[c] if 0 <= c < len(classes) else f"class_{c}",
                    score=round(score, 4),
                )
                for (x1, y1, x2, y2), score, c in zip(
                    boxes, kept[:, 4].tolist(), kept[:, 5].astype(np.int64).tolist(), strict=True
                )
            )
            results.append(
                FrameResult(
                    meta=meta,
                    detections=detections,
                    model_name=self.detector.name,
                    model_version=self.detector.version,
                    device=self.device_name,
                    batch_size=len(batch.frames),
                    batch_flush_reason=batch.flush_reason,
                    batch_dispatched_ns=batch.dispatched_ns,
                    inferred_ns=done_ns,
                    batch_id=batch.batch_id,
                )
            )
        return results


_lock = threading.Lock()
_shared: dict[tuple[object, ...], Inferencer] = {}
_streams = threading.local()


def shared_inferencer(
    model_path: str | None,
    *,
    device: str,
    precision: str,
    score_threshold: float,
    input_size: tuple[int, int] | None = None,
    classes: tuple[str, ...] | None = None,
    cpu_threads: int = 0,
) -> Inferencer:
    """The process's inferencer for these settings, loaded on first use."""
    key = (model_path, device, precision, score_threshold, input_size, classes, cpu_threads)
    with _lock:
        if key not in _shared:
            detector = load_detector(model_path, input_size=input_size, classes=classes)
            inferencer = Inferencer.create(
                detector,
                device=device,
                precision=precision,
                score_threshold=score_threshold,
                cpu_threads=cpu_threads,
            )
            log.info(
                "loaded model %s %s on %s (%s%s)",
                detector.name,
                detector.version,
                inferencer.device_name,
                str(inferencer.dtype).removeprefix("torch."),
                f", {torch.get_num_threads()} threads per worker"
                if inferencer.device.type == "cpu"
                else "",
            )
            _shared[key] = inferencer
        return _shared[key]


def infer_or_dead_letter(infer: Infer, batch: FrameBatch) -> list[FrameResult | DeadLetter]:
    """Run `infer`; if the model fails, every frame of the batch becomes a dead letter."""
    try:
        return list(infer(batch))
    except Exception as exc:  # a failing batch must not crash the dataflow
        return [
            dl.reject_decoded(
                frame.meta,
                stage=STAGE,
                reason=dl.INTERNAL_ERROR,
                detail=f"inference failed: {type(exc).__name__}",
            )
            for frame in batch.frames
        ]


def observed_infer(controller: AdaptiveBatching, infer: Infer) -> Infer:
    """`infer` with each batch's size, forward time, age and end fed to `controller`. The
    age is that of its first frame when it reached the batcher (capture to prepared): what
    the frames waited before batching, not the batch delay the controller chose itself."""

    def run(batch: FrameBatch) -> list[FrameResult]:
        started = time.perf_counter_ns()
        results = infer(batch)
        ended = time.perf_counter_ns()
        age_ns = 0
        if batch.frames:
            first = batch.frames[0]
            age_ns = max(first.prepared_ns - first.meta.capture_ns, 0)
        controller.observe_inference(
            len(batch.frames),
            (ended - started) / 1e9,
            wait_s=age_ns / 1e9,
            worker=threading.get_ident(),
            ended_ns=ended,
        )
        return results

    return run


@dataclass(frozen=True)
class InferOut:
    """Each frame's result, and the frames of batches the model failed on as dead letters."""

    oks: Stream[FrameResult]
    errs: Stream[DeadLetter]


@operator
def infer_batches(
    step_id: str,
    up: Stream[FrameBatch],
    infer: Infer,
    controller: AdaptiveBatching | None = None,
    instrument: Instrument = uninstrumented,
) -> InferOut:
    """One call of `infer` per batch of `up` (its time fed to `controller`, if any): one
    result per frame, or one dead letter per frame when the model fails."""
    if controller is not None:
        infer = observed_infer(controller, infer)
    outcomes = op.flat_map("run", up, partial(infer_or_dead_letter, instrument(step_id, infer)))
    split = op.branch("split", outcomes, _is_result)
    return InferOut(split.trues, split.falses)


def _is_result(item: object) -> bool:
    return isinstance(item, FrameResult)
