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

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from steerlab.base.choice import Choice
from steerlab.generation.cache import static_refusal
from steerlab.model.loading import cache_dir
from steerlab.model.provenance import versions

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

        ``auto`` is static when the static engine can hold the model's cache
        (:func:`steerlab.generation.cache.static_refusal`: HF attention modules, full and
        sliding-window layers) and either the model sits on one GPU where the static engine
        has passed its device check (:func:`proven`; ``steerlab doctor`` runs it) or the
        caller is ``batching`` (a server: continuous batching is what it is for, even on the
        CPU); eager otherwise, and always when ``stepwise`` Python code watches every step.
        Each reason to take eager over static is said once, in one info line.

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
        if stepwise:
            return Engine.EAGER
        refusal = static_refusal(model)
        if refusal:
            _say_once(f"engine auto: eager, not static: {refusal}")
            return Engine.EAGER
        device = next(model.original_model.parameters()).device
        accelerated = one_device(model) and device.type != "cpu"
        if (batching or accelerated) and device.type != "cpu" and not proven(model):
            _say_once(f"engine auto: eager on {device}: the static engine has not passed its "
                      "check on this device for these versions; run `steerlab doctor` there "
                      "to check it and enable it (or pass engine='static')")
            return Engine.EAGER
        return Engine.STATIC if batching or accelerated else Engine.EAGER


_SAID: set[str] = set()


def _say_once(line: str) -> None:
    if line not in _SAID:
        _SAID.add(line)
        log.info("%s", line)


def proof_key(device: torch.device | str, dtype: torch.dtype | str) -> dict[str, Any]:
    """What a static-engine check holds for: the device kind, the dtype, the versions."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return {"device": name, "dtype": str(dtype).removeprefix("torch."), **versions()}


def proof_path(device: torch.device | str, dtype: torch.dtype | str) -> Path:
    """Where a passed static-engine check is recorded
    (:func:`steerlab.generation.static_check.record`), in the cache folder."""
    key = json.dumps(proof_key(device, dtype), sort_keys=True)
    return cache_dir() / "static-engine" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def proven(model: Any) -> bool:
    """Whether the static engine may be ``auto``'s choice on ``model``'s device: always on the
    CPU (the test suite runs the same check), elsewhere once
    :func:`steerlab.generation.static_check.check_static` passed there for this dtype and
    these versions (``steerlab doctor`` runs it and records the pass)."""
    p = next(model.original_model.parameters())
    return p.device.type == "cpu" or proof_path(p.device, p.dtype).is_file()


def one_device(model: Any) -> bool:
    """Whether all the weights are on one device (a graph cannot span a split model)."""
    return len({p.device for p in model.original_model.parameters()}) == 1


def bucket_batch(n: int) -> int:
    """Batch rows rounded up to a power of two, so a few captured graphs serve every batch."""
    return 1 << max(0, (n - 1).bit_length())


def bucket_capacity(n: int) -> int:
    """KV-cache positions rounded up to a power of two, at least 128."""
    return max(128, 1 << max(0, (n - 1).bit_length()))
