"""The extraction run: pairs -> divergence-point activations in HDF5, resumable and shardable.

Batches are fixed blocks of the input (pairs ``[k*B, (k+1)*B)``), shards are contiguous runs of
whole batches, and parts end on batch boundaries, so a resumed run or a merge of shards computes
every batch exactly as a single uninterrupted run does: the datasets are identical.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from steerlab.base.checks import Inputs, output_file, text
from steerlab.base.errors import SteerlabError
from steerlab.base.files import check_unlocked, lock_path, read_text, sole_writer
from steerlab.base.progress import progress_bar
from steerlab.base.shards import ShardPiece, shard_path, shard_range, shard_set
from steerlab.base.version import __version__
from steerlab.extraction.attributes import StoreMeta
from steerlab.extraction.capture import capture_pairs, check_pairs
from steerlab.extraction.store import (
    ActivationFile,
    PartWriter,
    Rows,
    Site,
    activation_files,
    concat_files,
)
from steerlab.model.hooks import HookPoint
from steerlab.model.loading import model_id
from steerlab.model.options import ModelOptions
from steerlab.model.personas import MAX_SYSTEM_PROMPT_CHARS, SystemPrompt, system_prompt_style
from steerlab.model.provenance import provenance
from steerlab.steering.norms import residual_norms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """``extract.yaml``: what to capture and where; relative paths are from the working dir."""

    pairs: Path
    output: Path
    model: ModelOptions = ModelOptions()  # keys model, device, dtype, device_map, n_devices,
    layers: tuple[int, ...] | None = None  # attn_implementation; layers None: every layer
    hook: HookPoint = HookPoint.RESID_POST
    positions: tuple[str, ...] = ("divergence",)
    batch_size: int = 8
    flush_every: int = 64
    system_prompt: str = "you-are-a"
    log_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
                ) -> ExtractConfig:
    """Read and validate an extraction config (YAML), naming the file and field on errors.

    ``overrides`` replace the config's model keys (command-line model flags).

    Examples:
        >>> cfg = load_config("experiments/pirate/extract.yaml")
    """
    src = str(path)
    text = read_text(path, "an extract.yaml config")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise SteerlabError(f"not valid YAML{where}: {problem}", source=src) from None
    if not isinstance(raw, Mapping):
        raise SteerlabError("expected a mapping of settings", source=src)
    _check_texts(raw, "", src)
    known = (set(ExtractConfig.__dataclass_fields__) - {"extra"}) | set(
        ModelOptions.__dataclass_fields__)
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
                not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                        for x in layers):
            raise SteerlabError(f"got {layers!r}; expected 'all' or a list of layer indices "
                                "(counted from 0)", source=src, field="layers")
    positions = raw.get("positions", ["divergence"])
    if isinstance(positions, str):
        positions = [positions]
    if not isinstance(positions, list) or "divergence" not in positions or \
            not set(positions) <= {str(site) for site in Site}:
        raise SteerlabError(f"got {positions!r}; expected [divergence] or [divergence, mean]",
                            source=src, field="positions")
    hook = HookPoint.parse(need("hook", str, "resid_post"), field="hook", source=src)
    for name in ("batch_size", "flush_every"):
        value = need(name, int, 1)
        if value < 1:
            raise SteerlabError(f"got {value}; expected >= 1", source=src, field=name)
    log_file = need("log_file", str, "") or None
    system_prompt_style(need("system_prompt", str, "you-are-a"), "system_prompt", source=src)
    return ExtractConfig(
        pairs=Path(need("pairs", str)), output=Path(need("output", str)),
        model=ModelOptions.from_mapping({**raw, **(overrides or {})}, source=src),
        layers=None if layers in (None, "all") else tuple(layers),
        hook=hook, positions=tuple(positions),
        batch_size=need("batch_size", int, 8), flush_every=need("flush_every", int, 64),
        system_prompt=need("system_prompt", str, "you-are-a"),
        log_file=Path(log_file) if log_file else None,
    )


def _check_texts(value: Any, field: str, src: str) -> None:
    """Every string of a config (keys too) as text a path, a model id or a system prompt can
    be: encodable as UTF-8, no NUL, at most :data:`MAX_SYSTEM_PROMPT_CHARS` characters."""
    if isinstance(value, str):
        text(value, field, max_chars=MAX_SYSTEM_PROMPT_CHARS, source=src)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            name = f"{field}.{key}" if field else str(key)
            if isinstance(key, str):
                text(key, name, max_chars=MAX_SYSTEM_PROMPT_CHARS, source=src)
            _check_texts(item, name, src)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_texts(item, f"{field}[{i}]", src)


def extract(
    model: Any,
    pairs: Sequence[Any],
    output: str | os.PathLike,
    *,
    layers: Sequence[int] | None = None,
    hook: str | HookPoint = HookPoint.RESID_POST,
    mean: bool = False,
    batch_size: int = 8,
    flush_every: int = 64,
    shard: tuple[int, int] = (0, 1),
    system_prompt: SystemPrompt | None = None,
    pairs_file: str = "",
    progress: bool = True,
    available_memory: int | None = None,
) -> Path:
    """Capture every pair (of this shard) into an HDF5 file; resumes an interrupted run.

    Args:
        model: a bridge from :func:`steerlab.load_model`.
        pairs: :class:`steerlab.traits.pairs.Pair` records (all of them, also when sharding).
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
        available_memory: bytes a batch may plan with (default: free on the device, measured
            per batch); a batch that does not fit is captured in parts
            (:func:`steerlab.extraction.capture.capture_positions`).

    Raises:
        SteerlabError: before anything is written, a pair whose rendered sequence is longer
            than the model's context (naming the pair, its length and the limit).

    Examples:
        >>> sl.extract(model, sl.load_pairs("pairs.jsonl"), "pirate.h5", layers=[8, 10])
        PosixPath('pirate.h5')
        >>> sl.ActivationFile("pirate.h5").layers
        (8, 10)
    """
    ids = [str(p.id) for p in pairs]
    if len(set(ids)) != len(ids):
        raise SteerlabError("pair ids are not unique", source=pairs_file or None, field="id")
    check_output(output, shard, {"pairs": pairs_file})
    n_layers = model.cfg.n_layers
    layers = tuple(range(n_layers)) if layers is None else tuple(int(x) for x in layers)
    where = provenance(model)
    hook = HookPoint.parse(hook, field="hook")
    # the unit of norm-unit steering strengths, carried into the fitted vector
    norms = residual_norms(model, layers, point=hook)
    where["resid_norms"] = {str(k): v for k, v in norms.items()}
    meta = StoreMeta(model_id=model_id(model), hook=str(hook), layers=layers,
                     d_model=int(model.cfg.d_model), dtype=where["dtype"], mean=mean,
                     steerlab_version=__version__, pairs_file=str(pairs_file),
                     n_pairs=len(pairs), attn_implementation=where["attn_implementation"],
                     provenance=json.dumps(where), n_layers=n_layers)
    out = shard_path(Path(output), shard)
    start, end = shard_range(len(pairs), batch_size, shard)
    if out.exists():
        have = ActivationFile(out)
        diff = have.meta.mismatch(meta) or (
            None if have.n_pairs == end - start else ("rows", str(have.n_pairs), str(end - start)))
        if diff is None:
            log.info("%s is already complete", out)
            return out
        name, old, new = diff
        raise SteerlabError(f"exists and was captured with other settings: it holds {old}, this "
                            f"run is {new}; delete it or choose another output", source=str(out),
                            field=name)
    # every pair of this shard tokenised once: too long for the context (or for the memory
    # as one row) is refused before the output's parts or lock exist
    check_pairs(model, pairs[start:end], system_prompt=system_prompt,
                source=str(pairs_file) or None)
    with sole_writer(out, WRITING):
        _capture_into(out, model, pairs, meta, range(start, end), layers=layers, hook=hook,
                      mean=mean, batch_size=batch_size, flush_every=flush_every,
                      system_prompt=system_prompt, progress=progress,
                      available_memory=available_memory)
    log.info("wrote %s (%d pairs, %d layers)", out, end - start, len(layers))
    return out


WRITING = "another extract is writing this file"


def check_output(output: str | os.PathLike, shard: tuple[int, int] = (0, 1),
                 inputs: Inputs | None = None) -> Path:
    """The file shard ``shard`` of an extraction into ``output`` writes, checked before the
    model runs: writable, not being written by another extract (naming its PID), and neither
    it, its parts folder nor its lock aliasing one of ``inputs`` (field name to path: the
    pairs file, the config).

    Examples:
        >>> check_output("acts.h5", (0, 1), {"pairs": "pairs.jsonl"})
        PosixPath('acts.h5')
    """
    out = shard_path(Path(output), shard)
    target = output_file(out, "output", inputs=inputs, owns=activation_files(out)[1:])
    check_unlocked(lock_path(target), WRITING)
    return target


def _capture_into(out: Path, model: Any, pairs: Sequence[Any], meta: StoreMeta, rows: range, *,
                  layers: Sequence[int], hook: str | HookPoint, mean: bool, batch_size: int,
                  flush_every: int, system_prompt: SystemPrompt | None, progress: bool,
                  available_memory: int | None) -> None:
    start, end = rows.start, rows.stop
    writer = PartWriter(out, meta, math.ceil(flush_every / batch_size) * batch_size)
    at = start + writer.done
    if writer.done:
        log.info("resuming %s after %d captured pairs", out, writer.done)
    with progress_bar(end - start, out.name, enabled=progress, completed=writer.done) as bar:
        while at < end:
            batch = pairs[at : min(at + batch_size, end)]
            acts = capture_pairs(model, batch, layers, hook=hook, mean=mean,
                                 system_prompt=system_prompt, available_memory=available_memory)
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
    writer.finish()


def merge_shards(shards: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Join shard files into one file equal to a single-process run.

    Files named ``<stem>.shard-IIN-of-NNN.h5`` are put in shard order and checked as a set:
    every missing shard, extra shard and shard captured with other settings is named, one
    line each. Other names are joined in the order given.

    Examples:
        >>> from pathlib import Path
        >>> for i in range(2):
        ...     _ = sl.extract(model, pairs[:4], "out/acts.h5", layers=[10], shard=(i, 2))
        >>> merge_shards(sorted(Path("out").glob("acts.shard-*.h5")), "out/acts.h5")
        PosixPath('out/acts.h5')
    """
    if not shards:
        raise SteerlabError("no shard files given", field="shards")
    files = [ActivationFile(s) for s in shards]
    keys = [SHARD_NAME.search(f.path.name) for f in files]
    if all(keys):
        files = _shard_set(files, [(int(m[1]), int(m[2])) for m in keys])
    meta = files[0].meta
    total = sum(f.n_pairs for f in files)
    if meta.n_pairs and total != meta.n_pairs:
        raise SteerlabError(f"shards hold {total} pairs but the input had {meta.n_pairs}; "
                            "a shard is missing or unfinished", field="shards")
    out = output_file(output, "output", inputs={
        "shards": [p for f in files for p in activation_files(f.path)]})
    if out.exists():
        raise SteerlabError("exists; refusing to overwrite", source=str(out))
    concat_files([f.path for f in files], out, meta)
    return out


SHARD_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)\.h5$")


def _shard_set(files: list[ActivationFile], keys: list[tuple[int, int]]) -> list[ActivationFile]:
    """The shards in order 0..n-1, or an error naming every missing, extra or odd one."""
    first = files[0]
    pieces = []
    for f, (i, n) in zip(files, keys, strict=True):
        diff = first.meta.mismatch(f.meta)
        foreign = (f"shards from different configs: field {diff[0]!r}: {first.path.name} holds "
                   f"{diff[1]}, {f.path.name} holds {diff[2]}") if diff else None
        pieces.append(ShardPiece(f.path.name, i, n, foreign))

    def missing(i: int, n: int) -> str:
        want = shard_path(first.path.with_name(SHARD_NAME.sub(".h5", first.path.name)), (i, n))
        why = "unfinished: " + want.name + ".parts/ holds its capture" if \
            want.with_name(want.name + ".parts").is_dir() else f"no {want.name}"
        return f"shard {i} of {n} is missing or unfinished ({why})"

    ordered, problems = shard_set(pieces, missing)
    if problems:
        raise SteerlabError("\n".join(problems))
    return [next(f for f, p in zip(files, pieces, strict=True) if p is piece) for piece in ordered]
