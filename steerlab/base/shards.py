"""Shards: how one job's work is split over n processes (SLURM array tasks, or by hand).

A shard is ``(i, n)``, 0-based. Work is cut into fixed batches and shard i owns a contiguous
run of whole batches, so a merge of the shards equals one process doing everything, and a
resumed shard recomputes nothing another shard did; :func:`shard_set` is the one check of
what the shards left before a merge. Used by inference runs
(:mod:`steerlab.inference.infer`, :mod:`steerlab.inference.runs`) and activation extraction
(:mod:`steerlab.extraction.extractor`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from steerlab.base.errors import SteerlabError


def parse_shard(spec: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Shard ``(i, n)``: ``"i/n"`` (0-based), else the SLURM array variables, else ``(0, 1)``.

    In an array job, ``SLURM_ARRAY_TASK_COUNT`` is n and i is ``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN`` (divided by ``SLURM_ARRAY_TASK_STEP``), so ``--array=0-7`` and
    ``--array=1-8`` both give shards 0..7; without ``SLURM_ARRAY_TASK_MIN`` the ids are taken
    as 0-based.

    Examples:
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


@dataclass(frozen=True)
class ShardPiece:
    """What one shard left behind (an inference run's marker, an extraction's file)."""

    name: str  # how problem lines name it
    index: int  # i of (i, n)
    count: int  # n of (i, n)
    foreign: str | None = None  # why it belongs to another run or config, else None


def shard_set(pieces: Sequence[ShardPiece], missing: Callable[[int, int], str]
              ) -> tuple[list[ShardPiece], list[str]]:
    """The one check of a set of shards before a merge, for inference runs and extraction
    alike: the pieces in shard order 0..n-1 and one problem line per mixed shard count,
    piece of another run (its ``foreign`` reason), extra or doubled shard, and missing shard
    (``missing(i, n)`` says why). A merge goes ahead only with no problem lines.

    Examples:
        >>> pieces = [ShardPiece("a.0", 0, 2), ShardPiece("a.2", 2, 2)]
        >>> shard_set(pieces, lambda i, n: f"shard {i} of {n} is missing")[1]
        ['extra shard a.2: shard 2 of 2 (shards are 0-1)', 'shard 1 of 2 is missing']
    """
    problems: list[str] = []
    by_n: dict[int, ShardPiece] = {}
    for piece in pieces:
        by_n.setdefault(piece.count, piece)
    if len(by_n) > 1:
        (n0, a), (n1, b) = sorted(by_n.items())[:2]
        problems.append(f"shards from different configs: {a.name} has n={n0} and {b.name} "
                        f"has n={n1}")
    problems += [p.foreign for p in pieces if p.foreign]
    if not pieces or len(by_n) > 1:
        return [], problems
    n = pieces[0].count
    seen: dict[int, ShardPiece] = {}
    for piece in pieces:
        if piece.index >= n:
            problems.append(f"extra shard {piece.name}: shard {piece.index} of {n} (shards "
                            f"are 0-{n - 1})")
        elif piece.index in seen:
            problems.append(f"shard {piece.index} of {n} given twice: "
                            f"{seen[piece.index].name} and {piece.name}")
        else:
            seen[piece.index] = piece
    problems += [missing(i, n) for i in range(n) if i not in seen]
    return ([seen[i] for i in range(n)] if len(seen) == n else []), problems
