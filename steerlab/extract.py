"""The extraction run: pairs -> divergence-point activations in HDF5, resumable and shardable.

Batches are fixed blocks of the input (pairs ``[k*B, (k+1)*B)``), shards are contiguous runs of
whole batches, and parts end on batch boundaries, so a resumed run or a merge of shards computes
every batch exactly as a single uninterrupted run does: the datasets are identical.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from steerlab.capture import HOOK_POINTS, capture_pairs
from steerlab.errors import SteerlabError
from steerlab.personas import SystemPrompt
from steerlab.store import ActivationFile, PartWriter, Rows, StoreMeta, concat_files

log = logging.getLogger(__name__)

POSITIONS = ("divergence", "mean")


@dataclass(frozen=True)
class ExtractConfig:
    """``extract.yaml``: what to capture and where; relative paths are from the working dir."""

    pairs: Path
    output: Path
    model: str = "embedded"
    layers: tuple[int, ...] | None = None  # None: every layer
    n_devices: int = 1
    dtype: str = "float32"
    device: str | None = None
    hook: str = "resid_post"
    positions: tuple[str, ...] = ("divergence",)
    batch_size: int = 8
    flush_every: int = 64
    system_prompt: str = "you-are-a"
    log_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_config(path: str | os.PathLike) -> ExtractConfig:
    """Read and validate an extraction config (YAML), naming the file and field on errors.

    Example:
        >>> cfg = load_config("experiments/pirate/extract.yaml")
    """
    src = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SteerlabError("config file not found", source=src) from None
    except yaml.YAMLError as err:
        raise SteerlabError(f"not valid YAML ({err})", source=src) from None
    if not isinstance(raw, Mapping):
        raise SteerlabError("expected a mapping of settings", source=src)
    known = set(ExtractConfig.__dataclass_fields__) - {"extra"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SteerlabError(f"unknown setting(s) {unknown}; expected some of {sorted(known)}",
                            source=src, field=unknown[0])

    def need(name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = raw.get(name, default)
        if value is None and default is None and name in ("pairs", "output"):
            raise SteerlabError("required", source=src, field=name)
        if value is not None and not isinstance(value, kind) or isinstance(value, bool) and \
                kind is int:
            raise SteerlabError(f"got {value!r}; expected {getattr(kind, '__name__', kind)}",
                                source=src, field=name)
        return value

    layers = raw.get("layers")
    if layers is not None and layers != "all":
        if not isinstance(layers, list) or not layers or \
                not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise SteerlabError(f"got {layers!r}; expected 'all' or a list of layer indices",
                                source=src, field="layers")
    positions = raw.get("positions", ["divergence"])
    if isinstance(positions, str):
        positions = [positions]
    if not isinstance(positions, list) or "divergence" not in positions or \
            not set(positions) <= set(POSITIONS):
        raise SteerlabError(f"got {positions!r}; expected [divergence] or [divergence, mean]",
                            source=src, field="positions")
    hook = need("hook", str, "resid_post")
    if hook not in HOOK_POINTS:
        raise SteerlabError(f"got {hook!r}; expected one of {sorted(HOOK_POINTS)}",
                            source=src, field="hook")
    for name in ("batch_size", "flush_every", "n_devices"):
        value = need(name, int, 1)
        if value < 1:
            raise SteerlabError(f"got {value}; expected >= 1", source=src, field=name)
    log_file = need("log_file", str, "") or None
    return ExtractConfig(
        pairs=Path(need("pairs", str)), output=Path(need("output", str)),
        model=need("model", str, "embedded"),
        layers=None if layers in (None, "all") else tuple(layers),
        n_devices=need("n_devices", int, 1), dtype=need("dtype", str, "float32"),
        device=need("device", str, "") or None, hook=hook, positions=tuple(positions),
        batch_size=need("batch_size", int, 8), flush_every=need("flush_every", int, 64),
        system_prompt=need("system_prompt", str, "you-are-a"),
        log_file=Path(log_file) if log_file else None,
    )


def parse_shard(spec: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``"i/n"`` (0-based), else ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``, else 0/1."""
    env = os.environ if env is None else env
    if spec is None and "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        spec = f"{env['SLURM_ARRAY_TASK_ID']}/{env['SLURM_ARRAY_TASK_COUNT']}"
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SteerlabError(f"got {spec!r}; expected i/n like 0/8", field="shard") from None
    if not (n >= 1 and 0 <= i < n):
        raise SteerlabError(f"got {spec!r}; expected 0 <= i < n", field="shard")
    return i, n


def shard_range(n_pairs: int, batch_size: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Rows ``[start, end)`` of a shard: a contiguous run of whole batches."""
    i, n = shard
    n_batches = math.ceil(n_pairs / batch_size)
    lo, hi = n_batches * i // n, n_batches * (i + 1) // n
    return min(lo * batch_size, n_pairs), min(hi * batch_size, n_pairs)


def shard_path(output: Path, shard: tuple[int, int]) -> Path:
    """Where shard ``i/n`` writes: ``acts.h5`` -> ``acts.shard-002-of-008.h5`` (n > 1)."""
    i, n = shard
    if n == 1:
        return Path(output)
    return Path(output).with_name(f"{Path(output).stem}.shard-{i:03d}-of-{n:03d}.h5")


def extract(
    model: Any,
    pairs: Sequence[Any],
    output: str | os.PathLike,
    *,
    layers: Sequence[int] | None = None,
    hook: str = "resid_post",
    mean: bool = False,
    batch_size: int = 8,
    flush_every: int = 64,
    shard: tuple[int, int] = (0, 1),
    system_prompt: SystemPrompt | None = None,
    pairs_file: str = "",
    progress: bool = True,
) -> Path:
    """Capture every pair (of this shard) into an HDF5 file; resumes an interrupted run.

    Args:
        model: a bridge from :func:`steerlab.load_model`.
        pairs: :class:`steerlab.pairs.Pair` records (all of them, also when sharding).
        output: the final file; shards write ``shard_path(output, shard)``.
        layers: decoder layers (default all).
        hook: ``resid_post`` (default), ``resid_pre`` or ``resid_mid``.
        mean: also store the mean over each response's tokens.
        batch_size: pairs per forward pass (2x sequences).
        flush_every: commit to disk every this many pairs (rounded up to whole batches).
        shard: ``(i, n)`` to capture only shard i of n.
        system_prompt: system prompt style used to render the chat (default ``you-are-a``).
        pairs_file: recorded as provenance.
        progress: show a progress bar.

    Example:
        >>> extract(model, load_pairs("data/pairs/pirate.jsonl"), "acts.h5", layers=[8, 10])
    """
    from tqdm.auto import tqdm

    import steerlab
    from steerlab.models import model_id

    ids = [str(p.id) for p in pairs]
    if len(set(ids)) != len(ids):
        raise SteerlabError("pair ids are not unique", source=pairs_file or None, field="id")
    n_layers = model.cfg.n_layers
    layers = tuple(range(n_layers)) if layers is None else tuple(int(x) for x in layers)
    meta = StoreMeta(model_id=model_id(model), hook=hook, layers=layers,
                     d_model=int(model.cfg.d_model), dtype=str(model.cfg.dtype).removeprefix(
                         "torch."), mean=mean, steerlab_version=steerlab.__version__,
                     pairs_file=str(pairs_file), n_pairs=len(pairs))
    out = shard_path(Path(output), shard)
    start, end = shard_range(len(pairs), batch_size, shard)
    if out.exists():
        have = ActivationFile(out)
        if have.meta == meta and have.n_pairs == end - start:
            log.info("%s is already complete", out)
            return out
        raise SteerlabError("exists and was captured with other settings; delete it or choose "
                            "another output", source=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = PartWriter(out, meta, math.ceil(flush_every / batch_size) * batch_size)
    at = start + writer.done
    bar = tqdm(total=end - start, initial=writer.done, unit="pair", disable=not progress,
               desc=out.name)
    if writer.done:
        log.info("resuming %s after %d captured pairs", out, writer.done)
    while at < end:
        batch = pairs[at : min(at + batch_size, end)]
        acts = capture_pairs(model, batch, layers, hook=hook, mean=mean,
                             system_prompt=system_prompt)
        t = acts.tokens
        writer.add(Rows(
            pair_id=[str(p.id) for p in batch], chosen=acts.chosen.cpu().numpy(),
            rejected=acts.rejected.cpu().numpy(),
            divergence=np.array([x.divergence for x in t]),
            chosen_length=np.array([len(x.chosen) for x in t]),
            rejected_length=np.array([len(x.rejected) for x in t]),
            response_start=np.array([x.response_start for x in t]),
            chosen_mean=None if acts.chosen_mean is None else acts.chosen_mean.cpu().numpy(),
            rejected_mean=None if acts.rejected_mean is None else
            acts.rejected_mean.cpu().numpy(),
        ))
        at += len(batch)
        bar.update(len(batch))
    bar.close()
    writer.finish()
    log.info("wrote %s (%d pairs, %d layers)", out, end - start, len(layers))
    return out


def merge_shards(shards: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Join shard files (in order ``0..n-1``) into one file equal to a single-process run.

    Example:
        >>> merge_shards(sorted(Path("out").glob("acts.shard-*.h5")), "out/acts.h5")
    """
    if not shards:
        raise SteerlabError("no shard files given", field="shards")
    files = [ActivationFile(s) for s in shards]
    meta = files[0].meta
    total = sum(f.n_pairs for f in files)
    if meta.n_pairs and total != meta.n_pairs:
        raise SteerlabError(f"shards hold {total} pairs but the input had {meta.n_pairs}; "
                            "a shard is missing or unfinished", field="shards")
    out = Path(output)
    if out.exists():
        raise SteerlabError("exists; refusing to overwrite", source=str(out))
    concat_files([f.path for f in files], out, meta)
    return out
