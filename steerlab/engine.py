"""Generation engines: where the KV cache lives and how a decode step is run.

``eager`` is the classic loop: HF's growing ``DynamicCache`` and one Python-driven forward per
step. ``static`` preallocates a KV cache of fixed capacity (:class:`SlotCache`, one slot per
batch row, each with its own write position), rounds batch sizes and lengths up to a few
buckets (:func:`bucket_batch`, :func:`bucket_capacity`) and keeps every per-call value (input
ids, positions, masks, steering deltas, strengths, sampling parameters, finished rows) in
tensors that live in a :class:`Workspace` reused across calls. On CUDA the decode step is
captured once per bucket as a CUDA graph and replayed; on the CPU the same step runs without a
graph, so the tests exercise the same code. :func:`count_host_syncs` counts the device-to-host
reads of a block of code (a graph cannot hold any).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from steerlab.choice import Choice
from steerlab.model_state import state

log = logging.getLogger(__name__)


class Engine(Choice):
    """How generation runs: ``eager`` (growing cache, one Python step at a time), ``static``
    (preallocated cache, step captured as a CUDA graph on GPUs), ``auto`` (the rule of
    :meth:`resolve`)."""

    AUTO = "auto"
    EAGER = "eager"
    STATIC = "static"

    def resolve(self, model: Any, *, batching: bool = False, stepwise: bool = False) -> Engine:
        """The concrete engine for ``model``: the one rule of ``auto``.

        ``auto`` is static when the model runs HF attention kernels (the static engine's
        need) and either it sits on one CUDA device (where a graph pays) or the caller is
        ``batching`` (a server: continuous batching is what it is for, even on the CPU);
        eager otherwise, and always when ``stepwise`` Python code watches every step.

        Args:
            model: a bridge from :func:`steerlab.load_model`.
            batching: a server batching requests into one running batch.
            stepwise: an observer or step listener is told every step (nothing to replay).

        Example:
            >>> Engine.parse("auto").resolve(model, batching=True)  # HF attention: static
        """
        if self is not Engine.AUTO:
            return self
        if stepwise or not hf_attention(model):
            return Engine.EAGER
        on_cuda = one_device(model) and \
            next(model.original_model.parameters()).device.type == "cuda"
        return Engine.STATIC if batching or on_cuda else Engine.EAGER


def one_device(model: Any) -> bool:
    """Whether all the weights are on one device (a graph cannot span a split model)."""
    return len({p.device for p in model.original_model.parameters()}) == 1


def hf_attention(model: Any) -> bool:
    """Whether the model runs HF's attention modules (any kernel but the bridge's eager
    re-implementation), which the static engine needs: they accept its cache and 4-D mask."""
    return getattr(model.original_model.config, "_attn_implementation", "eager") != "eager"


def bucket_batch(n: int) -> int:
    """Batch rows rounded up to a power of two, so a few captured graphs serve every batch."""
    return 1 << max(0, (n - 1).bit_length())


def bucket_capacity(n: int) -> int:
    """KV-cache positions rounded up to a power of two, at least 128."""
    return max(128, 1 << max(0, (n - 1).bit_length()))


class SlotCache:
    """A KV cache of fixed shape ``[slots, kv_heads, capacity, head_dim]`` per layer.

    Each row (slot) writes its next key at its own position ``write[row]``, so rows of
    different lengths, and rows that join a running batch later, share one cache. Prompts are
    prefilled through HF's own path and copied in with :meth:`load`; decode steps call
    :meth:`update` (what HF attention calls) with one new position per row.
    """

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.write: torch.Tensor | None = None  # [slots] long, on the first layer's device
        self._index: list[torch.Tensor] = []

    @property
    def ready(self) -> bool:
        return bool(self.keys)

    def load(self, rows: torch.Tensor, prefill: Any, width: int) -> None:
        """Copy a prefill's ``DynamicCache`` (``width`` positions) into slots ``rows``; the
        rest of each row is zeroed.

        Zeroing matters: positions past ``width`` are masked, but attention still multiplies
        their values by a weight of zero, and ``0 * NaN`` is NaN. A row that went non-finite
        (a hostile steering) would otherwise poison whichever request takes its slot next."""
        layers = prefill.layers
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
            self.keys[i][at, :, :width] = layer.keys.to(self.keys[i].dtype)
            self.values[i][at, :, :width] = layer.values.to(self.values[i].dtype)
            self.keys[i][at, :, width:] = 0
            self.values[i][at, :, width:] = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one position per row at ``write`` (in place) and return the whole cache."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        write = self.write.to(keys.device)
        b, h, _, d = key_states.shape
        keys.scatter_(2, write.view(b, 1, 1, 1).expand(b, h, 1, d), key_states.to(keys.dtype))
        dv = value_states.shape[-1]
        values.scatter_(2, write.view(b, 1, 1, 1).expand(b, h, 1, dv),
                        value_states.to(values.dtype))
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
    first (in :func:`steerlab.model_state.state`)."""
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


class CapturedStep:
    """A decode step: on CUDA captured once as a graph and replayed, elsewhere run as is.

    Capture runs the step for real (warm-up and recording), so the small state tensors are
    restored afterwards; the cache writes it makes are the ones the real step makes anyway.
    A step that cannot be captured (a hook that reads from the device) runs uncaptured, with
    a warning.
    """

    def __init__(self, device: torch.device, graphs: bool, state: dict[str, torch.Tensor]):
        self.graph: Any = None
        self.state = state
        self.wanted = graphs and device.type == "cuda"

    def run(self, fn: Callable[[], None]) -> None:
        """Run the step: replay the graph, capture ``fn`` the first time, or just call it.

        ``fn`` must read and write only the workspace's tensors (and the weights): a graph
        replays the addresses it saw when captured."""
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.wanted:
            fn()
            return
        self.wanted = False  # capture once
        # The warm-up runs the step for real, advancing the decode state (tokens, counts,
        # write positions; a capture only records): it is saved here and put back after each
        # run, so the step that follows starts from the state it was given. The KV cache is
        # not saved: a warm-up writes there what the real step writes, at the same positions.
        saved = {k: v.clone() for k, v in self.state.items()}
        try:
            # Warm-up, as in PyTorch's CUDA-graph recipe (a few calls on a side stream, then
            # joined back): a step's first calls do lazy one-time CUDA work (library handles
            # and workspaces, kernel choice, allocator growth) that must happen before the
            # capture, not be recorded into it. Two calls leave a margin for work a first call
            # leaves to the next.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
                    _restore(self.state, saved)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=_pool()):  # one pool for every step: see _pool
                fn()
            self.graph = graph
        except RuntimeError as err:
            log.warning("the decode step could not be captured as a CUDA graph (%s); "
                        "running it without one", str(err).splitlines()[0])
            torch.cuda.synchronize()
        _restore(self.state, saved)  # also after a warm-up that failed half-way
        self.run(fn)


def _restore(state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    for k, v in saved.items():
        state[k].copy_(v)


_POOL: Any = None


def _pool() -> Any:
    # One memory pool for every captured step, not a private pool per graph (each would hold
    # its intermediates for as long as the graph lives: one per bucket and step structure).
    # Sharing is safe because steps replay one at a time and keep nothing in pool memory
    # that a later step reads: what a step keeps goes into its workspace (state, KV cache).
    global _POOL
    if _POOL is None:
        _POOL = torch.cuda.graph_pool_handle()
    return _POOL


_HOST_READS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select",
               "unique_dim", "_unique2", "item"}


class _SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        to_host = name in ("_to_copy", "copy_") and _device_to_host(func, args, kwargs)
        if name in _HOST_READS or to_host:
            self.count += 1
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _device_to_host(func: Any, args: Any, kwargs: Any) -> bool:
    kwargs = kwargs or {}
    src = args[0] if args else None
    if func.__name__.startswith("copy_"):
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    dev = kwargs.get("device")
    return src is not None and src.device.type != "cpu" and dev is not None and \
        torch.device(dev).type == "cpu"


@dataclass
class SyncCount:
    """Host reads counted by :func:`count_host_syncs`: the total and per operation."""

    count: int = 0
    ops: dict[str, int] = field(default_factory=dict)


@contextmanager
def count_host_syncs() -> Iterator[SyncCount]:
    """Count the operations inside that make the host wait for device data.

    Counts ``.item()``/``bool()`` reads, data-dependent shapes (``nonzero``, ``masked_select``),
    device-to-host copies, and ``tolist()``/``numpy()`` calls (which on the CPU do not pass
    through torch's dispatcher). Each would be a synchronisation on a GPU and makes a CUDA graph
    capture fail.

    Example:
        >>> with count_host_syncs() as syncs:
        ...     generate(model, [ids], max_new_tokens=8)
        >>> syncs.count
    """
    result = SyncCount()
    mode = _SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counting(name: str) -> Callable[..., Any]:
        original = originals[name]

        def read(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            result.count += 1
            result.ops[name] = result.ops.get(name, 0) + 1
            return original(self, *a, **k)

        return read

    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    try:
        with mode:
            yield result
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        result.count += mode.count
        for name, n in mode.ops.items():
            result.ops[name] = result.ops.get(name, 0) + n
