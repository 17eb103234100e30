"""Files of a persona inference run: crash-safe batch parts, ``results.json``, ``per_token.h5``.

Every finished batch is committed as one small HDF5 part (written to a temporary name, then
renamed) holding its records and per-token arrays, so a crash, even SIGKILL, loses at most the
batch under way and a rerun skips committed batches. After each batch ``results.json`` is
rewritten atomically; at the end the parts are concatenated into ``per_token.h5``.

A run may be split into shards that share one folder: each commits its own batches and
writes ``shards/shard-IIII-of-NNNN.json`` when done, and :func:`steerlab.inference.runs.merge_run`
then
writes ``results.json`` and ``per_token.h5`` exactly as a single process would.

``per_token.h5`` layout (rows are results in ``results.json`` order)::

    attrs: format, model, n_layers, top_k_mass_k, lens, provenance (a JSON string)
    record_id [n]  offset [n]  length [n]          (int64; a row's tokens are offset:offset+length)
    tokens [N] int32   entropy [N] float32   top_k_mass [N] float32
    lens_entropy [N, n_layers] float32   lens_top_k_mass [N, n_layers]   (only with --lens)

``activations.h5`` (only with ``--capture-layers``; rows in the same order; see
:mod:`steerlab.inference.activations`)::

    attrs: format, model, d_model, layers (int64 array), provenance (a JSON string)
    record_id [n] int64
    reply [n, n_layers_captured, d_model] float32   thinking [same]   output [same]   (NaN: empty)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerlab.base.errors import SteerlabError
from steerlab.base.files import PartsDir, atomic_path, h5py, open_h5, read_json

FORMAT = "steerlab.per_token/1"
ACTIVATIONS_FORMAT = "steerlab.activations.run/1"
RESULTS, CONFIG, PER_TOKEN, PARTS, LOG, SHARDS, LOCK = (
    "results.json", "config.json", "per_token.h5", "parts", "infer.log", "shards", ".lock",
)
CONFIG_LOCK, ACTIVATIONS = ".config.lock", "activations.h5"
ARRAYS = ("tokens", "entropy", "top_k_mass", "lens_entropy", "lens_top_k_mass")
SECTIONS = ("reply", "thinking", "output")  # the mean residual of each, in activations.h5
RUN_FILES = (CONFIG, RESULTS, PER_TOKEN, ACTIVATIONS, PARTS, SHARDS, LOG, LOCK, CONFIG_LOCK)


def run_files(root: str | os.PathLike) -> tuple[Path, ...]:
    """Every file and folder an inference run owns in its folder: what no output of another
    command may alias (``report.html`` is not one: ``steerlab report`` writes it there).

    Examples:
        >>> output_file("out.html", "output", inputs={"results_dir": run_files("logs/run")})
    """
    return tuple(Path(root) / name for name in RUN_FILES)


class RunStore:
    """The output folder of one run: committed parts, results and the final per-token file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.parts = PartsDir(self.root / PARTS, "batch", "h5")

    def config(self) -> dict[str, Any]:
        """The run's ``config.json``."""
        return read_json(self.root / CONFIG, "a run's config.json")

    def marker(self, shard: tuple[int, int]) -> Path:
        """``shards/shard-IIII-of-NNNN.json``: written when shard ``(i, n)`` has finished."""
        return self.root / SHARDS / f"shard-{shard[0]:04d}-of-{shard[1]:04d}.json"

    def complete(self) -> bool:
        """Whether the run is finished (``per_token.h5`` written, parts removed)."""
        return (self.root / PER_TOKEN).is_file() and not self.parts.exists()

    def done_batches(self) -> set[int]:
        """Indices of committed batches."""
        return {key[0] for key in self.parts.keys()}

    def commit(self, batch: int, records: Sequence[dict], arrays: Sequence[dict],
               activations: dict[str, np.ndarray] | None = None) -> None:
        """Commit one batch: its records, per record the per-token arrays, and the captured
        ``{"reply", "thinking", "output"}`` means (``[batch, layer, d_model]``) if any."""
        with self.parts.commit(batch) as tmp, h5py().File(tmp, "w") as f:
            for name, value in (activations or {}).items():
                f[f"act_{name}"] = np.asarray(value, dtype=np.float32)
            f.attrs["records"] = json.dumps(list(records), ensure_ascii=False)
            lengths = [len(a["tokens"]) for a in arrays]
            f["length"] = np.asarray(lengths, dtype=np.int64)
            for name in ARRAYS:
                if arrays and arrays[0].get(name) is not None:
                    f[name] = np.concatenate([np.asarray(a[name]) for a in arrays])

    def records(self) -> list[dict]:
        """All committed records, in batch order."""
        out: list[dict] = []
        for part in self.parts.paths():
            with h5py().File(part, "r") as f:
                out.extend(json.loads(f.attrs["records"]))
        return out

    def finalize(self, attrs: dict[str, Any],
                 activation_attrs: dict[str, Any] | None = None) -> Path:
        """Concatenate the parts into ``per_token.h5`` and, given ``activation_attrs`` (a run
        with capture), ``activations.h5`` (each atomically), then remove the parts."""
        if activation_attrs is not None:
            self._write_activations(activation_attrs)
        h5 = h5py()
        with atomic_path(self.root / PER_TOKEN) as tmp, h5.File(tmp, "w") as out:
            out.attrs.update({"format": FORMAT, **attrs})
            ids, lengths, data = [], [], {name: [] for name in ARRAYS}
            for part in self.parts.paths():
                with h5.File(part, "r") as f:
                    ids += [r["id"] for r in json.loads(f.attrs["records"])]
                    lengths.append(f["length"][:])
                    for name in ARRAYS:
                        if name in f:
                            data[name].append(f[name][:])
            length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
            out["record_id"] = np.asarray(ids, dtype=np.int64)
            out["length"] = length
            out["offset"] = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
            for name, blocks in data.items():
                if blocks:
                    out.create_dataset(name, data=np.concatenate(blocks), chunks=True)
        self.parts.remove()
        return self.root / PER_TOKEN

    def _write_activations(self, attrs: dict[str, Any]) -> None:
        h5 = h5py()
        ids: list[int] = []
        data: dict[str, list[np.ndarray]] = {name: [] for name in SECTIONS}
        for part in self.parts.paths():
            with h5.File(part, "r") as f:
                ids += [r["id"] for r in json.loads(f.attrs["records"])]
                for name in SECTIONS:
                    data[name].append(f[f"act_{name}"][:])
        arrays = {name: np.concatenate(blocks) for name, blocks in data.items()}
        with atomic_path(self.root / ACTIVATIONS) as tmp, h5.File(tmp, "w") as out:
            out.attrs.update({"format": ACTIVATIONS_FORMAT, **attrs,
                              "d_model": arrays["reply"].shape[-1]})
            out["record_id"] = np.asarray(ids, dtype=np.int64)
            for name, value in arrays.items():
                out.create_dataset(name, data=value, chunks=True)


def load_results(path: str | os.PathLike) -> list[dict]:
    """Records of a run: ``path`` is its folder or its ``results.json``.

    Examples:
        >>> rows = sl.load_results("logs/run")  # one prompt answered by the assistant
        >>> len(rows), rows[0]["persona"], rows[0]["n_tokens"] <= 8
        (1, 'assistant', True)
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    data = read_json(path, "a run's results.json")
    if not isinstance(data, list):
        raise SteerlabError("expected a JSON list of result records", source=str(path))
    return data


def read_per_token(path: str | os.PathLike, record_id: int) -> dict[str, np.ndarray]:
    """Per-token arrays of one result (by its ``id``) from ``per_token.h5`` or a run folder.

    Examples:
        >>> rows = sl.load_results("logs/run")
        >>> arrays = read_per_token("logs/run", rows[0]["id"])
        >>> arrays["lens_entropy"].shape == (rows[0]["n_tokens"], model.cfg.n_layers)
        True
    """
    path = Path(path)
    if path.is_dir():
        path = path / PER_TOKEN
    if not path.is_file():
        raise SteerlabError("no per-token file (is the run finished?)", source=str(path))
    with open_h5(path, "a run's per_token.h5") as f:
        where = np.flatnonzero(f["record_id"][:] == record_id)
        if not len(where):
            raise SteerlabError(f"no record with id {record_id}", source=str(path), field="id")
        row = int(where[0])
        start, n = int(f["offset"][row]), int(f["length"][row])
        return {name: f[name][start : start + n] for name in ARRAYS if name in f}


@dataclass(frozen=True)
class RunActivations:
    """The captured activations of a run (``activations.h5``): per result (``record_id``, in
    ``results.json`` order) and captured layer (``layers``), the mean ``resid_post`` over the
    reply, its thinking and its output (``[n, len(layers), d_model]`` float32; NaN where the
    section is empty)."""

    record_id: np.ndarray
    layers: tuple[int, ...]
    reply: np.ndarray
    thinking: np.ndarray
    output: np.ndarray
    model: str


def read_activations(path: str | os.PathLike) -> RunActivations:
    """The activations a run captured (``steerlab infer --capture-layers``): ``path`` is its
    folder or its ``activations.h5``.

    Examples:
        >>> config = sl.InferConfig(max_tokens=4, capture_layers=(8, -1))
        >>> run = sl.run_inference(model, ["Hi!"], [sl.ASSISTANT], "logs/acts", config,
        ...                        progress=False)
        >>> acts = sl.read_activations(run)
        >>> acts.layers, acts.reply.shape  # -1: the last of the model's 30 layers
        ((8, 29), (1, 2, 576))
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ACTIVATIONS).is_file():
            raise SteerlabError(f"the run at {path} has no captured activations (run steerlab "
                                "infer with --capture-layers)", source=str(path))
        path = path / ACTIVATIONS
    with open_h5(path, "a run's activations.h5") as f:
        if f.attrs.get("format") != ACTIVATIONS_FORMAT or any(
                name not in f for name in ("record_id", *SECTIONS)):
            raise SteerlabError(f"not a run's activation file (expected format "
                                f"{ACTIVATIONS_FORMAT!r})", source=str(path))
        return RunActivations(f["record_id"][:], tuple(int(x) for x in f.attrs["layers"]),
                              *(f[name][:] for name in SECTIONS), model=str(f.attrs["model"]))
