"""Divergence-point activation capture: residuals where a chosen and a rejected response part.

Each pair is rendered twice with the target model's chat template (prompt + chosen, prompt +
rejected, the response as the assistant turn). The first token where the two token sequences
differ is the *divergence index*; the residual stream there is what a steering vector is fit on.
Capture runs the HF model under the bridge with torch forward hooks on the needed decoder
layers only, and stops the forward pass right after the last needed layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from steerlab.base.errors import SteerlabError
from steerlab.generation.budget import batch_memory, check_context, free_memory, rows_per_batch
from steerlab.model.hooks import HookPoint, check_layers, layer_hooks
from steerlab.model.inputs import left_pad, position_ids
from steerlab.model.personas import SystemPrompt
from steerlab.model.templates import encode_text, render_chat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairTokens:
    """Token ids of one pair: both full sequences, where the response starts and ends in each,
    and the first index at which they differ."""

    chosen: list[int]
    rejected: list[int]
    response_start: int
    chosen_end: int
    rejected_end: int
    divergence: int


def _response_span(tokenizer: Any, prefix: str, prompt_ids: list[int], full: list[int],
                   response: str, full_text: str) -> tuple[int, int]:
    n = len(prompt_ids)
    start = n if full[:n] == prompt_ids else _common(full, prompt_ids)
    end = len(full)
    if full_text.startswith(prefix + response):
        body = encode_text(tokenizer, prefix + response)
        if full[: len(body)] == body:
            end = len(body)
    return start, max(end, start + 1)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str, *,
                  system_prompt: SystemPrompt | None = None, pair_id: str = "") -> PairTokens:
    """Render and tokenise one pair with the chat template and find its divergence index.

    Args:
        tokenizer: the target model's tokenizer (with a chat template).
        prompt: the user turn.
        chosen: the trait-expressing response (assistant turn).
        rejected: the other response.
        system_prompt: system prompt style (default ``you-are-a``, as in generation).
        pair_id: used in error messages.

    Examples:
        >>> p = tokenize_pair(model.tokenizer, "Hi", "Ahoy!", "Hello!")
        >>> d = p.divergence  # the first response token, where the two differ
        >>> p.chosen[:d] == p.rejected[:d], p.chosen[d] != p.rejected[d]
        (True, True)
    """
    prefix = render_chat(tokenizer, prompt, system_prompt=system_prompt)
    prompt_ids = encode_text(tokenizer, prefix)
    seqs, spans = [], []
    for response in (chosen, rejected):
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = render_chat(tokenizer, msgs, system_prompt=system_prompt,
                           add_generation_prompt=False)
        ids = encode_text(tokenizer, text)
        seqs.append(ids)
        spans.append(_response_span(tokenizer, prefix, prompt_ids, ids, response, text))
    start = min(spans[0][0], spans[1][0])
    div = start + _common(seqs[0][start:], seqs[1][start:])
    if div >= min(len(seqs[0]), len(seqs[1])):
        raise SteerlabError(
            f"pair {pair_id!r}: chosen and rejected render to the same tokens (or one is a "
            "prefix of the other); expected responses that differ", field="chosen")
    return PairTokens(seqs[0], seqs[1], start, spans[0][1], spans[1][1], div)


class _Stop(Exception):
    """Raised by the last needed hook to end the forward pass early."""


@dataclass(frozen=True)
class Captured:
    """Activations of a batch of sequences at the chosen layers.

    ``at``: residual at the requested position per row ``[batch, layer, d_model]``;
    ``mean``: mean over the requested span per row, or ``None``.
    """

    at: Float[torch.Tensor, "batch layer d_model"]
    mean: Float[torch.Tensor, "batch layer d_model"] | None


@torch.inference_mode()
def capture_positions(
    model: Any,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[int],
    layers: Sequence[int],
    *,
    hook: str | HookPoint = HookPoint.RESID_POST,
    spans: Sequence[tuple[int, int]] | None = None,
    available_memory: int | None = None,
) -> Captured:
    """Residual activations of each sequence at one position, at the given layers.

    Sequences are left-padded into one batch with an attention mask and matching position ids,
    so every row equals an unpadded forward of that sequence. The forward pass stops after the
    last needed layer. A sequence longer than the model's context is refused; a batch whose
    forward would not fit in ``available_memory`` bytes (default: free on the device now; see
    :func:`steerlab.generation.budget.batch_memory`) runs as parts of as many rows as fit.

    Args:
        model: a bridge (its HF model runs; hooks sit on the shared decoder layers).
        sequences: token ids per row.
        positions: index into each (unpadded) sequence.
        layers: decoder layers to read.
        hook: ``resid_post`` (= HF ``hidden_states[L + 1]``), ``resid_pre`` or ``resid_mid``.
        spans: optional ``(start, end)`` per row to also average over (e.g. the response).
        available_memory: bytes the batch may plan with (default: measured).

    Examples:
        >>> capture_positions(model, [ids], [len(ids) - 1], [10]).at.shape
        torch.Size([1, 1, 576])
    """
    layers = check_layers(model, layers)
    check_context(model, [len(s) for s in sequences], what=lambda i: f"sequence {i}",
                  field="sequences")
    n, width = len(sequences), max(len(s) for s in sequences)
    size = rows_per_batch(lambda rows: batch_memory(model, rows, width).total, n,
                          free_memory(model) if available_memory is None else available_memory,
                          what=f"a {width}-token sequence")
    if size < n:
        log.info("a capture of %d sequences does not fit in memory: running it as %d parts "
                 "of at most %d", n, -(-n // size), size)
    parts = [_capture_rows(model, sequences[i : i + size], positions[i : i + size], layers,
                           hook, None if spans is None else spans[i : i + size])
             for i in range(0, n, size)]
    return Captured(torch.cat([p.at for p in parts]),
                    None if spans is None else torch.cat([p.mean for p in parts]))


def _capture_rows(model: Any, sequences: Sequence[Sequence[int]], positions: Sequence[int],
                  layers: list[int], hook: str | HookPoint,
                  spans: Sequence[tuple[int, int]] | None) -> Captured:
    """One forward of :func:`capture_positions`."""
    point = HookPoint.parse(hook, field="hook")
    hf = model.original_model
    device = next(hf.parameters()).device
    pad = model.tokenizer.pad_token_id or 0
    ids, mask = left_pad(sequences, pad, device)
    width = ids.shape[1]
    offsets = torch.tensor([width - len(s) for s in sequences], device=device)
    rows = torch.arange(len(sequences), device=device)
    pos = offsets + torch.tensor(list(positions), device=device)
    span_mask = None
    if spans is not None:
        idx = torch.arange(width, device=device)
        lo = offsets + torch.tensor([s for s, _ in spans], device=device)
        hi = offsets + torch.tensor([e for _, e in spans], device=device)
        span_mask = ((idx >= lo[:, None]) & (idx < hi[:, None])).float()
    at: dict[int, torch.Tensor] = {}
    mean: dict[int, torch.Tensor] = {}
    last = max(layers)

    def reader(layer: int) -> Callable[[torch.Tensor], None]:
        def fn(h: torch.Tensor) -> None:
            at[layer] = h[rows, pos].float()
            if span_mask is not None:
                w = span_mask.to(h.dtype)[..., None]
                mean[layer] = ((h * w).sum(1) / w.sum(1)).float()
            if layer == last:
                raise _Stop

        return fn

    try:
        with layer_hooks(model, {layer: reader(layer) for layer in sorted(set(layers))}, point):
            hf(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
               use_cache=False, logits_to_keep=1)  # activations only: no vocabulary projection
    except _Stop:
        pass
    out = torch.stack([at[layer].to(device) for layer in layers], dim=1)
    avg = torch.stack([mean[layer].to(device) for layer in layers], dim=1) if mean else None
    return Captured(out, avg)


@dataclass(frozen=True)
class PairActivations:
    """Capture of a batch of pairs: ``chosen``/``rejected`` ``[batch, layer, d_model]`` at the
    divergence index, optional response means, and the token bookkeeping."""

    chosen: Float[torch.Tensor, "batch layer d_model"]
    rejected: Float[torch.Tensor, "batch layer d_model"]
    chosen_mean: Float[torch.Tensor, "batch layer d_model"] | None
    rejected_mean: Float[torch.Tensor, "batch layer d_model"] | None
    tokens: list[PairTokens]


def capture_pairs(
    model: Any,
    pairs: Sequence[Any],
    layers: Sequence[int],
    *,
    hook: str | HookPoint = HookPoint.RESID_POST,
    mean: bool = False,
    system_prompt: SystemPrompt | None = None,
    available_memory: int | None = None,
) -> PairActivations:
    """Capture chosen and rejected activations at the divergence index for a batch of pairs.

    A pair longer than the model's context is refused (naming it); a batch too big for the
    memory runs in parts (see :func:`capture_positions`).

    Args:
        model: a bridge.
        pairs: objects with ``id``, ``prompt``, ``chosen``, ``rejected`` (:class:`Pair`).
        layers: decoder layers.
        hook: hook point name.
        mean: also average over each response's tokens.
        system_prompt: system prompt style used to render (default ``you-are-a``).
        available_memory: bytes the batch may plan with (default: measured).

    Examples:
        >>> acts = sl.capture_pairs(model, pairs[:8], [10, 15])
        >>> (acts.chosen - acts.rejected).mean(0).shape
        torch.Size([2, 576])
    """
    toks = [tokenize_pair(model.tokenizer, p.prompt, p.chosen, p.rejected,
                          system_prompt=system_prompt, pair_id=str(p.id)) for p in pairs]
    _check_lengths(model, pairs, [max(len(t.chosen), len(t.rejected)) for t in toks])
    seqs = [t.chosen for t in toks] + [t.rejected for t in toks]
    pos = [t.divergence for t in toks] * 2
    spans = None
    if mean:
        spans = [(t.response_start, t.chosen_end) for t in toks]
        spans += [(t.response_start, t.rejected_end) for t in toks]
    got = capture_positions(model, seqs, pos, layers, hook=hook, spans=spans,
                            available_memory=available_memory)
    n = len(toks)
    m = got.mean
    return PairActivations(got.at[:n], got.at[n:], None if m is None else m[:n],
                           None if m is None else m[n:], toks)


def check_pairs(model: Any, pairs: Sequence[Any], *, system_prompt: SystemPrompt | None = None,
                source: str | None = None) -> None:
    """Tokenise every pair as :func:`capture_pairs` will and refuse, before a capture starts,
    one that cannot be captured: responses that render the same, a sequence longer than the
    model's context, or a longest sequence that as one row would not fit in the free memory.

    Examples:
        >>> check_pairs(model, load_pairs("pairs.jsonl"), source="pairs.jsonl")
    """
    lengths = []
    for p in pairs:
        t = tokenize_pair(model.tokenizer, p.prompt, p.chosen, p.rejected,
                          system_prompt=system_prompt, pair_id=str(p.id))
        lengths.append(max(len(t.chosen), len(t.rejected)))
    _check_lengths(model, pairs, lengths, source)
    longest = max(lengths, default=0)
    if longest:
        rows_per_batch(lambda rows: batch_memory(model, rows, longest).total, 1,
                       free_memory(model), what=f"the longest pair ({longest} tokens)")


def _check_lengths(model: Any, pairs: Sequence[Any], lengths: Sequence[int],
                   source: str | None = None) -> None:
    check_context(model, lengths, what=lambda i: f"pair {str(pairs[i].id)!r:.60} (prompt and "
                  "response, rendered)", field="pairs", source=source)
