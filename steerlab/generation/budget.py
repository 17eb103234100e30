"""What a batch may use: the model's context window and the memory a batch of generation or
capture needs, estimated before it runs and compared with what the device has free.

* :func:`context_length` and :func:`check_context`: a sequence (a rendered prompt plus the new
  tokens it may get) longer than the model's positions is refused, naming the row, its length
  and the limit, before anything runs.
* :func:`batch_memory`: the bytes a batch needs (KV cache, step logits, recorded metrics,
  one forward's activations), a pure function of the model's config and the batch's shape;
  :func:`generation_need` the same per number of rows, as an engine allocates them.
* :func:`free_memory`: the bytes free now where the model lives (CUDA: free plus what
  torch's allocator holds unused; CPU: ``MemAvailable`` of ``/proc/meminfo``).
* :func:`rows_per_batch`: the most rows per batch that fit (callers split a batch into such
  parts), or a refusal with the numbers when one row does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerlab.base.errors import SteerlabError
from steerlab.generation.engine import bucket_batch, bucket_capacity
from steerlab.generation.lens import DEFAULT_MAX_ELEMENTS

__all__ = ["HEADROOM", "BatchMemory", "batch_memory", "check_context",
           "context_length", "free_memory", "generation_need", "rows_per_batch"]


HEADROOM = 0.9  # a batch may plan to use this share of the free memory, no more
_STEP_TEMPORARIES = 16  # bytes a logit: metrics' or sampling's temporaries (measured)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _hf_config(model: Any) -> Any:
    cfg = model.original_model.config
    return getattr(cfg, "text_config", None) or cfg


def context_length(model: Any) -> int | None:
    """The most positions ``model`` takes: its HF config's ``max_position_embeddings`` (or
    ``n_positions``, …), else the bridge's ``cfg.n_ctx``; None when neither says.

    Examples:
        >>> context_length(load_model("embedded"))
        8192
    """
    cfg = _hf_config(model)
    for key in _CONTEXT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None


def check_context(model: Any, lengths: Sequence[int], new_tokens: int = 0, *,
                  what: Callable[[int], str] = lambda i: f"prompt {i}",
                  field: str | Callable[[int], str] | None = "prompts",
                  budget: str = "max_new_tokens", source: str | None = None) -> None:
    """Refuse the first row whose ``length + new_tokens`` exceeds :func:`context_length`.

    Args:
        model: the bridge (its config gives the limit; no check when it has none).
        lengths: token count of each row (a rendered prompt, a pair's sequence).
        new_tokens: positions each row may still grow by (``max_new_tokens``).
        what: names row ``i`` in the message.
        field: the field named in the error, or a function of the row.
        budget: the name of ``new_tokens`` in the message.
        source: the file the rows come from, if any.

    Examples:
        >>> check_context(model, [len(ids)], 256)
    """
    limit = context_length(model)
    if limit is None:
        return
    for i, n in enumerate(lengths):
        if n + new_tokens > limit:
            need = f"; with {budget} {new_tokens} that is {n + new_tokens} positions" if \
                new_tokens else ""
            raise SteerlabError(
                f"{what(i)} is {n} tokens{need}, more than the model's context of {limit} "
                "positions; shorten it" + (f" or lower {budget}" if new_tokens else ""),
                field=field(i) if callable(field) else field, source=source)


@dataclass(frozen=True)
class BatchMemory:
    """Bytes a batch needs on the device, by what holds them (see :func:`batch_memory`).

    The prefill's activations and a decode step's logits are not held at once: ``total`` is
    the larger of the two moments, the prefill (the cache so far and the activations) and the
    last step (the full cache and the logits), plus the recorded metrics.
    """

    kv_cache: int  # the cache at its largest (the last step)
    prefill_cache: int  # the cache while the prefill runs
    logits: int
    metrics: int
    activations: int

    @property
    def total(self) -> int:
        return self.metrics + max(self.prefill_cache + self.activations,
                                  self.kv_cache + self.logits)

    def __str__(self) -> str:
        parts = ", ".join(f"{name.replace('_', ' ')} {_size(getattr(self, name))}"
                          for name in ("kv_cache", "logits", "metrics", "activations")
                          if getattr(self, name))
        return f"{_size(self.total)} ({parts})"


def batch_memory(model: Any, rows: int, prompt: int, new_tokens: int = 0, *,
                 positions: int | None = None, metrics: bool = False, lens: bool = False
                 ) -> BatchMemory:
    """The bytes a batch of ``rows`` sequences needs beyond the weights, from the config.

    * ``kv_cache``: ``rows x positions x layers x 2 x kv_heads x head_dim x dtype bytes``
      (generation only: ``new_tokens > 0``); ``positions`` is ``prompt + new_tokens`` for a
      growing cache, or the capacity of a preallocated one (the static engine's), which the
      prefill's own cache of ``prompt`` positions joins while it is copied in.
    * ``logits``: a decode step's last-position logits in the model's dtype and in float32
      (one tensor for a float32 model), plus 16 bytes a logit for the temporaries of the
      step's metrics (four float32 copies: log-softmax, probabilities, …) or of sampling (two
      float64 ones), which run one after the other; with ``lens`` also the lens's chunk of at
      most ``DEFAULT_MAX_ELEMENTS`` logits, with as many temporaries.
    * ``metrics``: what generation records per row and new token: the token id (int64), with
      ``metrics`` entropy, top-k mass and log-prob (float32), with ``lens`` two float32 per
      layer.
    * ``activations``: the peak of one forward over ``prompt`` positions (the prefill, or a
      capture): per position four residual-width tensors, the query, key and value
      projections twice (before and after rotary embedding), four MLP-width tensors; with
      eager attention also the scores and their softmax (``heads x prompt x prompt`` each).

    An estimate (kernels keep other small temporaries; on a tiny Llama it is within 0.9x to
    1.5x of the measured peak): callers plan with :data:`HEADROOM` of the free memory.

    Examples:
        >>> batch_memory(model, rows=8, prompt=512, new_tokens=256, metrics=True).total
    """
    s = _Shape.of(model)
    per_position = rows * s.n_layers * 2 * s.kv_heads * s.head_dim * s.dtype_bytes
    kv = prefill_kv = 0
    if new_tokens:
        kv = (positions or prompt + new_tokens) * per_position
        prefill_kv = prompt * per_position + (kv if positions else 0)
    as_float = 4 + (s.dtype_bytes if s.dtype_bytes != 4 else 0)  # model dtype, then float32
    logits = rows * s.vocab * (as_float + _STEP_TEMPORARIES) if new_tokens else 0
    if new_tokens and lens:
        chunk = min(rows * s.n_layers, max(1, DEFAULT_MAX_ELEMENTS // s.vocab))
        logits += chunk * s.vocab * (s.dtype_bytes + _STEP_TEMPORARIES)
    per_token = 8 + (3 * 4 if metrics else 0) + (2 * 4 * s.n_layers if lens else 0)
    width = 4 * s.d_model + 2 * (s.n_heads + 2 * s.kv_heads) * s.head_dim + 4 * s.d_mlp
    act = rows * prompt * width * s.dtype_bytes
    if s.eager:
        act += 2 * rows * s.n_heads * prompt * prompt * s.dtype_bytes
    return BatchMemory(kv, prefill_kv, logits, rows * new_tokens * per_token, act)


def generation_need(model: Any, prompt: int, new_tokens: int, *, static: bool = False,
                    metrics: bool = False, lens: bool = False) -> Callable[[int], int]:
    """``rows -> bytes`` of a generation batch (:func:`batch_memory`'s total), for
    :func:`rows_per_batch`; the ``static`` engine rounds rows and cache positions up to its
    buckets (:func:`steerlab.generation.engine.bucket_batch`,
    :func:`~steerlab.generation.engine.bucket_capacity`).

    Examples:
        >>> rows_per_batch(generation_need(model, 512, 256), 64, free_memory(model))
    """
    def need(rows: int) -> int:
        return batch_memory(model, bucket_batch(rows) if static else rows, prompt, new_tokens,
                            positions=bucket_capacity(prompt + new_tokens) if static else None,
                            metrics=metrics, lens=lens).total

    return need


@dataclass(frozen=True)
class _Shape:
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int
    eager: bool

    @classmethod
    def of(cls, model: Any) -> _Shape:
        cfg = _hf_config(model)
        # an attention-free model (Mamba) has no heads: its cache term comes out near zero
        heads = getattr(cfg, "num_attention_heads", None) or 1
        d_model = cfg.hidden_size
        head_dim = getattr(cfg, "head_dim", None) or d_model // heads
        dtype = next(model.original_model.parameters()).dtype
        attn = getattr(model.original_model.config, "_attn_implementation", None)
        return cls(cfg.num_hidden_layers, d_model,
                   getattr(cfg, "intermediate_size", None) or 4 * d_model, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads, head_dim,
                   cfg.vocab_size, torch.finfo(dtype).bits // 8 if dtype.is_floating_point
                   else 4, attn in (None, "eager"))


def free_memory(model: Any) -> int | None:
    """Bytes free now where ``model`` lives: on CUDA, the sum over its devices of the free
    memory plus what torch's allocator has reserved but not allocated; on the CPU,
    ``MemAvailable`` of ``/proc/meminfo``; None where neither can be read (then nothing is
    split or refused).

    Examples:
        >>> free_memory(model) / 2**30  # GiB
    """
    devices = {p.device for p in model.original_model.parameters()}
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    if cuda:
        return sum(torch.cuda.mem_get_info(i)[0] + torch.cuda.memory_reserved(i)
                   - torch.cuda.memory_allocated(i) for i in cuda)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rows_per_batch(need: Callable[[int], int], rows: int, available: int | None, *,
                   what: str = "a batch") -> int:
    """The most rows (at most ``rows``) one batch may hold so that ``need(rows)`` bytes fit
    in :data:`HEADROOM` of ``available``; a batch of more is run as parts of this many rows.

    ``need`` must grow with the rows (e.g. ``lambda r: batch_memory(model, r, ...).total``).
    ``available`` None (unknown) allows every row.

    Raises:
        SteerlabError: when even one row does not fit, with both numbers.

    Examples:
        >>> rows_per_batch(lambda r: r * 2**30, 8, available=5 * 2**30)
        4
    """
    if available is None or need(rows) <= HEADROOM * available:
        return rows
    one = need(1)
    if one > HEADROOM * available:
        raise SteerlabError(
            f"{what}: one row needs about {_size(one)} of memory, but {_size(available)} is "
            f"free (a batch plans with {HEADROOM:.0%} of it); shorten the input, lower the "
            "new tokens, or free memory", field="memory")
    lo, hi = 1, rows  # need(lo) fits, need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= HEADROOM * available else (lo, mid)
    return lo


def _size(n: int | float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
