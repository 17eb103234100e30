"""Run folders that several processes share: locks, ``config.json`` identity, shards, merge.

:func:`open_run` is how :func:`steerlab.inference.infer.run_inference` opens its folder: it takes
the
folder's lock (shards share it and lock their own shard), creates ``config.json`` once even
when shards start at the same moment, and refuses a folder of another run naming the field and
both values. A shard that finishes writes ``shards/shard-IIII-of-NNNN.json``;
:func:`merge_run` checks the set of markers and joins the committed batches into
``results.json`` and ``per_token.h5`` (and ``activations.h5`` of a capture), equal to those of a
single process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from steerlab.base.checks import Inputs, output_dir
from steerlab.base.errors import SteerlabError
from steerlab.base.files import (
    check_unlocked,
    create_exclusive,
    flock,
    read_json,
    write_json_atomic,
)
from steerlab.base.shards import ShardPiece, shard_batches, shard_set
from steerlab.inference.results import (
    CONFIG,
    CONFIG_LOCK,
    LOCK,
    RESULTS,
    SHARDS,
    RunStore,
    run_files,
)

log = logging.getLogger(__name__)

MARKER = re.compile(r"shard-(\d+)-of-(\d+)\.json")


def identity_sha256(identity: Mapping[str, Any]) -> str:
    """SHA-256 of a run identity (what shard markers carry)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def per_token_attrs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of ``per_token.h5``, from ``config.json`` (one rule for run and merge)."""
    return {"model": config["model"], "n_layers": config["n_layers"],
            "top_k_mass_k": config["top_k_mass_k"], "lens": config["lens"],
            "provenance": json.dumps(config.get("provenance", {}), sort_keys=True)}


def activation_attrs(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The attributes of ``activations.h5``, from ``config.json`` (None: no capture)."""
    layers = config.get("capture_layers")
    if not layers:
        return None
    return {"model": config["model"], "layers": np.asarray(layers, dtype=np.int64),
            "provenance": json.dumps(config.get("provenance", {}), sort_keys=True)}


def _show(value: Any) -> str:
    return "(not recorded)" if value is None else value if isinstance(value, str) else \
        json.dumps(value)


@contextmanager
def open_run(root: str | os.PathLike, identity: Mapping[str, Any],
             provenance: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
             shard: tuple[int, int] = (0, 1)) -> Iterator[RunStore]:
    """Lock a run folder for writing, then create its ``config.json`` or check it.

    An unsharded run locks ``.lock`` exclusively; shard ``(i, n)`` shares ``.lock`` (so an
    unsharded run or a merge cannot start under it) and locks ``shards/shard-IIII-of-NNNN.lock``
    exclusively. ``config.json`` is created once, race-free between shards started together
    (a temporary file hard-linked to the final name, which fails if it exists); a folder
    holding another run is refused naming the first differing field with both values. A
    change of devices is allowed: it is logged and added to ``provenance.devices``.
    """
    root = _check_folder(root)
    store = RunStore(root)
    root.mkdir(parents=True, exist_ok=True)
    if shard[1] > 1:
        (root / SHARDS).mkdir(exist_ok=True)
    with ExitStack() as locks:
        for path, shared, busy in _run_locks(root, shard):
            locks.enter_context(flock(path, shared=shared, busy=busy))
        if shard[1] == 1:
            store.parts.sweep()  # the sole writer: clear what a crashed commit left
        _write_config(root, identity, provenance, extra)
        yield store


def _run_locks(root: Path, shard: tuple[int, int]) -> list[tuple[Path, bool, str]]:
    """The locks a writer of ``root`` holds: ``(file, shared, refusal)``. An unsharded run
    holds ``.lock`` exclusively; shard ``(i, n)`` shares it and holds its own shard's."""
    i, n = shard
    if n == 1:
        return [(root / LOCK, False, "another run or merge is writing this folder")]
    return [(root / LOCK, True, "an unsharded run or a merge is writing this folder"),
            (RunStore(root).marker(shard).with_suffix(".lock"), False,
             f"shard {i} of {n} is already running")]


def check_run_target(root: str | os.PathLike, shard: tuple[int, int] = (0, 1), *,
                     inputs: Inputs | None = None) -> Path:
    """Refuse, before anything loads or is created, a folder a run cannot write: a file, a
    path under a file or in an unwritable folder, a folder holding something else, a damaged
    ``config.json``, a folder another process is writing (naming its PID), or a folder where
    a file the run writes (:func:`steerlab.inference.results.run_files`) would alias one of the
    command's ``inputs`` (field name to path, e.g. ``{"prompts_json": path}``)."""
    root = _check_folder(root, inputs)
    if root.is_dir():
        for path, shared, busy in _run_locks(root, shard):
            check_unlocked(path, busy, shared=shared)
    return root


def _check_folder(root: str | os.PathLike, inputs: Inputs | None = None) -> Path:
    """``root`` as a folder a run can write: writable, aliasing none of ``inputs``, and new,
    empty or holding a run with a readable ``config.json``."""
    root = output_dir(root, "output_dir", inputs=inputs, owns=run_files(root))
    if not root.is_dir():
        return root
    if not (root / CONFIG).is_file():
        if any(not p.name.startswith(".") and p.name != SHARDS for p in root.iterdir()):
            raise SteerlabError("exists and is not a steerlab run folder; use a new "
                                "--output-dir", source=str(root))
    elif not isinstance(read_json(root / CONFIG, "a run's config.json"), dict):
        raise SteerlabError("expected a JSON object; not a steerlab run's config",
                            source=str(root / CONFIG))
    return root


def check_finished(root: str | os.PathLike) -> Path:
    """Refuse to read a run folder that is missing, not a run, still being written (naming
    the writer's PID) or not finished (its committed batches and how to finish it)."""
    p = Path(root)
    if not p.exists():
        raise SteerlabError("no such run folder", source=str(p))
    if not p.is_dir():
        raise SteerlabError("is a file; expected a run folder of `steerlab infer`",
                            source=str(p))
    if not (p / CONFIG).is_file():
        raise SteerlabError(f"no {CONFIG}; not a steerlab run folder", source=str(p))
    read_json(p / CONFIG, "a run's config.json")
    check_unlocked(p / LOCK, "the run is still being written", shared=True)
    if not (p / RESULTS).is_file():
        parts = len(RunStore(p).parts.keys())
        raise SteerlabError(f"the run is not finished ({parts} batch(es) committed, no "
                            f"{RESULTS}): rerun its `steerlab infer` command to resume it, or "
                            "`steerlab merge` the folder of a sharded run", source=str(p))
    return p


def _write_config(root: Path, identity: Mapping[str, Any], provenance: Mapping[str, Any],
                  extra: Mapping[str, Any] | None) -> None:
    cfg = root / CONFIG
    if not cfg.is_file():
        data = {**(extra or {}), **identity, "identity_sha256": identity_sha256(identity),
                "provenance": dict(provenance)}
        if create_exclusive(cfg, json.dumps(data, indent=1, ensure_ascii=False) + "\n"):
            return
        # another shard created it first: compare with that one
    old = read_json(cfg, "a run's config.json")
    for name, value in identity.items():
        if old.get(name) != value:
            raise SteerlabError(f"the folder holds {_show(old.get(name))}, this run is "
                                f"{_show(value)}; use a new --output-dir", source=str(cfg),
                                field=name)
    for key, what in (("devices", "on"), ("engines", "with the engine")):
        used = list((old.get("provenance") or {}).get(key, []))
        new = [d for d in provenance.get(key, []) if d not in used]
        if not new:
            continue
        log.warning("%s was run %s %s; this run is %s %s (recorded in config.json)", root,
                    what, ", ".join(used) or "unrecorded", what, ", ".join(provenance[key]))
        with flock(root / CONFIG_LOCK, wait=True):
            old = read_json(cfg, "a run's config.json")
            prov = {**dict(provenance), **(old.get("provenance") or {})}
            prov[key] = [*prov.get(key, []), *(d for d in provenance[key] if d not in
                                               prov.get(key, []))]
            write_json_atomic(cfg, {**old, "provenance": prov})


def _spans(batches: Sequence[int]) -> str:
    """``[4, 5, 7]`` -> ``"batches 4-5, 7"``."""
    runs: list[list[int]] = []
    for b in sorted(batches):
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    return f"batch{'es' if len(batches) > 1 else ''} {text}"


def _shard_problems(store: RunStore, config: Mapping[str, Any], n_batches: int) -> list[str]:
    """One line per missing, extra or foreign shard marker (empty: the shards are complete)."""
    done = store.done_batches()
    markers = []
    for path in sorted((store.root / SHARDS).glob("shard-*-of-*.json")):
        m = MARKER.fullmatch(path.name)
        if m:
            markers.append((path, int(m[1]), int(m[2]), read_json(path, "a shard marker")))
    if not markers:
        return [f"no shard has finished (no markers in {SHARDS}/); run the shards, then merge"]
    pieces = [ShardPiece(f"{SHARDS}/{path.name}", i, n, None if data.get("identity_sha256")
                         == config.get("identity_sha256") else
                         f"{SHARDS}/{path.name} is from another run: its identity "
                         f"{str(data.get('identity_sha256'))[:12]} is not config.json's "
                         f"{str(config.get('identity_sha256'))[:12]}")
              for path, i, n, data in markers]

    def missing(i: int, n: int) -> str:
        todo = [b for b in shard_batches(n_batches, (i, n)) if b not in done]
        why = f"{_spans(todo)} not committed" if todo else \
            "its batches are committed but it did not finish; rerun it"
        return f"shard {i} of {n} is missing ({why})"

    _, problems = shard_set(pieces, missing)
    todo = sorted(set(range(n_batches)) - done)
    if not problems and todo:
        problems.append(f"{_spans(todo)} not committed")
    return problems


def merge_run(path: str | os.PathLike) -> Path:
    """Join the shards of a sharded inference run into ``results.json`` and ``per_token.h5``.

    The output equals that of one process running every task. Refused, with one line per
    problem, while a shard is missing (naming its uncommitted batches), when a marker is of
    an extra shard, of another shard count or of another run; refused while anything still
    writes the folder. Merging a finished run does nothing.

    Args:
        path: the run folder all shards wrote (``--output-dir``).

    Examples:
        >>> config = sl.InferConfig(max_tokens=4, batch_size=1)  # 2 tasks: 2 batches
        >>> for i in range(2):
        ...     _ = sl.run_inference(model, ["Hi!", "Bye!"], [sl.ASSISTANT], "logs/sharded",
        ...                          config, shard=(i, 2))
        >>> sl.merge_run("logs/sharded")
        PosixPath('logs/sharded')
        >>> len(sl.load_results("logs/sharded"))
        2
    """
    root = Path(path)
    if not (root / CONFIG).is_file():
        raise SteerlabError(f"no {CONFIG}; not a steerlab run folder", source=str(root))
    store = RunStore(root)
    with flock(root / LOCK, busy="a shard or run is still writing this folder"):
        if store.complete():
            log.info("%s is complete; nothing to merge", root)
            return root
        config = store.config()
        n_tasks = config["n_prompts"] * config["n_personae"] * config["n_reps"]
        problems = _shard_problems(store, config, math.ceil(n_tasks / config["batch_size"]))
        if problems:
            raise SteerlabError("\n".join(f"{root}: {p}" for p in problems))
        records = sorted(store.records(), key=lambda r: r["id"])
        write_json_atomic(root / RESULTS, records)
        store.finalize(per_token_attrs(config), activation_attrs(config))
    log.info("merged %d results in %s", len(records), root)
    return root


def write_marker(store: RunStore, shard: tuple[int, int], batches: range,
                 identity: Mapping[str, Any], provenance: Mapping[str, Any]) -> Path:
    """Record that shard ``(i, n)`` has committed its ``batches`` (atomically)."""
    path = store.marker(shard)
    write_json_atomic(path, {
        "shard": shard[0], "n_shards": shard[1], "batch_start": batches.start,
        "batch_stop": batches.stop, "identity_sha256": identity_sha256(identity),
        "provenance": dict(provenance), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return path
