"""Telemetry: per-frame traces, Prometheus metrics and GPU sampling, applied where the flow
is wired, outside the stages' own logic: `instrument.StageTelemetry` gives each stage its
spans and metrics by the stage's step id."""
