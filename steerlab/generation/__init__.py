"""Batched generation with per-token metrics: one decode loop, two engines, the lens."""

from steerlab.generation.cache import captures, release_workspaces, workspaces
from steerlab.generation.decode import StepProgram
from steerlab.generation.engine import Engine, bucket_batch, bucket_capacity
from steerlab.generation.generator import (
    Generation,
    NonFiniteError,
    generate,
    generate_with_metrics,
)
from steerlab.generation.host_syncs import count_host_syncs
from steerlab.generation.slots import SlotBatch

__all__ = [
    "Engine", "Generation", "NonFiniteError", "SlotBatch", "StepProgram", "bucket_batch",
    "bucket_capacity", "captures", "count_host_syncs", "generate",
    "generate_with_metrics", "release_workspaces", "workspaces",
]
