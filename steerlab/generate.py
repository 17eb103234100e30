"""Generation primitives (no file I/O): batched decoding on the bridge's HF model with left
padding, a KV cache, per-row stops and per-row seeded sampling (:func:`generate`), and the same
with per-token entropy, top-k mass and logit-lens metrics (:func:`generate_with_metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from steerlab.compat import cache_keyword, ensure_bridge_reads_cache, output_cache
from steerlab.errors import SteerlabError
from steerlab.lens import LastPositionRecorder, lens_metrics
from steerlab.metrics import token_metrics


@dataclass(frozen=True)
class Generation:
    """Generated token ids per row (prompt excluded, stop token excluded) and why each stopped."""

    tokens: list[list[int]]
    stopped: list[bool]  # True: hit a stop token; False: ran out of max_new_tokens

    def texts(self, tokenizer: Any) -> list[str]:
        """Decoded replies without special tokens."""
        return [tokenizer.decode(t, skip_special_tokens=True) for t in self.tokens]


@dataclass(frozen=True)
class StepState:
    """What interventions may need to know about the forward pass under way.

    ``prefill`` is True for the prompt pass; ``generated`` marks rows still generating;
    ``in_output`` marks rows whose new positions are in the output section (after
    ``</think>``, or always when the model is not thinking).
    """

    prefill: bool
    generated: Bool[torch.Tensor, " batch"]
    in_output: Bool[torch.Tensor, " batch"]


@runtime_checkable
class StepListener(Protocol):
    """Told the state of each forward pass :func:`generate` runs (``None``: not generating).

    Interventions that act on some positions only (steering the generated tokens, monitoring)
    register with :func:`listen` and are told before every forward pass."""

    def on_step(self, state: StepState | None) -> None: ...


_LISTENERS = "_steerlab_step_listeners"


def _listeners(model: Any) -> list[StepListener]:
    """The step listeners registered on ``model`` (kept on the bridge object itself)."""
    found = model.__dict__.get(_LISTENERS)
    if found is None:
        found = []
        object.__setattr__(model, _LISTENERS, found)
    return found


@contextmanager
def listen(model: Any, listener: StepListener) -> Iterator[StepListener]:
    """Tell ``listener`` the step state of every :func:`generate` call on ``model`` inside."""
    registered = _listeners(model)
    registered.append(listener)
    listener.on_step(None)
    try:
        yield listener
    finally:
        registered.remove(listener)


def _announce(model: Any, state: StepState | None) -> None:
    for listener in _listeners(model):
        listener.on_step(state)


def position_ids(mask: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
    """Position ids of left-padded rows: 0 at each row's first real token (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


StepObserver = Callable[
    [int, Float[torch.Tensor, "batch d_vocab"], Bool[torch.Tensor, " batch"]], None
]


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SteerlabError("every prompt needs at least one token", field="prompts")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors; products stay below 2**63."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def row_uniforms(seeds: Int[torch.Tensor, " batch"], step: int) -> Float[torch.Tensor, " batch"]:
    """One uniform in (0, 1) per row that depends only on (seed, step), from a counter hash."""
    seeds = seeds.to(torch.int64)
    key = _mix32(_mix32(seeds) ^ _mix32(seeds >> 32) * 31 + step)
    hi = _mix32(key ^ (step * 0x9E3779B1))
    lo = _mix32(hi ^ 0x632BE5AB)
    bits = (hi >> 6) * (1 << 26) + (lo >> 6)  # 52 random bits
    return (bits.to(torch.float64) + 0.5) / float(1 << 52)


def sample(logits: Float[torch.Tensor, "batch vocab"], temperature: float,
           seeds: Int[torch.Tensor, " batch"], step: int) -> Int[torch.Tensor, " batch"]:
    """A draw from ``softmax(logits / temperature)`` per row, by inverting its CDF.

    Row ``r`` uses one uniform that depends only on ``seeds[r]`` and ``step``, so it draws the
    same token whichever other rows share its batch (batch size, shards, order). The CDF is
    summed in float64, exact to ~1e-12 over a 150k vocabulary.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    u = (row_uniforms(seeds, step).to(cdf.device) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def row_seeds(seed: int | Sequence[int] | None, batch: int, device: torch.device
              ) -> torch.Tensor:
    """Per-row seeds: a sequence as given, an int ``s`` as ``s, s+1, …``, None drawn from torch."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, int):
        return torch.arange(seed, seed + batch, device=device, dtype=torch.int64)
    values = [int(s) for s in seed]
    if len(values) != batch:
        raise SteerlabError(f"got {len(values)} seeds for {batch} prompts; expected one per "
                            "prompt", field="seed")
    return torch.tensor(values, device=device, dtype=torch.int64)


def stop_token_ids(tokenizer: Any, hf_model: Any = None) -> set[int]:
    """End-of-turn ids: the tokenizer's EOS plus the generation config's EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg = getattr(hf_model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


@torch.inference_mode()
def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | Sequence[int] | None = None,
    stop_ids: set[int] | None = None,
    observer: StepObserver | None = None,
    think_marker: Sequence[int] = (),
    on_token: Callable[[list[int | None]], bool | None] | None = None,
) -> Generation:
    """Generate replies for a batch of prompt token ids with a KV cache.

    Runs the bridge's HF model directly (hooks on :func:`steerlab.layers.decoder_layers`
    still fire), greedy at ``temperature == 0``, else sampled: row ``r`` draws with its own
    seed (see :func:`sample`), so its reply does not depend on the other rows.

    Args:
        model: a bridge from :func:`steerlab.load_model`.
        prompts: token ids per row (from :func:`steerlab.encode_chat`); rows may differ in length.
        max_new_tokens: per-row budget.
        temperature: 0 for greedy decoding.
        seed: per-row seeds (one per prompt), or ``s`` for rows ``s, s+1, …``; ``None``
            draws one from torch's global generator.
        stop_ids: token ids that end a row (default: EOS ids of tokenizer and model).
        observer: called as ``observer(step, logits, active)`` with the raw next-token logits.
        think_marker: ids of ``</think>``; rows are "in output" after it (or always if empty).
        on_token: called with each step's new token per row (``None`` for finished rows);
            returning True stops generation early (e.g. a user pressed Esc).

    Example:
        >>> ids = encode_chat(model.tokenizer, "Hello!")
        >>> generate(model, [ids], max_new_tokens=32).texts(model.tokenizer)
    """
    if max_new_tokens < 1:
        raise SteerlabError(f"max_new_tokens is {max_new_tokens}; expected >= 1")
    ensure_bridge_reads_cache()
    hf = model.original_model
    cache_kw = cache_keyword(hf)
    tokenizer = model.tokenizer
    device = next(hf.parameters()).device
    stops = torch.tensor(sorted(stop_ids or stop_token_ids(tokenizer, hf)), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stops[0])
    ids, mask = left_pad(prompts, pad_id, device)
    batch = ids.shape[0]
    seeds = row_seeds(seed, batch, device) if temperature > 0 else None
    active = torch.ones(batch, dtype=torch.bool, device=device)
    hit_stop = torch.zeros(batch, dtype=torch.bool, device=device)
    in_output = torch.full((batch,), not think_marker, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    marker = list(think_marker)
    in_output_rows = in_output.tolist()
    past, step_ids = None, ids
    try:
        for step in range(max_new_tokens):
            _announce(model, StepState(prefill=step == 0, generated=active.clone(),
                                       in_output=in_output.clone()))
            result = hf(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=position_ids(mask)[:, -step_ids.shape[1] :],
                use_cache=True,
                logits_to_keep=1,  # the prefill needs the last position only
                **{cache_kw: past},
            )
            past = output_cache(result)
            # a split model's logits come out on the last GPU; the row state lives on the first
            logits = result.logits[:, -1, :].float().to(device)
            if observer is not None:
                observer(step, logits, active)
            if seeds is not None:
                nxt = sample(logits, temperature, seeds, step)
            else:
                nxt = logits.argmax(-1)
            is_stop = torch.isin(nxt, stops) & active
            hit_stop |= is_stop
            emitted = active & ~is_stop
            # One device-to-host copy per step (not one per row): matters on GPUs at batch 256.
            new_ids, emitted_rows = nxt.tolist(), emitted.tolist()
            reported: list[int | None] = []
            for row in range(batch):
                if emitted_rows[row]:
                    out[row].append(new_ids[row])
                    if marker and not in_output_rows[row] and out[row][-len(marker) :] == marker:
                        in_output[row] = in_output_rows[row] = True
                    reported.append(new_ids[row])
                else:
                    reported.append(None)
            active = emitted
            if (on_token is not None and on_token(reported)) or not bool(active.any()):
                break
            step_ids = torch.where(active, nxt, torch.full_like(nxt, pad_id)).unsqueeze(-1)
            mask = torch.cat([mask, active.long().unsqueeze(-1)], dim=-1)
    finally:
        _announce(model, None)
    return Generation(tokens=out, stopped=hit_stop.tolist())


@dataclass(frozen=True)
class RowMetrics:
    """One generated reply with its per-token metrics (arrays align with ``tokens``)."""

    tokens: list[int]
    stopped: bool
    entropy: np.ndarray
    top_k_mass: np.ndarray
    lens_entropy: np.ndarray | None = None  # [n_tokens, n_layers]
    lens_top_k_mass: np.ndarray | None = None


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
    on_token: Callable[[list[int | None]], bool | None] | None = None,
    stop_ids: set[int] | None = None,
) -> list[RowMetrics]:
    """:func:`steerlab.generate` that records entropy and top-k mass of every generated token.

    Example:
        >>> rows = generate_with_metrics(model, [ids], max_new_tokens=64, lens=True)
        >>> rows[0].entropy.mean(), rows[0].lens_entropy.shape
    """
    steps: list[tuple[torch.Tensor, ...]] = []
    recorder = LastPositionRecorder(model) if lens else None

    def observe(step: int, logits: torch.Tensor, active: torch.Tensor) -> None:
        metrics = token_metrics(logits, k)
        if recorder is not None:
            ent, mass = lens_metrics(model, recorder.residuals(), k)
            metrics = (*metrics, ent.T, mass.T)
        steps.append(metrics)

    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                  observer=observe, think_marker=think_marker, on_token=on_token,
                  stop_ids=stop_ids)
    if recorder is None:
        gen = generate(model, prompts, **kwargs)
    else:
        with recorder.recording():
            gen = generate(model, prompts, **kwargs)
    stacked = [torch.stack(parts, 1).float().cpu().numpy() for parts in zip(*steps, strict=True)]
    rows = []
    for row, tokens in enumerate(gen.tokens):
        cut = [a[row, : len(tokens)] for a in stacked]
        rows.append(RowMetrics(tokens, gen.stopped[row], *cut))
    return rows
