"""Shards: how one job's work is split over n processes (SLURM array tasks, or by hand).

A shard is ``(i, n)``, 0-based. Work is cut into fixed batches and shard i owns a contiguous
run of whole batches, so a merge of the shards equals one process doing everything, and a
resumed shard recomputes nothing another shard did. Used by inference runs
(:mod:`steerlab.inference.infer`, :mod:`steerlab.inference.runs`) and activation extraction
(:mod:`steerlab.extraction.extract`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from steerlab.base.errors import SteerlabError


def parse_shard(spec: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Shard ``(i, n)``: ``"i/n"`` (0-based), else the SLURM array variables, else ``(0, 1)``.

    In an array job, ``SLURM_ARRAY_TASK_COUNT`` is n and i is ``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN`` (divided by ``SLURM_ARRAY_TASK_STEP``), so ``--array=0-7`` and
    ``--array=1-8`` both give shards 0..7; without ``SLURM_ARRAY_TASK_MIN`` the ids are taken
    as 0-based.

    Example:
        >>> parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
        ...                    "SLURM_ARRAY_TASK_COUNT": "3"})
        (2, 3)
    """
    env = os.environ if env is None else env
    if spec is None and "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                 "SLURM_ARRAY_TASK_STEP")
        got = " ".join(f"{k}={env[k]}" for k in names if k in env)
        try:
            task, n = int(env[names[0]]), int(env[names[1]])
            low, step = int(env.get(names[2], 0)), int(env.get(names[3], 1) or 1)
        except ValueError:
            raise SteerlabError(f"got {got}; expected integers", field="shard") from None
        i, rest = divmod(task - low, step)
        if rest or not (n >= 1 and 0 <= i < n):
            raise SteerlabError(f"got {got}, shard {(task - low) / step:g} of {n}; expected an "
                                "array numbered 0..n-1 or 1..n (or pass --shard i/n)",
                                field="shard")
        return i, n
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SteerlabError(f"got {spec!r}; expected i/n like 0/8", field="shard") from None
    if not (n >= 1 and 0 <= i < n):
        raise SteerlabError(f"got {spec!r}; expected 0 <= i < n", field="shard")
    return i, n


def shard_batches(n_batches: int, shard: tuple[int, int]) -> range:
    """Batch indices of shard ``(i, n)``: a contiguous run of whole batches (maybe empty)."""
    i, n = shard
    return range(n_batches * i // n, n_batches * (i + 1) // n)


def shard_range(n_pairs: int, batch_size: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Rows ``[start, end)`` of a shard: a contiguous run of whole batches."""
    own = shard_batches(math.ceil(n_pairs / batch_size), shard)
    return min(own.start * batch_size, n_pairs), min(own.stop * batch_size, n_pairs)


def shard_path(output: Path, shard: tuple[int, int]) -> Path:
    """Where shard ``i/n`` writes: ``acts.h5`` -> ``acts.shard-002-of-008.h5`` (n > 1)."""
    i, n = shard
    if n == 1:
        return Path(output)
    return Path(output).with_name(f"{Path(output).stem}.shard-{i:03d}-of-{n:03d}.h5")
