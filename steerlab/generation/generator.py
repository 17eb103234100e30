"""Generation (no file I/O): batched decoding with left padding, a KV cache, per-row stops and
per-row seeded sampling (:func:`generate`), and the same with per-token entropy, top-k mass,
chosen-token log-prob and logit-lens metrics (:func:`generate_with_metrics`).

Two engines run it (:class:`steerlab.generation.engine.Engine`): ``eager`` (HF's growing cache, the
host
checks every step) and ``static`` (a preallocated cache, the decode step replayed as a CUDA
graph on GPUs, the host checking every ``sync_every`` steps); both run the one loop of
:mod:`steerlab.generation.decode` and give the same tokens and metrics.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steerlab.base.compat import ensure_bridge_reads_cache
from steerlab.base.errors import SteerlabError
from steerlab.generation.budget import (
    HEADROOM,
    check_context,
    free_memory,
    generation_need,
    rows_per_batch,
)
from steerlab.generation.cache import release_workspaces
from steerlab.generation.decode import (
    DecodeState,
    Observer,
    RowSteering,
    StepProgram,
    advance,
    forward,
    fresh,
    prefill,
)
from steerlab.generation.engine import Engine, bucket_batch, bucket_capacity
from steerlab.generation.lens import LastPositionRecorder
from steerlab.generation.sampling import row_seeds
from steerlab.generation.slots import SlotBatch
from steerlab.model.inputs import position_ids
from steerlab.steering.step_state import (
    StepState,
    announce,
    generating,
    listeners,
    steerings_in_force,
)

log = logging.getLogger(__name__)
OnToken = Callable[[list["int | None"]], "bool | None"]
SYNC_EVERY = 8  # static engine: decode steps between host checks


class NonFiniteError(SteerlabError):
    """Rows whose logits went NaN or infinite while generating (a steering too strong for
    the model, or an overflow in half precision): their replies would be garbage.

    ``rows`` are the batch rows that failed (the other rows were fine); ``tokens`` every
    row's tokens (a failed row's up to where it failed), for callers that score what came
    out, such as a strength search that pushed a model past its range."""

    def __init__(self, rows: Sequence[int], tokens: Sequence[Sequence[int]] = ()):
        self.rows, self.tokens = list(rows), [list(t) for t in tokens]
        super().__init__(f"the logits of row(s) {self.rows[:8]} went NaN or infinite while "
                         "generating: the steering is too strong for this model, or its "
                         "precision overflowed; lower the strength", field="steering")


@dataclass(frozen=True)
class Generation:
    """Generated token ids per row (prompt excluded, stop token excluded) and why each stopped."""

    tokens: list[list[int]]
    stopped: list[bool]  # True: hit a stop token; False: ran out of max_new_tokens

    def texts(self, tokenizer: Any) -> list[str]:
        """Decoded replies without special tokens."""
        return [tokenizer.decode(t, skip_special_tokens=True) for t in self.tokens]


@dataclass(frozen=True)
class RowMetrics:
    """One generated reply with its per-token metrics (arrays align with ``tokens``)."""

    tokens: list[int]
    stopped: bool
    entropy: np.ndarray
    top_k_mass: np.ndarray
    lens_entropy: np.ndarray | None = None  # [n_tokens, n_layers]
    lens_top_k_mass: np.ndarray | None = None
    logprob: np.ndarray | None = None  # log-prob of each chosen token (temperature 1)


@dataclass(frozen=True)
class _Run:
    tokens: list[list[int]]
    stopped: list[bool]
    metrics: dict[str, np.ndarray]


def _decode(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            temperature: float, seed: int | Sequence[int] | None, stop_ids: set[int] | None,
            think_marker: Sequence[int], on_token: OnToken | None, observer: Observer | None,
            k: int, lens: bool, engine: str | Engine, sync_every: int | None,
            available_memory: int | None = None) -> _Run:
    """Check the batch (context, memory), run the decode loop on the chosen engine, in parts
    when the batch does not fit in memory, and read the results once at the end."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 1:
        raise SteerlabError(f"max_new_tokens is {max_new_tokens!r}; expected an integer >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SteerlabError("every prompt needs at least one token", field="prompts")
    check_context(model, [len(p) for p in prompts], max_new_tokens)
    chosen = Engine.parse(engine, field="engine").resolve(
        model, stepwise=bool(listeners(model)) or observer is not None)
    ensure_bridge_reads_cache()
    settings = StepProgram.for_model(model, sampling=temperature > 0, stop_ids=stop_ids,
                                  think_marker=think_marker, k=k, lens=lens)
    n = len(prompts)
    seeds = row_seeds(seed, n, torch.device("cpu")).tolist() if temperature > 0 else [0] * n
    size = _part_rows(model, prompts, max_new_tokens, chosen, settings, available_memory)
    run = functools.partial(_decode_part, model, chosen=chosen, settings=settings,
                            temperature=temperature, max_new_tokens=max_new_tokens,
                            observer=observer, sync_every=sync_every)
    if size >= n:
        return run(prompts, seeds, on_token)
    log.info("a batch of %d rows does not fit in memory: generating it as %d parts of at most "
             "%d rows", n, -(-n // size), size)
    parts: list[_Run] = []
    stopped = False  # on_token asked to stop: the later parts are not run

    for lo in range(0, n, size):
        hi = min(lo + size, n)

        def told(new: list[int | None], lo: int = lo, hi: int = hi) -> bool:
            nonlocal stopped
            stopped = bool(on_token([None] * lo + new + [None] * (n - hi)))
            return stopped

        if stopped:
            parts.append(_Run([[] for _ in range(lo, hi)], [False] * (hi - lo), {}))
            continue
        try:
            parts.append(run(prompts[lo:hi], seeds[lo:hi], told if on_token else None))
        except NonFiniteError as err:  # rows of the whole batch, not of the part
            raise NonFiniteError([lo + r for r in err.rows]) from None
    return _join(parts)


def _part_rows(model: Any, prompts: Sequence[Sequence[int]], max_new: int, chosen: Engine,
               settings: StepProgram, available: int | None) -> int:
    """The most rows of ``prompts`` one part may hold (all of them when they fit)."""
    width, n = max(len(p) for p in prompts), len(prompts)
    static = chosen is Engine.STATIC
    need = generation_need(model, width, max_new, static=static, metrics=settings.k > 0,
                           lens=settings.lens)
    if available is None:
        available = free_memory(model)
        if static and available is not None and need(n) > HEADROOM * available:
            release_workspaces(model)  # the buckets kept from earlier batches hold the memory
            available = free_memory(model)
    return rows_per_batch(need, n, available, what=f"a {width}-token prompt with "
                          f"max_new_tokens {max_new}")


def _join(parts: Sequence[_Run]) -> _Run:
    """One run of the parts' rows in order (metrics zero-padded to the longest part)."""
    width = max((a.shape[1] for p in parts for a in p.metrics.values()), default=0)
    shapes = {name: a.shape[2:] for p in parts for name, a in p.metrics.items()}
    metrics = {}
    for name, tail in shapes.items():
        blocks = []
        for p in parts:
            a = p.metrics.get(name, np.zeros((len(p.tokens), 0, *tail), np.float32))
            pad = [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * len(tail)
            blocks.append(np.pad(a, pad))
        metrics[name] = np.concatenate(blocks)
    return _Run([t for p in parts for t in p.tokens], [s for p in parts for s in p.stopped],
                metrics)


def _decode_part(model: Any, prompts: Sequence[Sequence[int]], seeds: list[int],
                 on_token: OnToken | None, *, chosen: Engine, settings: StepProgram,
                 temperature: float, max_new_tokens: int, observer: Observer | None,
                 sync_every: int | None) -> _Run:
    """One batch on the chosen engine."""
    device = next(model.original_model.parameters()).device
    n = len(prompts)
    steerings = steerings_in_force(model)
    start = dict(limits=[max_new_tokens] * n, temps=[float(temperature)] * n, seeds=seeds)
    if chosen is Engine.STATIC:
        width = max(len(p) for p in prompts)
        batch = SlotBatch(model, bucket_batch(n), bucket_capacity(width + max_new_tokens),
                          settings, graphs=observer is None)
        every = sync_every or SYNC_EVERY
        with batch.running():
            def step(s: int) -> None:
                if s == 0:
                    batch.admit(range(n), prompts, steer_all=steerings, **start)
                else:
                    batch.step()

            end = _steps(batch.st, max_new_tokens, step, on_token, every, n)
        return _collect(batch.st, n, end)
    return _eager(model, prompts, settings, steerings, start, max_new_tokens, on_token,
                  observer, sync_every or 1, device)


def _eager(model: Any, prompts: Sequence[Sequence[int]], settings: StepProgram,
           steerings: list, start: dict, max_new: int, on_token: OnToken | None,
           observer: Observer | None, every: int, device: torch.device) -> _Run:
    """The eager engine: HF's ``DynamicCache``, a mask that grows by one column a step."""
    n = len(prompts)
    st = DecodeState(fresh(device), n, max_new, settings, model.cfg.n_layers)
    rows = torch.arange(n, device=device)
    st.start(rows, **start)
    steering = RowSteering(model, st, fresh(device))
    steering.set_all_rows(rows, steerings)
    recorder = LastPositionRecorder(model) if settings.lens else None
    past: Any = None
    mask = torch.empty(0)

    def step(s: int) -> None:
        nonlocal past, mask
        announce(model, StepState(prefill=s == 0, generated=st.active.clone(),
                                  in_output=st.in_output.clone()))
        if s == 0:
            steering.prefill = True
            logits, past, mask, resid = prefill(model, prompts, settings.pad_id, device,
                                                recorder)
            steering.prefill = False
        else:
            mask = torch.cat([mask, st.active.long()[:, None]], dim=-1)
            logits, past, resid = forward(model, st.next_ids[:, None], mask,
                                          position_ids(mask)[:, -1:], past, recorder)
        advance(st, logits, resid, observer=observer, step=s, model=model)

    try:
        with generating(model), steering.hooks(), \
                (recorder.recording() if recorder else contextlib.nullcontext()):
            end = _steps(st, max_new, step, on_token, every, n)
    finally:
        announce(model, None)
    return _collect(st, n, end)


def _steps(st: DecodeState, n_steps: int, step: Callable[[int], None],
           on_token: OnToken | None, every: int, n: int) -> int:
    """Run ``step(0..)`` and check every ``every`` steps; the last step kept (inclusive)."""
    told = 0
    for s in range(n_steps):
        step(s)
        if (s + 1) % every and s != n_steps - 1:
            continue
        if on_token is not None:
            new = st.tokens[:n, told : s + 1].tolist()
            made = st.n_out[:n].tolist()
            for j in range(told, s + 1):
                if on_token([row[j - told] if j < made[r] else None
                             for r, row in enumerate(new)]):
                    return j
        told = s + 1
        if not bool(st.active[:n].any()):
            return s
    return n_steps - 1


def _collect(st: DecodeState, n: int, end: int) -> _Run:
    """The host copy of the first ``n`` rows, cut at step ``end`` (one read per tensor)."""
    made = st.n_out[:n].clamp(max=end + 1)
    stopped, broken = torch.stack([st.hit_stop[:n] & (st.n_out[:n] <= end),
                                   st.broken[:n]]).tolist()
    lengths = made.tolist()
    width = max(lengths, default=0)
    tokens = st.tokens[:n, :width].tolist()
    if any(broken):
        raise NonFiniteError([i for i, b in enumerate(broken) if b],
                             [row[:m] for row, m in zip(tokens, lengths, strict=True)])
    metrics = {name: t[:n, :width].cpu().numpy() for name, t in st.metrics.items()}
    return _Run([row[:m] for row, m in zip(tokens, lengths, strict=True)], stopped, metrics)


@torch.inference_mode()
def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | Sequence[int] | None = None,
    stop_ids: set[int] | None = None,
    observer: Observer | None = None,
    think_marker: Sequence[int] = (),
    on_token: OnToken | None = None,
    engine: str | Engine = Engine.AUTO,
    sync_every: int | None = None,
    available_memory: int | None = None,
) -> Generation:
    """Generate replies for a batch of prompt token ids with a KV cache.

    Runs the bridge's HF model directly (hooks on :func:`steerlab.model.hooks.decoder_layers`
    still fire), greedy at ``temperature == 0``, else sampled: row ``r`` draws with its own
    seed (see :func:`sample`), so its reply does not depend on the other rows. Steering in
    force (:meth:`steerlab.Steering.apply`) is added per row.

    Args:
        model: a bridge from :func:`steerlab.load_model`.
        prompts: token ids per row (from :func:`steerlab.encode_chat`); rows may differ in length.
        max_new_tokens: per-row budget.
        temperature: 0 for greedy decoding.
        seed: per-row seeds (one per prompt), or ``s`` for rows ``s, s+1, …``; ``None``
            draws one from torch's global generator.
        stop_ids: token ids that end a row (default: EOS ids of tokenizer and model).
        observer: called as ``observer(step, logits, active)`` with the raw next-token logits
            (every step runs in Python then: ``auto`` picks eager, static runs no graph).
        think_marker: ids of ``</think>``; rows are "in output" after it (or always if empty).
        on_token: called with each step's new token per row (``None`` for finished rows);
            returning True stops generation there (e.g. a user pressed Esc). The static
            engine calls it in bursts, at each host check.
        engine: ``"auto"`` (static on CUDA, else eager), ``"eager"`` or ``"static"``.
        sync_every: steps between host checks (default 1 eager, 8 static).
        available_memory: bytes the batch may plan with (default: free on the device now,
            :func:`steerlab.generation.budget.free_memory`). A batch whose estimate
            (:func:`steerlab.generation.budget.batch_memory`) does not fit runs as parts of as many
            rows
            as fit, one after another (``on_token`` sees ``None`` for the other parts' rows);
            when one row does not fit, nothing runs.

    Raises:
        SteerlabError: a prompt plus ``max_new_tokens`` longer than the model's context
            (naming the row, its length and the limit), or one row too big for the memory.

    Examples:
        >>> ids = sl.encode_chat(model.tokenizer, "Hello!")
        >>> out = sl.generate(model, [ids], max_new_tokens=8)
        >>> len(out.tokens[0]) <= 8, len(out.texts(model.tokenizer))  # one reply per prompt
        (True, 1)
    """
    run = _decode(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                  seed=seed, stop_ids=stop_ids, think_marker=think_marker, on_token=on_token,
                  observer=observer, k=0, lens=False, engine=engine, sync_every=sync_every,
                  available_memory=available_memory)
    return Generation(tokens=run.tokens, stopped=run.stopped)


@torch.inference_mode()
def generate_with_metrics(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    k: int = 5,
    temperature: float = 0.0,
    seed: int | Sequence[int] | None = None,
    lens: bool = False,
    think_marker: Sequence[int] = (),
    on_token: OnToken | None = None,
    stop_ids: set[int] | None = None,
    engine: str | Engine = Engine.AUTO,
    sync_every: int | None = None,
    available_memory: int | None = None,
) -> list[RowMetrics]:
    """:func:`steerlab.generation.generate` that records entropy, top-k mass and the chosen token's
    log-prob of every generated token (and the logit lens per layer with ``lens``), on the
    device, copied to the host once at the end. Context and memory are checked, and a batch
    too big for the memory split, as in :func:`steerlab.generation.generate`.

    Examples:
        >>> ids = sl.encode_chat(model.tokenizer, "Hello!")
        >>> rows = sl.generate_with_metrics(model, [ids], max_new_tokens=8, lens=True)
        >>> n = len(rows[0].tokens)
        >>> rows[0].entropy.shape == (n,), rows[0].lens_entropy.shape == (n, model.cfg.n_layers)
        (True, True)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SteerlabError(f"k is {k!r}; expected an integer >= 1", field="top_k_mass_k")
    run = _decode(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                  seed=seed, stop_ids=stop_ids, think_marker=think_marker, on_token=on_token,
                  observer=None, k=k, lens=lens, engine=engine, sync_every=sync_every,
                  available_memory=available_memory)
    out = []
    for row, tokens in enumerate(run.tokens):
        cut = {name: a[row, : len(tokens)] for name, a in run.metrics.items()}
        out.append(RowMetrics(tokens, run.stopped[row], cut["entropy"], cut["top_k_mass"],
                              cut.get("lens_entropy"), cut.get("lens_top_k_mass"),
                              cut["logprob"]))
    return out
