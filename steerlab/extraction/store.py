"""HDF5 store of divergence-point activations: crash-safe incremental writing, shards, reading.

A run writes its rows in *parts*: every ``flush_every`` pairs a small HDF5 file is written to a
temporary name and renamed into ``<output>.parts/``, so a crash (even SIGKILL) loses at most the
part being written and never damages a finished one. A rerun resumes after the last part. When
all rows are in, the parts are concatenated into ``<output>`` (again via a temporary file and
``os.replace``) and the parts folder is removed. Shard files merge the same way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerlab.base.choice import Choice
from steerlab.base.errors import SteerlabError
from steerlab.base.files import PartsDir, atomic_path, h5py, lock_path, read_json, write_json_atomic
from steerlab.extraction.attributes import FORMAT, StoreMeta

log = logging.getLogger(__name__)


class Site(Choice):
    """Which activations of a pair: at the divergence token, or averaged over the response
    (the ``positions`` of an extraction config)."""

    DIVERGENCE = "divergence"
    MEAN = "mean"

    def datasets(self) -> tuple[str, str]:
        """The file's ``(chosen, rejected)`` dataset names for this site."""
        suffix = "_mean" if self is Site.MEAN else ""
        return f"chosen{suffix}", f"rejected{suffix}"

ACTS = ("chosen", "rejected", "chosen_mean", "rejected_mean")
INDEX = ("divergence", "chosen_length", "rejected_length", "response_start")


def _devices(provenance: str) -> list[str]:
    try:
        return list(json.loads(provenance).get("devices", [])) if provenance else []
    except (json.JSONDecodeError, AttributeError):
        return []


@dataclass(frozen=True)
class Rows:
    """A block of captured rows, numpy arrays with the pair axis first."""

    pair_id: list[str]
    chosen: np.ndarray
    rejected: np.ndarray
    divergence: np.ndarray
    chosen_length: np.ndarray
    rejected_length: np.ndarray
    response_start: np.ndarray
    chosen_mean: np.ndarray | None = None
    rejected_mean: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pair_id)


def _concat_rows(blocks: Sequence[Rows]) -> Rows:
    def cat(name: str) -> Any:
        vals = [getattr(b, name) for b in blocks]
        return None if vals[0] is None else np.concatenate(vals)

    ids = [i for b in blocks for i in b.pair_id]
    names = [n for n in Rows.__dataclass_fields__ if n != "pair_id"]
    return Rows(ids, **{n: cat(n) for n in names})


def _chunk_rows(n_layers: int, d_model: int) -> int:
    return max(1, min(256, (1 << 20) // max(1, n_layers * d_model * 4)))


def _create(f: Any, meta: StoreMeta, n: int) -> None:
    shape = (n, len(meta.layers), meta.d_model)
    chunk = (min(max(n, 1), _chunk_rows(*shape[1:])), *shape[1:])
    names = ACTS if meta.mean else ACTS[:2]
    for name in names:
        f.create_dataset(name, shape=shape, maxshape=(None, *shape[1:]), dtype="float32",
                         chunks=chunk)
    for name in INDEX:
        f.create_dataset(name, shape=(n,), maxshape=(None,), dtype="int64", chunks=True)
    f.create_dataset("pair_id", shape=(n,), maxshape=(None,), dtype=h5py().string_dtype(),
                     chunks=True)
    f.create_dataset("layers", data=np.asarray(meta.layers, dtype="int64"))
    f.attrs.update(meta.attrs())


def _write(f: Any, rows: Rows, at: int) -> None:
    end = at + len(rows)
    for name in (*ACTS, *INDEX):
        value = getattr(rows, name)
        if name in f and value is not None:
            f[name][at:end] = value
    f["pair_id"][at:end] = rows.pair_id


def write_rows_file(path: Path, meta: StoreMeta, rows: Rows) -> None:
    """Write rows to a complete HDF5 file atomically (temporary name, then ``os.replace``)."""
    with atomic_path(path) as tmp, h5py().File(tmp, "w") as f:
        _create(f, meta, len(rows))
        _write(f, rows, 0)


def concat_files(sources: Sequence[Path], output: Path, meta: StoreMeta) -> None:
    """Concatenate row files (parts or shards) into ``output``, streaming one at a time."""
    total = sum(ActivationFile(s).n_pairs for s in sources)
    with atomic_path(output) as tmp, h5py().File(tmp, "w") as out:
        _create(out, meta, total)
        at = 0
        for src in sources:
            part = ActivationFile(src)
            diff = part.meta.mismatch(meta, ("model_id", "hook", "layers", "d_model", "mean"))
            if diff:
                name, have, want = diff
                raise SteerlabError(f"captured with {have}, the other inputs with {want}",
                                    source=str(src), field=name)
            for rows in part.iter_rows(256):
                _write(out, rows, at)
                at += len(rows)


def parts_path(output: str | os.PathLike) -> Path:
    """The parts folder of an activation file being written: ``<output>.parts/``."""
    return Path(output).with_name(Path(output).name + ".parts")


def activation_files(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """What an activation file owns: the file, its parts folder while it is being written
    and the lock of its writer (``.<name>.lock``); what no other output may alias.

    Examples:
        >>> output_file("v.json", "output", inputs={"activations": activation_files("acts.h5")})
    """
    return Path(path), parts_path(path), lock_path(path)


class PartWriter:
    """Buffers rows and commits them as parts in ``<output>.parts/``; resumable.

    Args:
        output: the final file.
        meta: provenance written into every part and the final file.
        flush_every: commit a part once this many rows are buffered.
    """

    def __init__(self, output: Path, meta: StoreMeta, flush_every: int):
        self.output = Path(output)
        self.meta = meta
        self.flush_every = max(1, flush_every)
        self.parts = PartsDir(parts_path(self.output), "part", "h5", width=9)
        self._buffer: list[Rows] = []
        self._stamp: Path | None = None
        self._check_meta()
        self.parts.sweep()
        self.done = self._committed()

    @property
    def dir(self) -> Path:
        """The parts folder, ``<output>.parts/``."""
        return self.parts.root

    def _check_meta(self) -> None:
        stamp = self.dir / "meta.json"
        if stamp.is_file():
            have = StoreMeta.from_attrs(read_json(stamp, "the parts' meta.json"), str(stamp))
            diff = have.mismatch(self.meta)
            if diff:
                name, old, new = diff
                raise SteerlabError(
                    f"an unfinished run with different settings is in {self.dir}: it holds "
                    f"{old}, this run is {new}; rerun with the same settings or delete that "
                    "folder", source=str(self.output), field=name)
            before, now = (_devices(m.provenance) for m in (have, self.meta))
            if before != now:
                log.warning("resuming %s on %s (its earlier parts ran on %s)", self.output,
                            ", ".join(now) or "?", ", ".join(before) or "?")
        else:  # written with the first part: a start that fails leaves no folder behind
            self._stamp = stamp

    def _committed(self) -> int:
        at = 0
        for start, end in self.parts.keys():
            if start != at:
                raise SteerlabError(f"parts are not contiguous at row {at} "
                                    f"({self.parts.path(start, end).name}); delete {self.dir} "
                                    "and rerun", source=str(self.output))
            at = end
        return at

    def add(self, rows: Rows) -> None:
        """Buffer rows; commit a part when ``flush_every`` rows are waiting."""
        self._buffer.append(rows)
        if sum(len(b) for b in self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered rows as one part."""
        if not self._buffer:
            return
        rows = _concat_rows(self._buffer)
        if self._stamp is not None:
            write_json_atomic(self._stamp, self.meta.attrs())
            self._stamp = None
        start, end = self.done, self.done + len(rows)
        with self.parts.commit(start, end) as tmp:
            write_rows_file(tmp, self.meta, rows)
        self.done = end
        self._buffer = []
        log.debug("committed rows %d..%d", start, end)

    def finish(self) -> Path:
        """Flush, concatenate the parts into the output file and remove the parts folder."""
        self.flush()
        concat_files(self.parts.paths(), self.output, self.meta)
        self.parts.remove()
        return self.output


class ActivationFile:
    """Streaming reader of an activation file (or part, or shard); validates it on open.

    Examples:
        >>> acts = sl.ActivationFile("acts.h5")  # 8 pairs, layers 10 and 12
        >>> for chosen, rejected in acts.iter_batches(64):
        ...     print(chosen.shape)  # [batch, layer, d_model]
        torch.Size([8, 2, 576])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        src = str(self.path)
        if self.path.is_dir():
            raise SteerlabError("is a folder; expected a steerlab activation file", source=src)
        if not self.path.is_file():
            raise SteerlabError("no such file (expected a steerlab activation file)", source=src)
        try:
            with h5py().File(self.path, "r") as f:
                if "format" not in f.attrs:
                    raise SteerlabError(f"expected attribute format={FORMAT!r}; not a steerlab "
                                        "activation file", source=src)
                self.meta = StoreMeta.from_attrs(f.attrs, src)
                need = [*(ACTS if self.meta.mean else ACTS[:2]), *INDEX, "pair_id", "layers"]
                for name in need:
                    if not isinstance(f.get(name), h5py().Dataset):
                        raise SteerlabError("dataset missing", source=src, field=name)
                self.n_pairs = int(f["chosen"].shape[0])
                self._check_rows(f, src)
                want = (self.n_pairs, len(self.meta.layers), self.meta.d_model)
                for name in need[: 2 + 2 * self.meta.mean]:
                    if tuple(f[name].shape) != want:
                        raise SteerlabError(f"shape {f[name].shape}, expected {want}",
                                            source=src, field=name)
        except OSError as err:
            raise SteerlabError(f"not an HDF5 file, or a damaged one ({err}); expected a "
                                "steerlab activation file", source=src) from None

    def _check_rows(self, f: Any, src: str) -> None:
        """The ``layers`` dataset is the attribute's list, ``d_model`` the activations' width,
        and there are no more rows than input pairs."""
        stored = np.asarray(f["layers"][()]).tolist()
        if stored != list(self.meta.layers):
            raise SteerlabError(f"holds {stored!s:.60}; the layers attribute is "
                                f"{list(self.meta.layers)}", source=src, field="layers")
        width = f["chosen"].shape[-1] if f["chosen"].ndim == 3 else self.meta.d_model
        if width != self.meta.d_model:
            raise SteerlabError(f"got {self.meta.d_model}; the activations are {width} wide",
                                source=src, field="d_model")
        if self.meta.n_pairs and self.n_pairs > self.meta.n_pairs:
            raise SteerlabError(f"the file has {self.n_pairs} rows, more than the "
                                f"{self.meta.n_pairs} pairs of its input", source=src,
                                field="n_pairs")

    @property
    def layers(self) -> tuple[int, ...]:
        return self.meta.layers

    def read(self, name: str) -> np.ndarray:
        """A whole dataset as a numpy array (``pair_id`` as a list of str)."""
        with h5py().File(self.path, "r") as f:
            if name == "pair_id":
                return np.asarray([s.decode() if isinstance(s, bytes) else s
                                   for s in f[name][:]], dtype=object)
            return f[name][:]

    def iter_rows(self, batch_size: int = 256) -> Iterator[Rows]:
        """All datasets in blocks of ``batch_size`` rows."""
        with h5py().File(self.path, "r") as f:
            for at in range(0, self.n_pairs, batch_size):
                sl = slice(at, min(at + batch_size, self.n_pairs))
                ids = [s.decode() if isinstance(s, bytes) else s for s in f["pair_id"][sl]]
                vals = {n: (f[n][sl] if n in f else None) for n in (*ACTS, *INDEX)}
                yield Rows(ids, **vals)

    def iter_batches(self, batch_size: int = 256, *, site: Site = Site.DIVERGENCE) -> Iterator[
            tuple[torch.Tensor, torch.Tensor]]:
        """``(chosen, rejected)`` float tensors ``[batch, layer, d_model]``, streamed.

        Args:
            batch_size: rows per batch.
            site: divergence-point activations, or response means (files captured with mean).
        """
        site = Site.parse(site, field="site")
        chosen, rejected = site.datasets()
        if site is Site.MEAN and not self.meta.mean:
            raise SteerlabError("this file has no response means (captured with mean: false)",
                                source=str(self.path), field="chosen_mean")
        with h5py().File(self.path, "r") as f:
            for at in range(0, self.n_pairs, batch_size):
                sl = slice(at, min(at + batch_size, self.n_pairs))
                yield torch.from_numpy(f[chosen][sl]), torch.from_numpy(f[rejected][sl])
