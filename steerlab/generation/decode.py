"""The decode loop behind :func:`steerlab.generation.generate`, one loop for both engines.

Every row's state lives on the device (:class:`DecodeState`: tokens, metrics, finished and
in-output flags, ``</think>`` window, per-row limits, seeds and temperatures) and one function
advances it after each forward (:func:`advance`), with no host reads. The engines differ only
in the forward: ``eager`` feeds HF's growing ``DynamicCache``; ``static`` writes into a
:class:`steerlab.generation.cache.SlotCache` (:class:`SlotBatch`, whose decode step a CUDA graph
can
replay). Steering in force is added here, per row, from delta tensors (:class:`RowSteering`),
so a new strength or persona changes tensor values, never the captured step. The host reads
the state only every ``sync_every`` steps (all rows finished? new tokens for ``on_token``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerlab.base.compat import cache_keyword, output_cache
from steerlab.base.errors import SteerlabError
from steerlab.generation.lens import LastPositionRecorder, lens_metrics
from steerlab.generation.metrics import chosen_metrics
from steerlab.generation.sampling import sample
from steerlab.model.hooks import layer_hooks
from steerlab.model.inputs import left_pad, position_ids, stop_token_ids
from steerlab.steering.intervention import Positions, Steering, add_steering
from steerlab.steering.operators import Operator, clamp_projection
from steerlab.steering.step_state import StepState

Observer = Callable[[int, torch.Tensor, torch.Tensor], None]
EntryKey = tuple[int, str, bool]  # (layer, positions, preserve_norm)
ProjKey = tuple[int, str, str, int]  # (layer, positions, "projection", slot)
PROJECTION = ("unit", "lo", "hi", "weight")  # a projection entry's tensors


@dataclass(frozen=True)
class StepProgram:
    """What shapes the step program (a change means another captured step): metrics ``k``
    (0: none), lens, sampling, the ``</think>`` marker, stop ids, pad id."""

    k: int
    lens: bool
    sampling: bool
    marker: tuple[int, ...]
    stops: tuple[int, ...]
    pad_id: int

    @classmethod
    def for_model(cls, model: Any, *, sampling: bool, stop_ids: set[int] | None = None,
                  think_marker: Sequence[int] = (), k: int = 0, lens: bool = False) -> StepProgram:
        """The settings of a generation on ``model``: its stop ids (``stop_ids``, else the
        EOS ids of tokenizer and model) and pad id (the tokenizer's, else the first stop id).

        Args:
            model: a bridge from :func:`steerlab.load_model`.
            sampling: whether any row may sample (temperature > 0).
            stop_ids: token ids that end a row; ``None``: the EOS ids.
            think_marker: ids of ``</think>`` (empty: every row is in its output).
            k: top-k mass of the metrics (0: no metrics).
            lens: record the logit lens.

        Examples:
            >>> StepProgram.for_model(model, sampling=False).stops  # the EOS ids
            (2,)
        """
        tok = model.tokenizer
        stops = tuple(sorted(stop_ids or stop_token_ids(tok, model.original_model)))
        if not stops:
            raise SteerlabError("the tokenizer has no EOS id; give stop_ids", field="stop_ids")
        pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
        return cls(k, lens, sampling, tuple(think_marker), stops, int(pad))


class DecodeState:
    """Per-row decode state, one device tensor each, updated in place (graphs replay it).

    ``alloc(name, shape, dtype)`` gives the tensors: fresh ones (eager) or a workspace's
    persistent buffers (static)."""

    def __init__(self, alloc: Callable[..., torch.Tensor], rows: int, width: int,
                 settings: StepProgram, n_layers: int):
        self.rows, self.width, self.settings = rows, width, settings
        long, flag = torch.long, torch.bool
        self.active, self.hit_stop = alloc("active", (rows,), flag), alloc("hit", (rows,), flag)
        # a row whose logits went NaN or infinite: stopped, its reply failed (others go on)
        self.broken = alloc("broken", (rows,), flag)
        self.in_output = alloc("in_output", (rows,), flag)
        self.n_out, self.limit = alloc("n_out", (rows,), long), alloc("limit", (rows,), long)
        self.next_ids, self.seeds = alloc("next", (rows,), long), alloc("seeds", (rows,), long)
        self.temps = alloc("temps", (rows,), torch.float64)
        self.tokens = alloc("tokens", (rows, width), long)
        m = max(1, len(settings.marker))
        self.window, self.marker = alloc("window", (rows, m), long), alloc("marker", (m,), long)
        self.stops = alloc("stops", (max(1, len(settings.stops)),), long)
        self.index = alloc("index", (rows,), long)
        self.index.copy_(torch.arange(rows))
        self.marker.copy_(torch.tensor(settings.marker or (-1,)))
        self.stops.copy_(torch.tensor(settings.stops or (-1,)))
        shape = (rows, width)
        self.metrics = ({name: alloc(name, shape, torch.float32)
                         for name in ("entropy", "top_k_mass", "logprob")} if settings.k else {})
        if settings.lens:
            for name in ("lens_entropy", "lens_top_k_mass"):
                self.metrics[name] = alloc(name, (*shape, n_layers), torch.float32)

    def start(self, rows: torch.Tensor, limits: Sequence[int], temps: Sequence[float],
              seeds: Sequence[int]) -> None:
        """Reset ``rows`` for new prompts (the others keep decoding)."""
        dev = self.active.device
        self.active[rows] = True
        self.hit_stop[rows] = False
        self.broken[rows] = False
        self.in_output[rows] = not self.settings.marker
        self.n_out[rows] = 0
        self.limit[rows] = torch.tensor(list(limits), device=dev)
        self.temps[rows] = torch.tensor(list(temps), dtype=torch.float64, device=dev)
        self.seeds[rows] = torch.tensor(list(seeds), dtype=torch.long, device=dev)
        self.window[rows] = -1

    def finish(self, rows: torch.Tensor) -> None:
        """Stop ``rows`` now (cancelled, or slots left empty)."""
        self.active[rows] = False


def advance(st: DecodeState, logits: torch.Tensor, resid: torch.Tensor | None,
            rows: torch.Tensor | None = None, observer: Observer | None = None,
            step: int = 0, model: Any = None) -> None:
    """Choose each row's next token from ``logits`` and record it with its metrics.

    ``rows`` are the state rows the logits belong to (all by default); ``resid`` is the last
    position's ``resid_post`` per layer (lens). All on the device, no host reads."""
    # No .item(), .tolist() or `if` on a tensor here: a host read would wait for the device
    # every step and cannot be captured in a CUDA graph; the host reads the state every
    # `sync_every` steps instead. So every row is computed, finished ones too (fixed shapes,
    # no per-row branch), and masks decide what each row keeps.
    s = st.settings
    ix = st.index if rows is None else rows
    active, n_out = st.active[ix], st.n_out[ix]
    if observer is not None:
        observer(step, logits, active)
    nxt = logits.argmax(-1)
    if s.sampling:
        temps = st.temps[ix]
        drawn = sample(logits, torch.where(temps > 0, temps, 1.0), st.seeds[ix], n_out)
        nxt = torch.where(temps > 0, drawn, nxt)
    # a row writes at its own count of emitted tokens; a finished row's count no longer moves,
    # so what it writes lands past its reply, where readers (cut at n_out) never look
    col = n_out.clamp(max=st.width - 1)
    if s.k:
        ent, mass, logp = chosen_metrics(logits, s.k, nxt)
        values = {"entropy": ent, "top_k_mass": mass, "logprob": logp}
        if s.lens:
            lens_ent, lens_mass = lens_metrics(model, resid, s.k)
            values |= {"lens_entropy": lens_ent.T.to(ent.device),
                       "lens_top_k_mass": lens_mass.T.to(ent.device)}
        for name, value in values.items():
            st.metrics[name][ix, col] = value.float()
    # NaN logits argmax to an arbitrary id: such a row stops here, flagged, emitting nothing
    broken = active & ~torch.isfinite(logits).all(-1)
    st.broken[ix] = st.broken[ix] | broken
    # a stop token ends the row and is not part of the reply; hit_stop tells a stop from the
    # length limit (finish reason)
    is_stop = (nxt[:, None] == st.stops).any(-1) & active & ~broken
    emitted = active & ~is_stop & ~broken
    # -1 (no token id) where nothing was emitted: the write is unconditional, and a stop token
    # or a finished row's argmax must not sit in the buffer as if it were a token
    st.tokens[ix, col] = torch.where(emitted, nxt, -1)
    st.hit_stop[ix] = st.hit_stop[ix] | is_stop
    if s.marker:
        # the last len(marker) emitted tokens (-1 at start: matches no id); once they spell
        # `</think>` the row is in its output for good, so the next forward (output-only
        # steering) sees it
        window = st.window[ix]
        shifted = torch.cat([window[:, 1:], nxt[:, None]], dim=1)
        window = torch.where(emitted[:, None], shifted, window)
        st.window[ix] = window
        st.in_output[ix] = st.in_output[ix] | (emitted & (window == st.marker).all(-1))
    n_out = n_out + emitted
    st.n_out[ix] = n_out
    still = emitted & (n_out < st.limit[ix])
    st.active[ix] = still
    # the next forward's input: finished rows still run it, on the pad id
    st.next_ids[ix] = torch.where(still, nxt, s.pad_id)


class RowSteering:
    """The interventions of a batch as per-row tensors, hooked onto the decoder layers while
    generating: additions as deltas ``{(layer, positions, preserve_norm): [rows, d_model]}``,
    projection operators (ablate, cap, set) as ``{(layer, positions, slot): (unit [rows,
    d_model], lo, hi, weight [rows])}``, a row without one having weight 0.

    The tensors are what the step reads (a workspace's buffers in the static engine), so
    setting new strengths, bounds or vectors changes values only; the set of keys is the
    structure. Within a layer the projection operators act first, by slot (the order given),
    then the additions.
    """

    def __init__(self, model: Any, st: DecodeState, alloc: Callable[..., torch.Tensor]):
        self.model, self.st, self.alloc = model, st, alloc
        self.deltas: dict[EntryKey, torch.Tensor] = {}
        self.projections: dict[ProjKey, dict[str, torch.Tensor]] = {}
        self.prefill_rows: torch.Tensor | None = None  # rows of a prefill under way
        self.prefill = False
        self.rows: int | None = None  # a decode step over rows [0, rows) (None: all)

    @property
    def keys(self) -> tuple[Any, ...]:
        # additions (layer, positions, preserve_norm) and projections (layer, positions,
        # "projection", slot): tuples of different lengths, never equal
        return (*sorted(self.deltas), *sorted(self.projections))

    def set_rows(self, rows: torch.Tensor, steerings: Sequence[Sequence[Steering]]) -> bool:
        """Give ``rows[i]`` the steerings ``steerings[i]`` (replacing what they had); True
        when the set of keys changed."""
        before = self.keys
        for delta in self.deltas.values():
            delta[rows] = 0
        for entry in self.projections.values():
            entry["weight"][rows] = 0
        for i, row_steerings in enumerate(steerings):
            self.set_all_rows(rows[i : i + 1], row_steerings)
        self.drop_unused()
        return self.keys != before

    def set_all_rows(self, rows: torch.Tensor, steerings: Sequence[Steering]) -> None:
        """Add ``steerings`` to every row in ``rows`` (a per-row alpha indexes ``rows``)."""
        for steering in steerings:
            if steering.op is not Operator.ADD:
                self._set_projection(rows, steering)
                continue
            for layer, delta in steering.row_deltas(len(rows)).items():
                key = (layer, str(steering.positions), steering.preserve_norm)
                if key not in self.deltas:
                    d = self.alloc(f"delta:{key}", (self.st.rows, delta.shape[-1]),
                                   torch.float32)
                    d.zero_()
                    self.deltas[key] = d
                self.deltas[key][rows] += delta.to(self.deltas[key].device)

    def _set_projection(self, rows: torch.Tensor, steering: Steering) -> None:
        """Give ``rows`` a projection operator, in the first slot of each layer that none of
        them uses yet (so a row's operators keep the order they were given in)."""
        for layer, values in steering.row_bounds(len(rows)).items():
            slot, where = 0, str(steering.positions)
            while (found := self.projections.get((layer, where, "projection", slot))) \
                    is not None and bool(found["weight"][rows].ne(0).any()):
                slot += 1
            key = (layer, where, "projection", slot)
            if key not in self.projections:
                d = values[0].shape[-1]
                self.projections[key] = entry = {
                    name: self.alloc(f"{name}:{key}", (self.st.rows, d) if name == "unit"
                                     else (self.st.rows,), torch.float32)
                    for name in PROJECTION}
                for name in PROJECTION:
                    entry[name].zero_()
            entry = self.projections[key]
            for name, value in zip(PROJECTION, values, strict=True):
                entry[name][rows] = value.to(entry[name].device)

    def drop_unused(self) -> None:
        for key in [k for k, d in self.deltas.items() if not bool(d.ne(0).any())]:
            del self.deltas[key]
        for key in [k for k, e in self.projections.items()
                    if not bool(e["weight"].ne(0).any())]:
            del self.projections[key]

    def hooks(self) -> contextlib.AbstractContextManager[None]:
        """The decoder-layer hooks adding the deltas (graph-safe: tensor ops only)."""
        by_layer: dict[int, list[Any]] = {}
        for key in self.keys:
            by_layer.setdefault(key[0], []).append(key)

        def part(t: torch.Tensor) -> torch.Tensor:
            """The rows of the forward under way (a prefill's, or the step's first rows)."""
            if self.prefill:
                return t if self.prefill_rows is None else t[self.prefill_rows]
            return t[: self.rows]

        def hook_for(keys: list[Any]) -> Callable[[torch.Tensor], torch.Tensor]:
            projections = sorted(k for k in keys if k in self.projections)
            additions = [k for k in keys if k not in self.projections]

            def intervene(h: torch.Tensor) -> torch.Tensor:
                for key in [*projections, *additions]:
                    positions = Positions(key[1])
                    if self.prefill:
                        if positions is not Positions.ALL:
                            continue
                        rows = None
                    else:
                        n, st = self.rows, self.st
                        rows = positions.rows(StepState(False, st.active[:n],
                                                        st.in_output[:n]))
                    if key in self.projections:
                        e = self.projections[key]
                        h = clamp_projection(h, part(e["unit"]), part(e["lo"]), part(e["hi"]),
                                             part(e["weight"]), rows)
                    else:
                        h = add_steering(h, part(self.deltas[key]), rows, key[2])
                return h

            return intervene

        # first: monitors and the lens read the steered residual, as when steering by hooks
        return layer_hooks(self.model, {layer: hook_for(keys) for layer, keys in
                                        by_layer.items()}, graph_safe=True, first=True)


def forward(model: Any, ids: torch.Tensor, mask: torch.Tensor | dict[str, torch.Tensor],
            positions: torch.Tensor,
            cache: Any, recorder: LastPositionRecorder | None
            ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """One forward of the bridge's HF model: last-position logits (float32, on the first
    device), the cache it returns, and the lens residuals when recording. ``mask`` is a 2-D
    padding mask, a 4-D mask, or 4-D masks per layer type (``full_attention``,
    ``sliding_attention``) as HF's hybrid models take them."""
    hf = model.original_model
    result = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{cache_keyword(hf): cache})
    device = ids.device  # a split model's logits come out on the last GPU
    logits = result.logits[:, -1, :].float().to(device)
    return logits, output_cache(result), recorder.residuals() if recorder else None


def prefill(model: Any, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device,
            recorder: LastPositionRecorder | None
            ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor | None]:
    """The prompt pass through HF's own path: ``(logits, DynamicCache, mask, lens resid)``."""
    ids, mask = left_pad(prompts, pad_id, device)
    logits, cache, resid = forward(model, ids, mask, position_ids(mask), None, recorder)
    return logits, cache, mask, resid


def fresh(device: torch.device) -> Callable[..., torch.Tensor]:
    """An ``alloc`` of new tensors (the eager engine's state lives one call)."""
    return lambda name, shape, dtype: torch.zeros(shape, dtype=dtype, device=device)
