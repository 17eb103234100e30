"""Generation engines: which one runs (:class:`Engine`, the one rule of ``auto``) and the
buckets the static engine rounds batch sizes and lengths up to.

``eager`` is the classic loop: HF's growing ``DynamicCache`` and one Python-driven forward per
step. ``static`` preallocates a KV cache of fixed capacity
(:class:`steerlab.generation.cache.SlotCache`, one slot per batch row, each with its own write
position), rounds batch sizes and lengths up to a few buckets (:func:`bucket_batch`,
:func:`bucket_capacity`) and keeps every per-call value (input ids, positions, masks, steering
deltas, strengths, sampling parameters, finished rows) in tensors that live in a
:class:`steerlab.generation.cache.Workspace` reused across calls. On CUDA the decode step is
captured once per bucket as a CUDA graph and replayed (:mod:`steerlab.generation.graphs`); on
the CPU the same step runs without a graph, so the tests exercise the same code.
"""

from __future__ import annotations

import logging
from typing import Any

from steerlab.base.choice import Choice

log = logging.getLogger(__name__)


class Engine(Choice):
    """How generation runs: ``eager`` (growing cache, one Python step at a time), ``static``
    (preallocated cache, step captured as a CUDA graph on GPUs), ``auto`` (the rule of
    :meth:`resolve`)."""

    AUTO = "auto"
    EAGER = "eager"
    STATIC = "static"

    def resolve(self, model: Any, *, batching: bool = False, stepwise: bool = False) -> Engine:
        """The concrete engine for ``model``: the one rule of ``auto``.

        ``auto`` is static when the model runs HF attention kernels (the static engine's
        need) and either it sits on one CUDA device (where a graph pays) or the caller is
        ``batching`` (a server: continuous batching is what it is for, even on the CPU);
        eager otherwise, and always when ``stepwise`` Python code watches every step.

        Args:
            model: a bridge from :func:`steerlab.load_model`.
            batching: a server batching requests into one running batch.
            stepwise: an observer or step listener is told every step (nothing to replay).

        Examples:
            >>> sl.Engine.AUTO.resolve(model, batching=True)  # HF attention kernels: static
            <Engine.STATIC: 'static'>
            >>> sl.Engine.AUTO.resolve(model)  # one request at a time on the CPU: eager
            <Engine.EAGER: 'eager'>
        """
        if self is not Engine.AUTO:
            return self
        if stepwise or not hf_attention(model):
            return Engine.EAGER
        on_cuda = one_device(model) and \
            next(model.original_model.parameters()).device.type == "cuda"
        return Engine.STATIC if batching or on_cuda else Engine.EAGER


def one_device(model: Any) -> bool:
    """Whether all the weights are on one device (a graph cannot span a split model)."""
    return len({p.device for p in model.original_model.parameters()}) == 1


def hf_attention(model: Any) -> bool:
    """Whether the model runs HF's attention modules (any kernel but the bridge's eager
    re-implementation), which the static engine needs: they accept its cache and 4-D mask."""
    return getattr(model.original_model.config, "_attn_implementation", "eager") != "eager"


def bucket_batch(n: int) -> int:
    """Batch rows rounded up to a power of two, so a few captured graphs serve every batch."""
    return 1 << max(0, (n - 1).bit_length())


def bucket_capacity(n: int) -> int:
    """KV-cache positions rounded up to a power of two, at least 128."""
    return max(128, 1 << max(0, (n - 1).bit_length()))
