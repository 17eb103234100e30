"""The static engine's running batch: rows (slots) on a preallocated KV cache.

:class:`SlotBatch` admits prompts into free slots (one prefill through HF's own path, copied
into the :class:`steerlab.generation.cache.SlotCache`), runs decode steps over the occupied
slots' bucket (the first ``bucket_batch(1 + highest occupied slot)`` rows; a CUDA graph per
bucket and step structure on GPUs) and lets the caller read the state at checks.
``generate`` admits a whole batch and runs it to the end; ``steerlab serve`` keeps one
running and refills a finished row's slot with the next request (the lowest free slot first,
so the occupied slots stay packed at the front and the step's bucket small).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from steerlab.base.errors import SteerlabError
from steerlab.generation.cache import FULL, SLIDING, cache_layout, workspace
from steerlab.generation.decode import (
    DecodeState,
    RowSteering,
    StepProgram,
    advance,
    forward,
    prefill,
)
from steerlab.generation.engine import bucket_batch, one_device
from steerlab.generation.lens import LastPositionRecorder
from steerlab.model.attention import kernel
from steerlab.model.hooks import unsafe_hooks
from steerlab.model.inputs import position_ids
from steerlab.steering.intervention import Steering
from steerlab.steering.step_state import generating, listeners


class SlotBatch:
    """``slots`` rows decoding together on a static cache of ``capacity`` positions.

    Examples:
        >>> settings = StepProgram.for_model(model, sampling=False)
        >>> batch = SlotBatch(model, 2, 64, settings)  # 2 rows of 64 positions
        >>> ids = sl.encode_chat(model.tokenizer, "Hello!")
        >>> with batch.running():
        ...     batch.admit([0], [ids], limits=[8], temps=[0.0], seeds=[0])
        ...     while batch.any_active():
        ...         batch.step()
    """

    @torch.inference_mode()
    def __init__(self, model: Any, slots: int, capacity: int, settings: StepProgram, *,
                 graphs: bool = True):
        self.layout = cache_layout(model)  # or one line saying why not
        self.model, self.settings = model, settings
        self.device = next(model.original_model.parameters()).device
        self.ws = workspace(model, slots, capacity)
        self.slots, self.capacity = slots, capacity
        alloc = self._alloc
        self.st = DecodeState(alloc, slots, capacity, settings, model.cfg.n_layers)
        self.st.active.zero_()
        self.valid = alloc("valid", (slots, capacity), torch.bool)
        self.valid.zero_()
        self.rope = alloc("rope", (slots,), torch.long)
        # the position of each cache entry (sliding layers mask by distance in positions)
        self.key_pos = alloc("key_pos", (slots, capacity), torch.long)
        # eager attention adds its mask to the scores: 0 where seen, the dtype's min elsewhere
        self.mask_dtype = next(model.original_model.parameters()).dtype
        self.additive = kernel(model) == "eager"
        self.cache = self.ws.cache
        self.cache.write = alloc("write", (slots,), torch.long)
        self.cache.write.zero_()
        self.steering = RowSteering(model, self.st, alloc)
        self.recorder = LastPositionRecorder(model) if settings.lens else None
        self.graphs = graphs
        self._hooks: contextlib.ExitStack | None = None
        self._replayable = False
        self._occupied: set[int] = set()  # slots admitted and not released (host side)

    def _alloc(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.ws.tensor(name, shape, dtype, self.device)

    @contextlib.contextmanager
    def running(self) -> Iterator[SlotBatch]:
        """Hold the model for this batch: its hooks (steering, lens) on, other steering
        hooks aside, inference mode: the workspace's tensors are inference tensors)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(generating(self.model))
            if self.recorder is not None:
                stack.enter_context(self.recorder.recording())
            # hooks from outside (monitors, users' own) run in Python every step: no graphs
            # and a model split over GPUs runs its step uncaptured (a graph is one device's)
            self._replayable = self.graphs and not listeners(self.model) and \
                unsafe_hooks(self.model) == 0 and one_device(self.model)
            self._hooks = stack.enter_context(contextlib.ExitStack())
            self._hooks.enter_context(self.steering.hooks())
            try:
                yield self
            finally:
                self._hooks = None

    def _rehook(self) -> None:
        assert self._hooks is not None, "use the batch inside running()"
        self._hooks.close()
        self._hooks.enter_context(self.steering.hooks())

    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], *,
              limits: Sequence[int], temps: Sequence[float], seeds: Sequence[int],
              steerings: Sequence[Sequence[Steering]] | None = None,
              steer_all: Sequence[Steering] = ()) -> None:
        """Prefill ``prompts`` into ``slots`` and choose their first tokens.

        ``steerings[i]`` steer slot ``slots[i]`` alone; ``steer_all`` steer every admitted row
        (per-row strengths index the admitted rows)."""
        need = max(len(p) for p in prompts) + max(limits)
        if need > self.capacity:
            raise SteerlabError(f"a prompt of {max(len(p) for p in prompts)} tokens with "
                                f"{max(limits)} new ones needs {need} positions; the cache "
                                f"holds {self.capacity}", field="max_tokens")
        rows = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        st = self.st
        st.start(rows, limits, temps, seeds)
        changed = self.steering.set_rows(rows, steerings or [() for _ in slots])
        if steer_all:
            self.steering.set_all_rows(rows, steer_all)
            changed = True
        if changed:
            self._rehook()
        self.steering.prefill, self.steering.prefill_rows = True, rows
        try:
            logits, dyn, mask, resid = prefill(self.model, prompts, self.settings.pad_id,
                                               self.device, self.recorder)
        finally:
            self.steering.prefill, self.steering.prefill_rows = False, None
        width = mask.shape[1]
        self.cache.load(rows, dyn, width)
        self.valid[rows] = False
        self.valid[rows, :width] = mask.bool()
        self.key_pos[rows, :width] = position_ids(mask)
        self.cache.write[rows] = width
        self.rope[rows] = mask.sum(-1)
        advance(st, logits, resid, rows=rows, model=self.model)
        self._occupied.update(slots)

    def release(self, slots: Sequence[int]) -> None:
        """Stop ``slots`` and drop their steering (their slots may be admitted again)."""
        rows = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        self.st.finish(rows)
        self._occupied.difference_update(slots)
        if self.steering.set_rows(rows, [() for _ in slots]):
            self._rehook()

    @property
    def step_rows(self) -> int:
        """The rows a step runs over: the power of two covering the highest occupied slot
        (at most ``slots``), so a lone request in slot 0 steps over one row."""
        top = max(self._occupied, default=0)
        return min(self.slots, bucket_batch(top + 1))

    def _decode(self, n: int) -> None:
        st, cache = self.st, self.cache
        write, rope = cache.write[:n], self.rope[:n]  # views: rows [0, n) of the buffers
        fed = st.active[:n].clone()
        self.valid[:n].scatter_(1, write[:, None], True)
        self.key_pos[:n].scatter_(1, write[:, None], rope[:, None])
        cache.begin(n)
        self.steering.rows = n
        logits, _, resid = forward(self.model, st.next_ids[:n, None], self._masks(n),
                                   rope[:, None], cache, self.recorder)
        advance(st, logits, resid, rows=st.index[:n], model=self.model)
        write += fed
        rope += fed

    def _masks(self, n: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """The decode step's 4-D masks over rows ``[0, n)``: every valid position for
        full-attention layers, the last ``window`` positions of those for sliding ones (HF's
        rule: a key at distance less than the window), per layer type when they mix."""
        valid = self.valid[:n]
        masks = {FULL: valid}
        if self.layout.sliding:
            near = self.key_pos[:n] > (self.rope[:n] - self.layout.window)[:, None]
            masks[SLIDING] = valid & near
        out = {}
        for name, mask in masks.items():
            mask = mask[:, None, None, :]
            if self.additive:
                mask = torch.zeros(mask.shape, dtype=self.mask_dtype, device=mask.device) \
                    .masked_fill(~mask, torch.finfo(self.mask_dtype).min)
            out[name] = mask
        return out if self.layout.mixed else out[self.layout.types[0]]

    def step(self) -> None:
        """One decode step over the first :attr:`step_rows` slots (finished and empty slots
        among them compute but change nothing; the slots past them are not touched);
        replayed from a graph captured per row count and step structure on CUDA."""
        n = self.step_rows
        key = (self.settings, self.steering.keys, self._replayable, n)
        self.ws.step(key, self.device, self._replayable).run(lambda: self._decode(n))

    def any_active(self) -> bool:
        """Whether any slot is still generating (one host read)."""
        return bool(self.st.active.any())
