"""The static engine's memory: :class:`SlotCache` (a preallocated KV cache, one slot per batch
row with its own write position), the :class:`CacheLayout` it serves (full and sliding-window
attention layers; :func:`static_refusal` says why a model's cache cannot be served) and the
per-model :class:`Workspace` of persistent tensors and step programs, kept in a small LRU per
bucket."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlab.base.errors import SteerlabError
from steerlab.generation.graphs import CapturedStep
from steerlab.model.attention import hf_attention, kernel
from steerlab.model.state import state

log = logging.getLogger(__name__)

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class CacheLayout:
    """The attention of each decoder layer, as the static engine serves it.

    ``types[i]`` is ``full_attention`` or ``sliding_attention`` (HF's names, the keys of the
    per-type masks HF models take); sliding layers attend to the last ``window`` positions.
    The static cache keeps every position for every layer: a sliding layer's mask, not its
    cache, drops what fell out of its window.
    """

    types: tuple[str, ...]
    window: int | None = None

    @property
    def sliding(self) -> bool:
        """Whether any layer attends through a sliding window."""
        return SLIDING in self.types

    @property
    def mixed(self) -> bool:
        """Whether full and sliding layers mix (the mask goes per layer type)."""
        return len(set(self.types)) > 1


def cache_layout(model: Any) -> CacheLayout:
    """The layout of ``model``'s cache, or a :class:`SteerlabError` saying in one line why the
    static engine cannot serve it (the reasons :func:`static_refusal` gives).

    Examples:
        >>> cache_layout(model).types[:2]
        ('full_attention', 'full_attention')
    """
    hf = model.original_model
    name = type(hf).__name__
    if not hf_attention(model):
        raise SteerlabError("the static engine needs HF's attention modules; this model runs "
                            "the bridge's eager attention (loaded with attn_implementation="
                            "'eager'): load it with the default 'auto', or use engine='eager'",
                            field="engine")
    if kernel(model).startswith("flash"):
        raise SteerlabError(f"the static engine passes a 4-D mask, which {kernel(model)} does "
                            "not take: load with attn_implementation='auto' or 'sdpa', or use "
                            "engine='eager'", field="engine")
    types, windows = _layer_types(hf.config)
    other = sorted(set(types) - {FULL, SLIDING})
    if other or len(types) != model.cfg.n_layers:
        what = ", ".join(other) or f"{len(types)} cache layers for {model.cfg.n_layers}"
        raise SteerlabError(f"{name}'s layers include {what}: a cache the static engine does "
                            "not hold (full and sliding-window attention only): use "
                            "engine='eager'", field="engine")
    if getattr(hf, "_is_stateful", False):
        raise SteerlabError(f"{name} keeps a recurrent state, not a KV cache the static engine "
                            "can hold: use engine='eager'", field="engine")
    if len(set(windows)) > 1:
        raise SteerlabError(f"{name}'s sliding layers have different windows "
                            f"{sorted(set(windows))}: use engine='eager'", field="engine")
    return CacheLayout(tuple(types), windows[0] if windows else None)


def static_refusal(model: Any) -> str | None:
    """Why the static engine cannot serve ``model`` (one line), or None when it can."""
    try:
        cache_layout(model)
    except SteerlabError as err:
        return err.message
    return None


def _layer_types(config: Any) -> tuple[list[str], list[int]]:
    """Each layer's attention type (HF's own inference from the config where this
    transformers has it) and the sliding layers' windows."""
    text = config.get_text_config(decoder=True)
    try:
        # deferred: transformers
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(text)
        windows = [k["sliding_window"] for t, k in zip(types, kwargs, strict=False)
                   if t == SLIDING]
    except ImportError:  # an older transformers: the config fields
        window = getattr(text, "sliding_window", None)
        types = list(getattr(text, "layer_types", None)
                     or [SLIDING if window else FULL] * text.num_hidden_layers)
        windows = [window] * types.count(SLIDING)
    return [str(t) for t in types], [int(w) for w in windows]


class SlotCache:
    """A KV cache of fixed shape ``[slots, kv_heads, capacity, head_dim]`` per layer.

    Each row (slot) writes its next key at its own position ``write[row]``, so rows of
    different lengths, and rows that join a running batch later, share one cache. Prompts are
    prefilled through HF's own path and copied in with :meth:`load`; a decode step over the
    first ``rows`` slots calls :meth:`begin` once, then every layer's attention calls
    :meth:`update` (what HF attention calls) with one new position per row.
    """

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.write: torch.Tensor | None = None  # [slots] long, on the first layer's device
        self.rows = slots  # the rows of the step under way (set by begin)
        # per layer, for the step under way: keys and values of its rows, scatter indices
        self._step: list[tuple[torch.Tensor, ...]] = []
        self._plans: dict[int, list[tuple[torch.Tensor, ...]]] = {}  # by rows, one device
        self._planned_write: torch.Tensor | None = None  # the write buffer the plans view

    @property
    def ready(self) -> bool:
        return bool(self.keys)

    def load(self, rows: torch.Tensor, prefill: Any, width: int) -> None:
        """Copy a prefill's ``DynamicCache`` (``width`` positions) into slots ``rows``; the
        rest of each row is zeroed.

        A sliding-window layer of the prefill holds only its last positions (HF trims it to
        the window): they are copied to where they stand, ending at ``width``; the positions
        before them are zeros that the layer's mask never lets a later query see.

        Zeroing matters: positions past ``width`` are masked, but attention still multiplies
        their values by a weight of zero, and ``0 * NaN`` is NaN. A row that went non-finite
        (a hostile steering) would otherwise poison whichever request takes its slot next."""
        layers = prefill.layers
        if any(getattr(layer, "keys", None) is None for layer in layers):
            kind = type(next(la for la in layers if getattr(la, "keys", None) is None)).__name__
            raise SteerlabError(f"the prefill's cache has a {kind} layer the static engine "
                                "cannot hold: use engine='eager'", field="engine")
        if not self.keys:
            for layer in layers:
                k, v = layer.keys, layer.values
                shape = (self.slots, k.shape[1], self.capacity)
                self.keys.append(k.new_zeros((*shape, k.shape[-1])))
                self.values.append(v.new_zeros((*shape, v.shape[-1])))
            if self.write is None:
                self.write = torch.zeros(self.slots, dtype=torch.long,
                                         device=self.keys[0].device)
        for i, layer in enumerate(layers):
            at = rows.to(self.keys[i].device)
            start = width - layer.keys.shape[2]  # > 0: a sliding layer's last positions
            for mine, theirs in ((self.keys[i], layer.keys), (self.values[i], layer.values)):
                mine[at, :, start:width] = theirs.to(mine.dtype)
                mine[at, :, :start] = 0
                mine[at, :, width:] = 0

    def begin(self, rows: int) -> None:
        """Prepare a decode step over slots ``[0, rows)``: each layer's keys and values of
        those rows (views: the same addresses, for a captured graph) and its scatter index
        (views of ``write``), built here once, not in every layer's :meth:`update`. On one
        device the plan of each ``rows`` is kept (``write`` changes in place); a model split
        over devices copies ``write`` to each device once a step."""
        self.rows = rows
        if self._plans and self._planned_write is not self.write:
            self._plans.clear()  # a new write buffer: the kept views read the old one
        plan = self._plans.get(rows)
        if plan is None:
            plan, local = self._plan(rows)
            if local:
                self._plans[rows], self._planned_write = plan, self.write
        self._step = plan

    def _plan(self, rows: int) -> tuple[list[tuple[torch.Tensor, ...]], bool]:
        assert self.write is not None and self.keys, "load a prefill first"
        writes: dict[torch.device, torch.Tensor] = {}
        plan = []
        for keys, values in zip(self.keys, self.values, strict=True):
            dev = keys.device
            if dev not in writes:
                writes[dev] = self.write[:rows].to(dev).view(rows, 1, 1, 1)
            w = writes[dev]
            plan.append((keys[:rows], values[:rows],
                         w.expand(rows, keys.shape[1], 1, keys.shape[3]),
                         w.expand(rows, values.shape[1], 1, values.shape[3])))
        return plan, set(writes) == {self.write.device}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one position per row of the step (:meth:`begin`) at ``write``, in place, and
        return those rows' whole cache."""
        keys, values, k_at, v_at = self._step[layer_idx]
        if key_states.dtype != keys.dtype:  # HF's attention computes in the cache's dtype
            key_states = key_states.to(keys.dtype)
        if value_states.dtype != values.dtype:
            value_states = value_states.to(values.dtype)
        keys.scatter_(2, k_at, key_states)
        values.scatter_(2, v_at, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class Workspace:
    """The static tensors of one bucket (``slots`` rows, ``capacity`` positions): the cache,
    the decode state and the captured steps, kept on the model and reused across calls."""

    slots: int
    capacity: int
    cache: SlotCache
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: dict[Any, CapturedStep] = field(default_factory=dict)
    builds: int = 0  # how many step programs were built (captured on CUDA) for this bucket

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
        """A persistent buffer, allocated once per name, shape, dtype and device and never
        moved (a captured graph reads it at its address)."""
        key = f"{name}|{tuple(shape)}|{dtype}|{device}"
        t = self.tensors.get(key)
        if t is None:
            t = self.tensors[key] = torch.zeros(shape, dtype=dtype, device=device)
        return t

    def step(self, key: Any, device: torch.device, graphs: bool) -> CapturedStep:
        """The step program for ``key``, built once (captured on CUDA when ``graphs``)."""
        found = self.steps.get(key)
        if found is None:
            found = self.steps[key] = CapturedStep(device, graphs, self.tensors)
            self.builds += 1
        return found


MAX_WORKSPACES = 3  # buckets kept per model; the least recently used one is dropped


def workspaces(model: Any) -> OrderedDict[tuple[int, int], Workspace]:
    """The workspaces kept for ``model`` by bucket ``(slots, capacity)``, least recently used
    first (in :func:`steerlab.model.state.state`)."""
    return state(model).workspaces


def workspace(model: Any, slots: int, capacity: int) -> Workspace:
    """The model's workspace for a bucket, created on first use (LRU of :data:`MAX_WORKSPACES`)."""
    kept = workspaces(model)
    key = (slots, capacity)
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    while len(kept) >= MAX_WORKSPACES:
        dropped, _ = kept.popitem(last=False)
        log.info("dropping the static-engine workspace of bucket %s", dropped)
    kept[key] = ws = Workspace(slots, capacity, SlotCache(slots, capacity))
    return ws


def release_workspaces(model: Any) -> None:
    """Free every static-engine workspace (KV caches, captured graphs) held for ``model``."""
    workspaces(model).clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def captures(model: Any) -> int:
    """Step programs built (CUDA graphs captured on GPUs) for ``model`` so far."""
    return sum(ws.builds for ws in workspaces(model).values())
