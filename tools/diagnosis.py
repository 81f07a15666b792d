"""What holds the pipeline back, and what to change: rules over a window of its metrics.

`Readings` are the pipeline's figures over one window (rates, shares, batch and lag
figures), whatever they were read from: Prometheus (`tools.doctor`) or the running
process's own registry (`readings_between` two `RegistrySample`s, for the demo). `RULES`
is the rule table; `diagnose` applies it. A rule is a name, a condition over `Readings`
and an advice: what the metrics show, the setting or flag to change, and the expected
effect. Rules of kind `bound` are tried in table order and the first that holds names the
bound; every `advice` rule that holds is added after it.

The bounds: `inference` (the model or the GPU), `preprocessing` (per-frame CPU work of a
worker: Kafka reads, decode, batching), `interpreter_lock` (worker threads of one process
sharing one interpreter lock), `kafka_ingest` (lag grows while the workers idle),
`sink` (writes), `offered_load` (the pipeline keeps up: the input is the limit), plus
`no_data` and `unclear`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry

# Thresholds, named so the rules read as sentences.
SATURATED_BUSY = 0.7
"""Workers busy in stages at least this share of the time are saturated."""
IDLE_BUSY = 0.5
"""Workers busy less than this share of the time are waiting for input."""
FULL_CORE = 0.85
"""A single-threaded process at this many cores or more is running flat out."""
LOCK_CORES = 1.3
"""A process of several workers at or under this many cores is held to one core."""
GPU_BUSY = 0.8
"""GPU utilisation at which the GPU, not the host, is the limit."""
SMALL_FILL = 0.5
"""Batches under this fill are small."""
SMALL_MAX_SIZE = 4
"""A maximum batch size at or under this is small for a model on any device."""
DOMINANT_SHARE = 0.5
"""A stage group with this share of the workers' measured time dominates."""
LAG_GROWTH_SHARE = 0.05
"""Lag grows when it rises faster than this share of the throughput (and 1 record/s)."""

STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "preprocessing": ("ingest", "decode", "batch"),
    "inference": ("infer",),
    "sink": ("sink", "dead_letter_sink"),
}
"""The stage labels each bound's share of worker time is made of."""

Bound = Literal[
    "inference",
    "preprocessing",
    "interpreter_lock",
    "kafka_ingest",
    "sink",
    "offered_load",
    "no_data",
    "unclear",
]


@dataclass(frozen=True)
class Readings:
    """The pipeline over one window. Rates are per second over the window, summed over
    processes and workers; None where the metric was absent."""

    window_s: float
    frames_per_s: float
    """Frames through the model."""
    ingest_per_s: float
    """Records read from Kafka."""
    written_per_s: float = 0.0
    """Result rows stored for the first time (repeats of stored frames are skipped)."""
    stage_busy: Mapping[str, float] = field(default_factory=dict)
    """Wall seconds per second spent in each stage (stage label -> workers busy)."""
    stage_cpu: Mapping[str, float] = field(default_factory=dict)
    """CPU cores each stage used."""
    processes: int = 1
    workers_per_process: int | None = None
    """Bytewax worker threads per process; None when not known (taken as 1)."""
    model_threads: int | None = None
    """The model's CPU threads per worker, when known (the demo knows it)."""
    process_cpu: tuple[float, ...] = ()
    """CPU cores used by each process."""
    device: str | None = None
    """Where the forward passes ran: `cpu`, `cuda`, ...; None before any."""
    gpu_utilization: float | None = None
    lag_records: float | None = None
    """Records behind at the window's end, all partitions."""
    lag_growth_per_s: float | None = None
    lag_seconds: float | None = None
    partitions: int | None = None
    """Input partitions seen in the lag series."""
    batch_mean_size: float | None = None
    batch_max_size: float | None = None
    batch_fill: float | None = None
    batch_wait_mean_s: float | None = None
    batch_wait_p90_s: float | None = None
    flushes: Mapping[str, float] = field(default_factory=dict)
    """Batches flushed per second by reason (`size`, `deadline`, `end_of_input`)."""
    inference_batch_s: float | None = None
    """Mean wall time of one forward pass."""
    sink_write_s: float | None = None
    """Mean wall time of one result write batch."""
    dead_letters_per_s: float = 0.0
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None

    # Derived figures ------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Workers in all (one per process when not known)."""
        return max(self.processes, 1) * (self.workers_per_process or 1)

    @property
    def worker_busy(self) -> float:
        """Share of the workers' time spent inside the stages (0 to 1, about)."""
        return sum(self.stage_busy.values()) / self.workers

    def group_busy(self, group: str) -> float:
        """Workers busy in a stage group (`STAGE_GROUPS`)."""
        return sum(self.stage_busy.get(stage, 0.0) for stage in STAGE_GROUPS[group])

    def share(self, group: str) -> float:
        """A stage group's share of the stages' measured time (0 without any)."""
        total = sum(self.stage_busy.values())
        return self.group_busy(group) / total if total > 0 else 0.0

    @property
    def dominant(self) -> str | None:
        """The stage group with the largest share, if it reaches `DOMINANT_SHARE`."""
        group = max(STAGE_GROUPS, key=self.share)
        return group if self.share(group) >= DOMINANT_SHARE else None

    @property
    def cpu_per_process(self) -> float:
        """The busiest process's CPU cores (0 without process series)."""
        return max(self.process_cpu, default=0.0)

    @property
    def lag_growing(self) -> bool:
        """Lag rose over the window faster than noise."""
        growth = self.lag_growth_per_s
        if growth is None:
            return False
        return growth > max(1.0, LAG_GROWTH_SHARE * self.frames_per_s)

    @property
    def flat_out(self) -> bool:
        """Single-worker processes running at a full core with the model elsewhere: the
        worker thread has no time left, whatever share the measured stages show."""
        return (
            (self.workers_per_process or 1) == 1
            and self.device not in (None, "cpu")
            and self.cpu_per_process >= FULL_CORE
        )

    @property
    def saturated(self) -> bool:
        """The pipeline runs as fast as it can: lag grows, the workers are busy, or
        single-worker processes run flat out."""
        return self.lag_growing or self.worker_busy >= SATURATED_BUSY or self.flat_out

    @property
    def forward_pass_cores(self) -> float | None:
        """CPU cores a forward pass keeps busy (process CPU over wall time of `infer`)."""
        busy = self.stage_busy.get("infer", 0.0)
        return self.stage_cpu.get("infer", 0.0) / busy if busy > 0 else None

    @property
    def deadline_share(self) -> float:
        """Share of batches flushed by their deadline."""
        total = sum(self.flushes.values())
        return self.flushes.get("deadline", 0.0) / total if total > 0 else 0.0

    @property
    def capacity_per_s(self) -> float | None:
        """Frames per second the workers could write at full stage time."""
        busy = self.worker_busy
        return self.frames_per_s / busy if busy > 0 else None

    def per_frame_ms(self, stage: str) -> float | None:
        """Wall milliseconds of `stage` per frame through the model."""
        if self.frames_per_s <= 0:
            return None
        return 1000.0 * self.stage_busy.get(stage, 0.0) / self.frames_per_s

    def cpu_per_frame_ms(self, stage: str) -> float | None:
        """CPU milliseconds of `stage` per frame through the model."""
        if self.frames_per_s <= 0:
            return None
        return 1000.0 * self.stage_cpu.get(stage, 0.0) / self.frames_per_s


@dataclass(frozen=True)
class Finding:
    """What one rule found: the bound it names (None for advice), what the metrics show,
    what to change (the setting or flag) and the expected effect."""

    rule: str
    bound: Bound | None
    evidence: str
    change: str
    effect: str


@dataclass(frozen=True)
class Rule:
    """A row of the rule table."""

    name: str
    kind: Literal["bound", "advice"]
    bound: Bound | None
    holds: Callable[[Readings], bool]
    advise: Callable[[Readings], tuple[str, str, str]]
    """Readings -> (evidence, change, effect)."""
    doc: str

    def apply(self, r: Readings) -> Finding | None:
        """The finding when the rule holds for `r`, else None."""
        if not self.holds(r):
            return None
        evidence, change, effect = self.advise(r)
        return Finding(self.name, self.bound, evidence, change, effect)


# Formatting helpers ---------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def _round_to(value: float, step: float) -> float:
    return max(step, round(value / step) * step)


def _delay_factor(r: Readings) -> float:
    """How much longer batches would have to wait to be about `SMALL_FILL` full (the
    configured deadline is not exported, so the advice is a factor of it)."""
    return min(4.0, max(1.5, SMALL_FILL / max(r.batch_fill or 0.0, 0.01)))


def _n(count: int | None, noun: str) -> str:
    """`1 worker`, `2 workers`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _gpu_phrase(r: Readings) -> str:
    return "" if r.gpu_utilization is None else f" while the GPU is {r.gpu_utilization:.0%} busy"


# Conditions -----------------------------------------------------------------------------


def _no_data(r: Readings) -> bool:
    return r.frames_per_s <= 0 and r.ingest_per_s <= 0


def _waiting_for_input(r: Readings) -> bool:
    """Lag grows while the workers mostly wait, and no process runs flat out."""
    return r.lag_growing and r.worker_busy < SATURATED_BUSY and not r.flat_out


def _too_few_partitions(r: Readings) -> bool:
    return (
        _waiting_for_input(r)
        and r.partitions is not None
        and r.workers_per_process is not None
        and r.partitions < r.workers
    )


def _kafka_ingest(r: Readings) -> bool:
    return _waiting_for_input(r) and r.worker_busy < IDLE_BUSY


def _interpreter_lock(r: Readings) -> bool:
    return (
        r.saturated
        and (r.workers_per_process or 1) > 1
        and 0 < r.cpu_per_process <= LOCK_CORES
        and r.dominant != "inference"
    )


def _gpu_busy(r: Readings) -> bool:
    return (
        r.saturated
        and r.dominant == "inference"
        and r.device not in (None, "cpu")
        and (r.gpu_utilization or 0.0) >= GPU_BUSY
    )


def _batch_capped(r: Readings) -> bool:
    return (
        r.saturated
        and r.dominant == "inference"
        and r.batch_max_size is not None
        and r.batch_max_size <= SMALL_MAX_SIZE
    )


def _thin_batches(r: Readings) -> bool:
    thin = (
        r.batch_fill is not None
        and r.batch_fill < SMALL_FILL
        and r.deadline_share >= 0.5
        and (r.batch_max_size or 0) > SMALL_MAX_SIZE
    )
    idle_gpu = r.gpu_utilization is not None and r.gpu_utilization < IDLE_BUSY
    # Thin batches of a pipeline that waits for Kafka fill up once the input does.
    model_bound = r.saturated and not _waiting_for_input(r) and r.dominant == "inference"
    return thin and (model_bound or idle_gpu)


def _dominated_by(group: str) -> Callable[[Readings], bool]:
    return lambda r: r.saturated and r.dominant == group


def _offered_load(r: Readings) -> bool:
    return not r.lag_growing and r.worker_busy < SATURATED_BUSY and not r.flat_out


# Advice -----------------------------------------------------------------------------------


def _advise_no_data(r: Readings) -> tuple[str, str, str]:
    return (
        f"no frames were read or written in the {r.window_s:.0f} s window",
        "check that the flow runs and that Prometheus scrapes it (`up` is 1 for its "
        "targets), or widen --window",
        "a verdict once frames flow",
    )


def _advise_partitions(r: Readings) -> tuple[str, str, str]:
    idle = r.workers - (r.partitions or 0)
    return (
        f"lag grows by {r.lag_growth_per_s:.0f} records/s while the workers are "
        f"{r.worker_busy:.0%} busy: the input topic has {_n(r.partitions, 'partition')} for "
        f"{_n(r.workers, 'worker')}, so {_n(idle, 'worker')} read nothing",
        f"give the input topic at least {r.workers} partitions (`kafka-topics.sh --alter "
        f"--partitions {r.workers}`), or run {_n(r.partitions, 'worker')}",
        f"up to {r.workers / max(r.partitions or 1, 1):.1f}x the frames read per second, "
        "until the next stage is busy",
    )


def _advise_kafka(r: Readings) -> tuple[str, str, str]:
    return (
        f"lag grows by {r.lag_growth_per_s:.0f} records/s while every stage is idle "
        f"(workers {r.worker_busy:.0%} busy, {r.ingest_per_s:.0f} records/s read)",
        "raise STREAMSIGHT_FETCH_BATCH_SIZE (messages per partition per poll, default 64) "
        "and check the brokers and the network between them and the flow",
        "more records per poll; the workers' idle time turns into throughput",
    )


def _advise_lock(r: Readings) -> tuple[str, str, str]:
    w = r.workers_per_process or 1
    return (
        f"{w} worker threads per process use {r.cpu_per_process:.2f} cores per process "
        f"while the workers are {r.worker_busy:.0%} busy: they wait for the interpreter lock",
        f"run single-worker processes instead of `-w {w}`: `python -m flows.processes -n "
        f"{r.workers}` on one host, or {r.workers} pods of one worker on Kubernetes",
        f"up to {w}x the Python work per second where cores are free (2 CPU cores: "
        "939 against 823 frames/s)",
    )


def _advise_gpu(r: Readings) -> tuple[str, str, str]:
    return (
        f"forward passes take {_pct(r.share('inference'))} of the workers' time and the "
        f"GPU is {_pct(r.gpu_utilization)} busy",
        "STREAMSIGHT_PRECISION=fp16 if it is fp32, a larger STREAMSIGHT_BATCH_MAX_SIZE if "
        "batches are full, or one process per additional GPU",
        "throughput grows with the GPU work saved or added; the host has time to spare",
    )


def _advise_batch_size(r: Readings) -> tuple[str, str, str]:
    return (
        f"forward passes take {_pct(r.share('inference'))} of the workers' time at "
        f"{r.batch_mean_size or 0:.1f} frames per batch "
        f"(STREAMSIGHT_BATCH_MAX_SIZE={r.batch_max_size or 0:.0f}), "
        f"{_ms(r.inference_batch_s)} each",
        "raise STREAMSIGHT_BATCH_MAX_SIZE to 16 (or STREAMSIGHT_BATCH_ADAPTIVE=true)",
        "fewer, fuller forward passes: less model time per frame (2 CPU cores: batch 16 "
        "ran 990 against 521 frames/s for batch 1)",
    )


def _advise_thin_batches(r: Readings) -> tuple[str, str, str]:
    factor = _delay_factor(r)
    busy = (
        _gpu_phrase(r)
        if r.gpu_utilization is not None
        else f", and forward passes take {_pct(r.share('inference'))} of the workers' time"
    )
    return (
        f"batches are {r.batch_fill or 0.0:.0%} full ({r.batch_mean_size or 0:.1f} frames), "
        f"{r.deadline_share:.0%} flushed by their deadline after {_ms(r.batch_wait_mean_s)} "
        f"on average{busy}",
        f"raise STREAMSIGHT_BATCH_MAX_DELAY_MS about {factor:.1f}x (from the default 50: to "
        f"{_round_to(50 * factor, 10):.0f}) or turn on STREAMSIGHT_BATCH_ADAPTIVE=true",
        f"batches about {factor:.1f}x fuller, fewer forward passes per frame; a frame waits "
        f"up to {factor:.1f}x as long for its batch",
    )


def _advise_inference(r: Readings) -> tuple[str, str, str]:
    on_cpu = r.device in (None, "cpu")
    cores = r.forward_pass_cores
    where = (
        f"on the CPU ({cores:.1f} cores per forward pass)"
        if on_cpu and cores is not None
        else f"on {r.device}{_gpu_phrase(r)}"
    )
    if on_cpu:
        change = (
            "run the model on a GPU (STREAMSIGHT_DEVICE=cuda), or give it more cores: "
            "more single-worker processes on more cores (`python -m flows.processes -n N`) "
            "or STREAMSIGHT_CPU_THREADS"
        )
        effect = "throughput grows with the model's compute; the other stages have room"
    else:
        change = (
            "the GPU waits on the host side of the forward pass (copies, post-processing):"
            " raise STREAMSIGHT_BATCH_MAX_SIZE, or run more processes per GPU"
        )
        effect = "more frames per forward pass and per second of host time"
    return (
        f"forward passes take {_pct(r.share('inference'))} of the workers' time, "
        f"{_ms(r.inference_batch_s)} per batch of {r.batch_mean_size or 0:.1f}, {where}",
        change,
        effect,
    )


def _advise_preprocessing(r: Readings) -> tuple[str, str, str]:
    decode = r.stage_cpu.get("decode", 0.0) / max(r.processes, 1)
    return (
        f"decode, Kafka reads and batching take {_pct(r.share('preprocessing'))} of the "
        f"workers' time; decode uses {decode:.0%} of one core per process and each "
        f"process {r.cpu_per_process:.2f} cores{_gpu_phrase(r)}",
        "run one single-worker process per core: `python -m flows.processes` (default "
        "-n = the usable cores), or more pods of one worker",
        "throughput grows with the processes until the cores or the model are busy",
    )


def _advise_sink(r: Readings) -> tuple[str, str, str]:
    return (
        f"sink writes take {_pct(r.share('sink'))} of the workers' time, "
        f"{_ms(r.sink_write_s)} per write batch",
        "use PostgreSQL rather than SQLite (STREAMSIGHT_SINK=postgresql://...) and check "
        "the database; STREAMSIGHT_PUBLISH_DETECTIONS=false if nobody reads the topic",
        "the workers' time in the sink turns into throughput",
    )


def _advise_offered_load(r: Readings) -> tuple[str, str, str]:
    capacity = r.capacity_per_s
    headroom = (
        f"; the stages could take about {capacity:.0f} frames/s" if capacity is not None else ""
    )
    lag = "" if r.lag_records is None else f", lag flat at {r.lag_records:.0f} records"
    return (
        f"the pipeline keeps up with {r.ingest_per_s:.1f} frames/s arriving: workers "
        f"{r.worker_busy:.0%} busy{lag}{headroom}",
        "nothing, for throughput; for cost, fewer processes (-n) or a smaller machine",
        "the throughput follows the input",
    )


def _advise_unclear(r: Readings) -> tuple[str, str, str]:
    return (
        f"workers {r.worker_busy:.0%} busy, lag "
        + ("growing" if r.lag_growing else "flat")
        + f"; no stage group reaches {DOMINANT_SHARE:.0%} of their time",
        "look at the per-stage dashboards (deploy/grafana) for a stage that is slow in "
        "bursts, or widen --window",
        "a clearer verdict",
    )


RULES: tuple[Rule, ...] = (
    Rule(
        "no-data", "bound", "no_data", _no_data, _advise_no_data,
        "No frames read or written in the window.",
    ),
    Rule(
        "too-few-partitions", "bound", "kafka_ingest", _too_few_partitions,
        _advise_partitions,
        "Lag grows while the workers wait, and the input has fewer partitions than workers.",
    ),
    Rule(
        "kafka-ingest", "bound", "kafka_ingest", _kafka_ingest, _advise_kafka,
        "Lag grows while every stage is mostly idle.",
    ),
    Rule(
        "interpreter-lock", "bound", "interpreter_lock", _interpreter_lock, _advise_lock,
        "Saturated, several workers per process, and each process near one core.",
    ),
    Rule(
        "gpu-busy", "bound", "inference", _gpu_busy, _advise_gpu,
        "Saturated, inference dominates, and the GPU is busy.",
    ),
    Rule(
        "inference", "bound", "inference", _dominated_by("inference"), _advise_inference,
        "Saturated and inference dominates the workers' time.",
    ),
    Rule(
        "preprocessing", "bound", "preprocessing", _dominated_by("preprocessing"),
        _advise_preprocessing,
        "Saturated and ingest, decode and batching dominate the workers' time.",
    ),
    Rule(
        "sink", "bound", "sink", _dominated_by("sink"), _advise_sink,
        "Saturated and the sink dominates the workers' time.",
    ),
    Rule(
        "offered-load", "bound", "offered_load", _offered_load, _advise_offered_load,
        "Lag flat and the workers mostly idle: the pipeline keeps up with its input.",
    ),
    Rule(
        "batch-size-capped", "advice", None, _batch_capped, _advise_batch_size,
        "Inference bounds a saturated pipeline and batches may hold at most a few frames.",
    ),
    Rule(
        "thin-batches", "advice", None, _thin_batches, _advise_thin_batches,
        "Batches leave on their deadline under half full while inference bounds a "
        "saturated pipeline or the GPU idles.",
    ),
)  # fmt: skip
"""The rule table, in the order bound rules are tried."""

UNCLEAR = Rule(
    "unclear", "bound", "unclear", lambda r: True, _advise_unclear,
    "No other bound rule holds.",
)  # fmt: skip


@dataclass(frozen=True)
class Diagnosis:
    """The bound (the first bound rule that holds) and every finding, bound first."""

    bound: Bound
    verdict: str
    """One line: `bound by: ...`."""
    findings: tuple[Finding, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "bound": self.bound,
            "verdict": self.verdict,
            "findings": [asdict(f) for f in self.findings],
        }


def verdict(bound: Bound, r: Readings) -> str:
    """The one-line verdict, e.g. `bound by: inference on cpu, 2 threads`."""
    if bound == "inference":
        text = f"inference on {r.device or 'cpu'}"
        if r.device in (None, "cpu") and r.model_threads:
            text += f", {r.model_threads} thread{'s' if r.model_threads != 1 else ''}"
        elif r.gpu_utilization is not None:
            text += f", GPU {r.gpu_utilization:.0%} busy"
    elif bound == "preprocessing":
        text = f"preprocessing CPU, {r.cpu_per_process:.2f} cores per process"
    elif bound == "interpreter_lock":
        text = (
            f"the interpreter lock, {r.workers_per_process} workers per process at "
            f"{r.cpu_per_process:.2f} cores"
        )
    elif bound == "kafka_ingest":
        text = "Kafka ingest"
        if r.partitions is not None and r.partitions < r.workers:
            text += f", {_n(r.partitions, 'partition')} for {_n(r.workers, 'worker')}"
    elif bound == "sink":
        text = f"the sink, {_ms(r.sink_write_s)} per write"
    elif bound == "offered_load":
        text = f"the offered load, workers {r.worker_busy:.0%} busy"
    elif bound == "no_data":
        text = "nothing yet, no frames in the window"
    else:
        text = f"no single stage, workers {r.worker_busy:.0%} busy"
    return f"bound by: {text}"


def diagnose(r: Readings, rules: Iterable[Rule] = RULES) -> Diagnosis:
    """Apply the rule table to `r`: the first bound rule that holds names the bound
    (`unclear` when none does); advice rules that hold follow it."""
    bound_finding: Finding | None = None
    advice: list[Finding] = []
    for rule in rules:
        if rule.kind == "bound" and bound_finding is not None:
            continue
        finding = rule.apply(r)
        if finding is None:
            continue
        if rule.kind == "bound":
            bound_finding = finding
        else:
            advice.append(finding)
    if bound_finding is None:
        bound_finding = UNCLEAR.apply(r)
        assert bound_finding is not None
    bound = bound_finding.bound or "unclear"
    if bound == "no_data":
        advice = []
    return Diagnosis(bound, verdict(bound, r), (bound_finding, *advice))


# Readings from the process's own registry (the demo) ------------------------------------

SampleKey = tuple[str, frozenset[tuple[str, str]]]


@dataclass(frozen=True)
class RegistrySample:
    """Every sample of a registry at one moment: (sample name, labels) -> value."""

    at_s: float
    values: Mapping[SampleKey, float]

    @classmethod
    def read(cls, at_s: float, registry: CollectorRegistry = REGISTRY) -> RegistrySample:
        """Collect `registry` now (`at_s`: a monotonic clock reading)."""
        values: dict[SampleKey, float] = {}
        for family in registry.collect():
            for s in family.samples:
                values[(s.name, frozenset(s.labels.items()))] = s.value
        return cls(at_s, values)

    def total(self, name: str, **labels: str) -> float:
        """The sum of samples `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and wanted <= ls)

    def by(self, name: str, label: str) -> dict[str, float]:
        """Samples `name` summed by the value of `label`."""
        out: dict[str, float] = {}
        for (n, ls), v in self.values.items():
            if n == name:
                key = dict(ls).get(label)
                if key is not None:
                    out[key] = out.get(key, 0.0) + v
        return out

    def count(self, name: str) -> int:
        """How many samples `name` there are."""
        return sum(1 for n, _ in self.values if n == name)


def quantile_from_buckets(q: float, buckets: Mapping[str, float]) -> float | None:
    """The `q` quantile of cumulative histogram buckets (`le` -> count), interpolated
    within a bucket as Prometheus' `histogram_quantile` does."""
    bounds = sorted((float(le), count) for le, count in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if math.isinf(upper):
                return lower_bound
            width = count - lower_count
            return lower_bound + (upper - lower_bound) * ((rank - lower_count) / width)
        lower_bound, lower_count = upper, count
    return lower_bound


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def readings_between(
    before: RegistrySample,
    after: RegistrySample,
    *,
    workers_per_process: int | None = None,
    model_threads: int | None = None,
) -> Readings:
    """`Readings` of one process between two samples of its registry (counters as the
    difference over the time between them; gauges as read in `after`)."""
    dt = max(after.at_s - before.at_s, 1e-9)

    def rate(name: str, **labels: str) -> float:
        return max(0.0, after.total(name, **labels) - before.total(name, **labels)) / dt

    def rates_by(name: str, label: str) -> dict[str, float]:
        a, b = after.by(name, label), before.by(name, label)
        return {k: max(0.0, v - b.get(k, 0.0)) / dt for k, v in a.items()}

    def mean(prefix: str, **labels: str) -> float | None:
        return _ratio(rate(f"{prefix}_sum", **labels), rate(f"{prefix}_count", **labels))

    wait_buckets = {
        le: after_v - before.by("streamsight_batch_wait_seconds_bucket", "le").get(le, 0.0)
        for le, after_v in after.by("streamsight_batch_wait_seconds_bucket", "le").items()
    }
    devices = rates_by("streamsight_job_device_seconds_total", "device")
    gpu = [v for (n, _), v in after.values.items() if n == "streamsight_gpu_utilization_ratio"]
    lag_now = after.total("streamsight_kafka_consumer_lag_records")
    lag_then = before.total("streamsight_kafka_consumer_lag_records")
    lag_seconds = [
        v for (n, _), v in after.values.items() if n == "streamsight_kafka_consumer_lag_seconds"
    ]
    partitions = after.count("streamsight_kafka_consumer_lag_records")
    process_cpu = rate("process_cpu_seconds_total")
    has_process = after.count("process_cpu_seconds_total") > 0
    max_size = after.total("streamsight_batch_max_size_frames")
    return Readings(
        window_s=dt,
        frames_per_s=rate("streamsight_inference_frames_total"),
        ingest_per_s=rate("streamsight_stage_duration_seconds_count", stage="ingest"),
        written_per_s=rate("streamsight_sink_rows_written_total", sink="results"),
        stage_busy=rates_by("streamsight_stage_duration_seconds_sum", "stage"),
        stage_cpu=rates_by("streamsight_stage_cpu_seconds_total", "stage"),
        processes=1,
        workers_per_process=workers_per_process,
        model_threads=model_threads,
        process_cpu=(process_cpu,) if has_process else (),
        device=max(devices, key=lambda d: devices[d]) if any(devices.values()) else None,
        gpu_utilization=sum(gpu) / len(gpu) if gpu else None,
        lag_records=lag_now if partitions else None,
        lag_growth_per_s=(lag_now - lag_then) / dt if partitions else None,
        lag_seconds=max(lag_seconds) if lag_seconds else None,
        partitions=partitions or None,
        batch_mean_size=mean("streamsight_batch_size_frames"),
        batch_max_size=max_size if max_size > 0 else None,
        batch_fill=mean("streamsight_batch_fill_ratio"),
        batch_wait_mean_s=mean("streamsight_batch_wait_seconds"),
        batch_wait_p90_s=quantile_from_buckets(0.9, wait_buckets),
        flushes=rates_by("streamsight_batch_flushes_total", "reason"),
        inference_batch_s=mean("streamsight_inference_batch_duration_seconds"),
        sink_write_s=mean("streamsight_sink_write_duration_seconds", sink="results"),
        dead_letters_per_s=rate("streamsight_dead_letters_total"),
    )
