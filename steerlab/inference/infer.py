"""Batch persona inference: prompts x personae x reps, generated in batches with metrics.

Each generated token gets the entropy and top-k mass of the raw next-token distribution it
was drawn from (and, with ``lens=True``, the same at every layer through the logit lens).
:func:`run_inference` writes a resumable run folder (see :mod:`steerlab.inference.results`), alone
or as
one of n shards that share the folder and are joined by :func:`steerlab.inference.runs.merge_run`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from steerlab.base.checks import integer, number, seed, text
from steerlab.base.errors import SteerlabError
from steerlab.base.files import read_json_list, write_json_atomic
from steerlab.base.shards import shard_batches
from steerlab.generation.budget import check_context, free_memory, generation_need, rows_per_batch
from steerlab.generation.engine import Engine
from steerlab.generation.generator import RowMetrics, generate_with_metrics
from steerlab.generation.metrics import section_averages, split_sections
from steerlab.inference.activations import capture_replies, check_capture_steering
from steerlab.inference.results import LOG, RESULTS, RunStore
from steerlab.inference.runs import activation_attrs, open_run, per_token_attrs, write_marker
from steerlab.model.personas import Persona, system_prompt_style
from steerlab.model.provenance import provenance
from steerlab.model.templates import MAX_MESSAGE_CHARS, encode_chat, think_end_marker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferConfig:
    """Settings of a run (``config.json``); defaults are those of ``steerlab infer``.

    ``seed`` seeds sampling per task: task ``t`` samples with ``seed + t``, so the replies do
    not depend on how the tasks are split into shards or resumed.
    """

    model: str = "embedded"
    temperature: float = 0.0
    max_tokens: int = 1024
    batch_size: int = 256
    n_reps: int = 1
    top_k_mass_k: int = 5
    thinking_mode: bool = True
    system_prompt_style: str = "you-are-a"
    seed: int = 0
    lens: bool = False
    engine: str = "auto"  # how generation runs (not part of the run's identity)
    capture_layers: tuple[int, ...] = ()  # layers whose mean reply residual is recorded

    def validate(self, vocab_size: int | None = None, n_layers: int | None = None
                 ) -> InferConfig:
        """Reject impossible values with the name of the option (``top_k_mass_k`` against
        ``vocab_size``, ``capture_layers`` against ``n_layers`` when given); returns the
        config with negative capture layers counted from the end when ``n_layers`` is known.
        """
        Engine.parse(self.engine, field="engine")
        for name in ("max_tokens", "batch_size", "n_reps"):
            integer(getattr(self, name), name, lo=1)
        integer(self.top_k_mass_k, "top_k_mass_k", lo=1, hi=vocab_size,
                hint="(the vocabulary size)" if vocab_size else "")
        seed(self.seed)
        number(self.temperature, "temperature", lo=0)
        system_prompt_style(self.system_prompt_style)
        return replace(self, capture_layers=capture_layer_list(self.capture_layers, n_layers))


def capture_layer_list(value: Any, n_layers: int | None = None) -> tuple[int, ...]:
    """``capture_layers`` as distinct layer indices, negative ones counted from the end when
    ``n_layers`` is known (``-1``: the last layer); one error line naming the field.

    Examples:
        >>> capture_layer_list([8, -1], n_layers=30)
        (8, 29)
    """
    field = "capture_layers"
    if not isinstance(value, (list, tuple)):
        raise SteerlabError(f"got {value!r:.60}; expected a list of layer indices", field=field)
    hint = f"(the model has {n_layers} layers; negative counts from the end)" if n_layers \
        else ""
    lo, hi = (-n_layers, n_layers - 1) if n_layers else (None, None)
    out = tuple(integer(x, field, lo=lo, hi=hi, hint=hint) for x in value)
    if n_layers:
        out = tuple(x % n_layers for x in out)
    if len(set(out)) < len(out):
        raise SteerlabError(f"got {list(value)!r:.60}; expected distinct layers", field=field)
    return out


@dataclass(frozen=True)
class Task:
    """One generation: a persona answering one prompt, repetition ``rep``."""

    id: int
    persona: Persona
    prompt_index: int
    prompt: str
    rep: int


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Read a prompts file: a non-empty JSON list of strings or of ``{"prompt": str}``.

    Each prompt is checked here, before a model loads: non-blank text that can be written as
    UTF-8 (no lone surrogate, no NUL) of at most :data:`steerlab.model.templates.MAX_MESSAGE_CHARS`
    characters; an error names the entry, e.g. ``field 'prompts[3]'``.

    Examples:
        >>> load_prompts("prompts.json")[:1]  # the built-in prompts
        ['Who are you?']
    """
    out = []
    for i, item in enumerate(read_json_list(path)):
        field = f"prompts[{i}]"
        if isinstance(item, dict):
            item, field = item.get("prompt"), f"{field}.prompt"
        out.append(text(item, field, max_chars=MAX_MESSAGE_CHARS, empty=False,
                        source=str(path)))
    return out


def make_tasks(prompts: Sequence[str], personae: Sequence[Persona], n_reps: int) -> list[Task]:
    """All (persona, prompt, rep) tasks, grouped by persona, with stable ids."""
    combos = [(p, i, r) for p in personae for i in range(len(prompts)) for r in range(n_reps)]
    return [Task(k, p, i, prompts[i], r) for k, (p, i, r) in enumerate(combos)]


def make_record(task: Task, row: RowMetrics, tokenizer: Any, marker: Sequence[int]) -> dict:
    """The ``results.json`` record of one task (SPEC capability 2)."""
    sec = split_sections(row.tokens, marker)
    text = lambda s: tokenizer.decode(row.tokens[s], skip_special_tokens=True)  # noqa: E731
    rec: dict[str, Any] = {
        "id": task.id, **task.persona.to_dict(), "prompt": task.prompt,
        "prompt_index": task.prompt_index, "rep": task.rep,
        "response": text(sec.output),
        "thinking": None if sec.think_end_position is None else text(sec.thinking),
        **section_averages(row.entropy.tolist(), sec, "entropy"),
        **section_averages(row.top_k_mass.tolist(), sec, "top_k_mass"),
        "think_end_position": sec.think_end_position,
        "n_tokens": sec.n_tokens, "n_thinking_tokens": sec.n_thinking,
        "n_output_tokens": sec.n_output, "stopped": row.stopped,
    }
    if row.lens_entropy is not None:
        rec["avg_lens_entropy"] = [float(x) for x in row.lens_entropy.mean(0)] if len(
            row.tokens) else None
    return rec


def default_output_dir() -> Path:
    """``logs/personae-inference-{tag}``: the array job id (shared by all its tasks), else
    ``SLURM_JOB_ID``, else a timestamp."""
    tag = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or \
        time.strftime("%Y%m%d-%H%M%S")
    return Path("logs") / f"personae-inference-{tag}"


def run_identity(config: InferConfig, prompts: Sequence[str], personae: Sequence[Persona],
                 provenance: dict | None = None, n_layers: int | None = None) -> dict:
    """What a rerun or another shard must share to write into a folder (not the shard index).

    The settings, the input counts and hash, and of the loaded model its number of layers,
    dtype and attention implementation (from :func:`steerlab.model.provenance.provenance`).
    """
    blob = json.dumps([list(prompts), [p.to_dict() for p in personae]], sort_keys=True)
    prov = provenance or {}
    settings = {k: v for k, v in asdict(config).items() if k != "engine"}
    # a run without capture keeps the identity it had before capture existed (resumable)
    layers = list(settings.pop("capture_layers"))
    if layers:
        settings["capture_layers"] = layers
    return {**settings, "n_prompts": len(prompts), "n_personae": len(personae),
            "inputs_sha256": hashlib.sha256(blob.encode()).hexdigest(), "n_layers": n_layers,
            "dtype": prov.get("dtype"), "attn_implementation": prov.get("attn_implementation")}


def run_inference(
    model: Any,
    prompts: Sequence[str],
    personae: Sequence[Persona],
    output_dir: str | os.PathLike,
    config: InferConfig = InferConfig(),
    *,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    extra_config: dict | None = None,
) -> Path:
    """Run every (persona, prompt, rep) task in batches and write a resumable run folder.

    Tasks are grouped by persona and cut into fixed batches (batch ``k`` is tasks
    ``[k*B, (k+1)*B)``); each finished batch is committed at once, so rerunning with the same
    inputs and folder skips finished batches (no duplicates; task ``t`` samples with seed
    ``seed + t`` and so repeats exactly). With ``shard=(i, n)`` only shard i's contiguous run of
    whole batches is generated, into the folder all n shards share; the shard then writes its
    marker instead of ``results.json`` and ``per_token.h5``, which
    :func:`steerlab.inference.runs.merge_run`
    writes once every shard is done.

    Args:
        model: a bridge from :func:`steerlab.load_model`.
        prompts: user prompts (see :func:`load_prompts`).
        personae: persona records (see :func:`steerlab.load_personae`).
        output_dir: the run folder; created, or resumed if it holds the same run.
        config: generation and metric settings.
        shard: ``(i, n)``, 0-based; see :func:`steerlab.base.shards.parse_shard`.
        progress: show a rich progress bar with tokens/s.
        extra_config: more provenance for ``config.json`` (e.g. input file names).

    Examples:
        >>> config = sl.InferConfig(max_tokens=8)
        >>> sl.run_inference(model, ["Hi!"], [sl.ASSISTANT], "logs/hi", config)
        PosixPath('logs/hi')
    """
    config = config.validate(vocab_size=model.cfg.d_vocab, n_layers=model.cfg.n_layers)
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise SteerlabError(f"got {shard!r}; expected (i, n) with 0 <= i < n", field="shard")
    if not prompts or not personae:
        raise SteerlabError("need at least one prompt and one persona")
    style = system_prompt_style(config.system_prompt_style)
    marker = think_end_marker(model.tokenizer)
    tasks = make_tasks(prompts, personae, config.n_reps)
    batches = [tasks[k : k + config.batch_size] for k in range(0, len(tasks), config.batch_size)]
    engine = Engine.parse(config.engine, field="engine").resolve(model)
    check_inputs(model, prompts, personae, config, static=engine is Engine.STATIC)
    if config.capture_layers:
        check_capture_steering(model)
    prov = {**provenance(model), "engines": [engine.value]}
    identity = run_identity(config, prompts, personae, prov, model.cfg.n_layers)
    extra = {**(extra_config or {}), "engine": config.engine}  # asked for; provenance: used
    with open_run(output_dir, identity, prov, extra, shard) as store:
        handler = logging.FileHandler(store.root / LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lib_log = logging.getLogger("steerlab")
        old_level = lib_log.level
        lib_log.addHandler(handler)
        lib_log.setLevel(min(old_level or logging.INFO, logging.INFO))
        try:
            own = shard_batches(len(batches), shard)
            if store.complete():
                log.info("%s is complete; nothing to do", store.root)
            elif n > 1 and store.marker(shard).is_file() and set(own) <= store.done_batches():
                log.info("shard %d of %d is already done in %s", i, n, store.root)
            else:
                _run(model, store, config, batches, own, n == 1, style, marker, progress)
                if n > 1:
                    write_marker(store, shard, own, identity, prov)
                    log.info("shard %d of %d finished (%d batches from batch %d); once all "
                             "shards are done: steerlab merge %s", i, n, len(own), own.start,
                             store.root)
                else:
                    records = store.records()
                    write_json_atomic(store.root / RESULTS, records)
                    store.finalize(per_token_attrs(store.config()),
                                   activation_attrs(store.config()))
                    log.info("finished: %d results in %s", len(records), store.root)
            return store.root
        finally:
            lib_log.removeHandler(handler)
            lib_log.setLevel(old_level)
            handler.close()


def _run(model: Any, store: RunStore, config: InferConfig, batches: list[list[Task]],
         own: range, single: bool, style: Any, marker: list[int], progress: bool) -> None:
    """Generate and commit the batches of ``own`` not yet committed.

    Only an unsharded run (``single``) keeps ``results.json`` current after every batch.
    """
    tok = model.tokenizer
    done = store.done_batches() & set(own)
    records = store.records() if single else []
    n_tasks = sum(len(batches[b]) for b in own)
    log.info("%d tasks in %d of the %d batches (from batch %d); %d of them already done",
             n_tasks, len(own), len(batches), own.start, len(done))
    # deferred: rich
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[tok_s]:.1f} tok/s"))
    n_new, t0 = 0, time.perf_counter()
    with Progress(*columns, disable=not progress) as bar:
        job = bar.add_task("inference", total=n_tasks, tok_s=0.0,
                           completed=sum(len(batches[b]) for b in done))

        def on_token(new: list[int | None]) -> None:
            nonlocal n_new
            n_new += sum(t is not None for t in new)
            bar.update(job, tok_s=n_new / max(time.perf_counter() - t0, 1e-9))

        for b in own:
            if b in done:
                continue
            batch = batches[b]
            ids = [_encode(tok, t.prompt, t.persona, style, config) for t in batch]
            seeds = [config.seed + t.id for t in batch] if config.temperature > 0 else None
            rows = generate_with_metrics(
                model, ids, max_new_tokens=config.max_tokens, k=config.top_k_mass_k,
                temperature=config.temperature, seed=seeds,
                lens=config.lens, think_marker=marker if config.thinking_mode else (),
                on_token=on_token, engine=config.engine)
            recs = [make_record(t, r, tok, marker) for t, r in zip(batch, rows, strict=True)]
            acts = None
            if config.capture_layers:  # the same context (steering in force) as generation
                log.info("batch %d: capturing layers %s", b + 1, list(config.capture_layers))
                acts = capture_replies(model, ids, [r.tokens for r in rows],
                                       config.capture_layers, marker)
            store.commit(b, recs, [_arrays(r) for r in rows], acts)
            if single:
                records = sorted(records + recs, key=lambda r: r["id"])
                write_json_atomic(store.root / RESULTS, records)
            bar.advance(job, len(batch))
            log.info("batch %d/%d committed (%d tokens so far, %.1f tok/s)", b + 1,
                     len(batches), n_new, n_new / max(time.perf_counter() - t0, 1e-9))


def check_inputs(model: Any, prompts: Sequence[str], personae: Sequence[Persona],
                 config: InferConfig, *, static: bool = False) -> None:
    """Render every (persona, prompt) once, as the run will, and refuse (before the run folder
    exists or a task runs) one whose tokens plus ``max_tokens`` exceed the model's context,
    or a longest rendering that as one row would not fit in the free memory.

    Examples:
        >>> check_inputs(model, ["Hi!"], [ASSISTANT], InferConfig(max_tokens=64))
    """
    style = system_prompt_style(config.system_prompt_style)
    longest = 0
    for persona in personae:
        lengths = [len(_encode(model.tokenizer, p, persona, style, config)) for p in prompts]
        check_context(model, lengths, config.max_tokens, budget="max_tokens",
                      what=lambda i, name=persona.persona: f"prompt {i} rendered for persona "
                      f"{name!r:.60}", field=lambda i: f"prompts[{i}]")
        longest = max(longest, *lengths)
    need = generation_need(model, longest, config.max_tokens, static=static, metrics=True,
                           lens=config.lens)
    rows_per_batch(need, 1, free_memory(model), what=f"the longest rendered prompt ({longest} "
                   f"tokens) with max_tokens {config.max_tokens}")


def _encode(tok: Any, prompt: str, persona: Persona, style: Any, config: InferConfig
            ) -> list[int]:
    """A task's prompt ids: chat-formatted, persona applied."""
    return encode_chat(tok, prompt, persona=persona, system_prompt=style,
                       enable_thinking=config.thinking_mode)


def _arrays(row: RowMetrics) -> dict[str, Any]:
    return {"tokens": np.asarray(row.tokens, dtype=np.int32), "entropy": row.entropy,
            "top_k_mass": row.top_k_mass, "lens_entropy": row.lens_entropy,
            "lens_top_k_mass": row.lens_top_k_mass}
