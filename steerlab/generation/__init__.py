"""Batched generation with per-token metrics: one decode loop, two engines, the lens."""

from steerlab.generation.engine import Engine
from steerlab.generation.generate import Generation, NonFiniteError, generate, generate_with_metrics

__all__ = [
    "Engine", "Generation", "NonFiniteError", "generate", "generate_with_metrics",
]
