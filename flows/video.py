"""The streamsight dataflow: `python -m bytewax.run flows.video`.

With no `STREAMSIGHT_BROKERS` it runs the demo on the embedded broker and exits when the
demo input is processed; with brokers it tails the input topic of a real Kafka cluster,
resuming from Bytewax's recovery snapshots when `bytewax.run` is given them (`-r`/`-s`/`-b`
or `BYTEWAX_RECOVERY_DIRECTORY`...; see `flows.recovery`). Wiring only: settings -> stages
-> `flow`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flows.pipeline import build_flow
from flows.recovery import set_up_recovery
from flows.settings import load_settings, parse_size
from operators import stages
from operators.frames import DeadLetter, FrameResult
from operators.inference import shared_inferencer
from operators.ingest import frame_source
from operators.kafka_io import (
    KafkaUnavailable,
    client_config,
    producer_config,
    wait_for_cluster,
)
from operators.sinks import DeadLetterSink, ResultSink, exit_process
from operators.stores import StoreError, open_store
from operators.tally import Tally
from operators.telemetry.gpu import GpuSampler
from operators.telemetry.metrics import (
    LagTracker,
    PipelineMetrics,
    pipeline_metrics,
    start_metrics_server,
)
from operators.telemetry.tracing import setup_tracing, write_tracer
from operators.workers import (
    freeze_startup_heap,
    keep_freed_memory,
    run_options,
    threads_per_worker,
    workers_per_process,
)

if TYPE_CHECKING:
    from tools.demo import Demo

log = logging.getLogger("flows.video")

keep_freed_memory()  # before the model's first allocations
settings = load_settings()
logging.basicConfig(
    level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
)
# Fail fast, with one clear line, on a sink that cannot be opened or a model that cannot
# be loaded, before any worker starts.
try:
    open_store(settings.sink_url).close()
except StoreError as exc:
    raise SystemExit(f"streamsight: {exc}") from None

tally = Tally()
try:
    tracing = setup_tracing()
except ValueError as exc:  # an unsupported OTEL_TRACES_EXPORTER or OTLP protocol
    raise SystemExit(f"streamsight: {exc}") from None
store_system = settings.sink_url.system

demo: Demo | None = None
if settings.embedded:
    from tools.demo import Demo  # the demo (and its embedded broker) only without Kafka

    demo = Demo(settings, tally, tracing=tracing)
    bootstrap = demo.bootstrap
else:
    try:
        wait_for_cluster(
            client_config(settings, settings.brokers),
            settings.input_topic,
            timeout_s=settings.broker_wait_s,
        )
    except KafkaUnavailable as exc:
        raise SystemExit(f"streamsight: {exc}") from None
    bootstrap = settings.brokers or ""
try:  # bytewax.run has read its recovery flags; it opens the directory after this import
    set_up_recovery(run_options(), settings.recovery_partitions, embedded=settings.embedded)
except ValueError as exc:
    raise SystemExit(f"streamsight: {exc}") from None

metrics: PipelineMetrics | None = None
if settings.metrics_enabled:
    metrics = pipeline_metrics(settings.metrics_max_jobs, settings.metrics_job_idle_s)
    metrics.lag = LagTracker(
        client_config(settings, bootstrap), interval_s=settings.lag_interval_s
    ).start()
    GpuSampler(interval_s=settings.gpu_sample_interval_s).start()
    try:
        start_metrics_server(settings.metrics_port, settings.metrics_addr)
    except OSError as exc:
        log.warning(
            "metrics port %d unavailable (%s): this process serves no /metrics; "
            "give each process on a host its own STREAMSIGHT_METRICS_PORT",
            settings.metrics_port,
            exc.strerror,
        )

results_observers = [tally.results_written] + ([metrics.results_written] if metrics else [])
letters_observers = [tally.dead_letters_written] + ([metrics.letters_written] if metrics else [])


def on_results(results: Sequence[FrameResult], duplicates: int, written_ns: int) -> None:
    """Tell the tally and the metrics what the result sink stored."""
    for observe in results_observers:
        observe(results, duplicates, written_ns)


def on_letters(letters: Sequence[DeadLetter]) -> None:
    """Tell the tally and the metrics which dead letters were stored."""
    for observe in letters_observers:
        observe(letters)


try:
    inferencer = shared_inferencer(
        settings.model_path,
        device=settings.device,
        precision=settings.precision,
        score_threshold=settings.score_threshold,
        input_size=parse_size(settings.model_input_size) if settings.model_input_size else None,
        classes=tuple(settings.model_classes.split(",")) if settings.model_classes else None,
        cpu_threads=threads_per_worker(workers_per_process(), settings.cpu_threads),
    )
except ValueError as exc:
    # One line: a file that is not a model gets torch's several-line explanation appended.
    first_line = str(exc).partition("\n")[0]
    raise SystemExit(f"streamsight: {first_line}") from None

producer = producer_config(settings, bootstrap=bootstrap, client_id="streamsight-sink")
flow = build_flow(
    settings,
    source=frame_source(
        bootstrap,
        settings.input_topic,
        client_config=client_config(settings, bootstrap),
        batch_size=settings.fetch_batch_size,
        tail=not settings.ends_at_topic_end,
        end_offsets=demo.end_offsets if demo and settings.ends_at_topic_end else None,
    ),
    infer=inferencer.infer,
    input_size=inferencer.detector.input_size,
    results=ResultSink(
        settings.sink,
        producer,
        output_topic=settings.output_topic,
        dead_letter_topic=settings.dead_letter_topic,
        publish=settings.publish_detections,
        on_results=on_results,
        on_letters=on_letters,
        trace_writes=write_tracer(
            tracing,
            topic=settings.output_topic if settings.publish_detections else None,
            store=store_system,
        ),
        retry_s=settings.sink_retry_s,
        on_outage=metrics.sink_outage if metrics else None,
        on_give_up=exit_process,
    ),
    dead_letters=DeadLetterSink(
        settings.sink,
        producer,
        topic=settings.dead_letter_topic,
        on_letters=on_letters,
        trace_writes=write_tracer(
            tracing,
            topic=settings.dead_letter_topic,
            store=store_system,
            stage=stages.DEAD_LETTER_SINK,
        ),
        retry_s=settings.sink_retry_s,
        on_outage=metrics.sink_outage if metrics else None,
        on_give_up=exit_process,
    ),
    tracing=tracing,
    metrics=metrics,
    model={
        "streamsight.model.name": inferencer.detector.name,
        "streamsight.model.version": inferencer.detector.version,
        "streamsight.device": inferencer.device_name,
    },
)

# Start-up is done: its objects stay out of the full garbage collections from here on.
freeze_startup_heap()

if demo is not None:
    demo.start()
