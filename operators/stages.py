"""The stages' names: one word per stage, used everywhere the stage is named.

Each is the Bytewax `step_id` of the stage's operator in `flows.pipeline.build_flow`, the
`stage` label of the `streamsight_*` metrics, the `streamsight.stage` attribute of the
stage's spans, and the `stage` of the dead letters the stage makes. Bytewax's own series
(`bytewax_item_inp_count_total`, ...) name a step by its path under the flow, e.g.
`streamsight.decode.prepare.flat_map_batch` for the work step of `decode`.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

W = TypeVar("W")

INGEST = "ingest"
"""Read messages from Kafka; consume errors become dead letters."""
DECODE = "decode"
"""Parse headers, decode and preprocess each frame; bad frames become dead letters."""
BATCH = "batch"
"""Group frames into batches per stream key; frames too old to infer become dead letters."""
INFER = "infer"
"""One forward pass per batch; a failing batch's frames become dead letters."""
SINK = "sink"
"""Store and publish the results; rows the store refuses become dead letters."""
DEAD_LETTER_SINK = "dead_letter_sink"
"""Store and publish the dead letters of every stage."""
DEAD_LETTERS = "dead_letters"
"""The merge of every stage's dead letters (a step, not a stage)."""

STAGES = (INGEST, DECODE, BATCH, INFER, SINK, DEAD_LETTER_SINK)
"""Every stage, in the order of the data path."""
REJECTING = (INGEST, DECODE, BATCH, INFER, SINK)
"""The stages that turn items into dead letters."""


class Instrument(Protocol):
    """What a stage's operator passes its work through (a function, a batch logic builder
    or a sink), with the step id the operator was given: the same work back, measured
    and traced as that stage (see `operators.telemetry.instrument`)."""

    def __call__(self, step_id: str, work: W, /) -> W: ...


def uninstrumented(step_id: str, work: W, /) -> W:
    """The `Instrument` of a flow without telemetry: `work` unchanged."""
    return work


def stage_of(step_id: str) -> str:
    """The stage a step id names: its last part (`streamsight.decode` -> `decode`), as
    operators get their step id with the path of the steps around it."""
    return step_id.rpartition(".")[2]
