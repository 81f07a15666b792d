"""Benchmarks of the pipeline, its stages and its backlog behaviour."""
