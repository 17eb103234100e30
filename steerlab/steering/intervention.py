"""Steering: the one intervention value (add, ablate, cap, set at chosen layers) and ``steer``.

:class:`Steering` is the one steering value (vector, layers, strengths, positions), validated
once by :meth:`Steering.create`; :func:`steer` is a context manager over
:func:`steerlab.model.hooks.layer_hooks`, so it acts on bridge forwards and on
:func:`steerlab.generation.generator.generate` alike, and the hooks are removed on exit. The
operators beyond addition are :mod:`steerlab.steering.operators`; monitoring is
:mod:`steerlab.steering.monitoring`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Bool, Float

from steerlab.base.choice import Choice
from steerlab.base.errors import SteerlabError
from steerlab.model.hooks import check_layers, layer_hooks
from steerlab.steering.norms import vector_norms
from steerlab.steering.operators import Operator, clamp_projection, projection_bounds, strength
from steerlab.steering.reference import resolve_bound
from steerlab.steering.step_state import StepState, in_force, is_generating
from steerlab.steering.vector import SteeringVector

log = logging.getLogger(__name__)

# The largest norm a steering may add at a layer: far above any residual stream (typically
# 10 to 10^4), far below what overflows a float32 norm layer (squares summed over d_model).
MAX_DELTA_NORM = 1e6


def add_steering(h: Float[torch.Tensor, "batch pos d_model"],
                 delta: Float[torch.Tensor, "batch d_model"],
                 rows: Bool[torch.Tensor, " batch"] | None,
                 preserve_norm: bool) -> Float[torch.Tensor, "batch pos d_model"]:
    """``h + delta`` at the rows ``rows`` marks (all when None), every position: the one
    steering arithmetic of the package. With ``preserve_norm`` each steered residual is
    rescaled to its old norm (only its direction turns)."""
    d = delta.to(device=h.device, dtype=h.dtype)[:, None, :]
    if rows is not None:
        d = d * rows.to(device=h.device, dtype=h.dtype)[:, None, None]
    out = h + d
    if not preserve_norm:
        return out
    size = h.float().norm(dim=-1, keepdim=True)
    kept = out * (size / out.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(h.dtype)
    return torch.where(d.ne(0).any(dim=-1, keepdim=True), kept, h)


class Units(Choice):
    """What a steering strength ``alpha`` is measured in.

    ``norm``: a fraction of the layer's typical residual norm (see :mod:`steerlab.steering.norms`):
    ``alpha * norm_L * v_L / ||v_L||`` is added, so a strength means the same push for every
    vector, layer and model (0.1 is a tenth of a typical residual). ``raw``: a multiple of the
    vector as stored, ``alpha * v_L`` (its size depends on how it was fitted).
    """

    NORM = "norm"
    RAW = "raw"


# The one default of every strength a user gives without units (Steering.create, steer, the
# chat's /steer, the widget's slider, serve's requests, `vectors eval`): norm units, so one
# number means the same push for every vector, layer and model.
DEFAULT_UNITS = Units.NORM


class Positions(Choice):
    """Which positions a steering vector is added at.

    ``all``: every position of every forward pass (prompt included); ``generated``: only the
    tokens :func:`steerlab.generation.generator.generate` produces; ``output``: generated tokens
    after
    ``</think>`` (all generated ones when the model is not thinking). Outside ``generate`` the
    last two steer nothing.
    """

    ALL = "all"
    GENERATED = "generated"
    OUTPUT = "output"

    def rows(self, state: StepState | None) -> torch.Tensor | None | bool:
        """A ``[batch]`` row mask for the forward pass ``state`` describes, ``None`` for every
        row and position, or ``False`` for nothing."""
        if self is Positions.ALL:
            return None
        if state is None or state.prefill:
            return False
        return state.generated if self is Positions.GENERATED else \
            state.generated & state.in_output


def _strengths(alpha: Any) -> float | tuple[float, ...]:
    """A strength, or one per batch row (a sequence or ``[batch]`` tensor), as finite floats."""
    if isinstance(alpha, torch.Tensor):
        if alpha.ndim > 1:
            raise SteerlabError(f"alpha must be a number or one per batch row; got shape "
                                f"{tuple(alpha.shape)}", field="alpha")
        alpha = alpha.tolist()
    if isinstance(alpha, (list, tuple)):
        return tuple(strength(a) for a in alpha)
    return strength(alpha)


@dataclass(frozen=True)
class Steering:
    """One steering intervention: ``alpha * vector.direction(L)`` added at each layer ``L``.

    The single steering value of the package (the CLI, chat, server, evaluation and
    :func:`steer` all build one); made by :meth:`create`, which validates it against the
    model once, and applied with :meth:`apply`. ``alpha`` is a strength in units of the
    vector's stored scale, or a tuple with one strength per batch row.

    Examples:
        >>> s = sl.Steering.create(model, vec, 4.0, layers=[10])
        >>> ids = [sl.encode_chat(model.tokenizer, "Hello!")]
        >>> with s.apply(model):
        ...     steered = sl.generate(model, ids, max_new_tokens=8)
        >>> s.with_alpha(-2.0).alpha, s.alpha  # a new value; the old one is unchanged
        (-2.0, 4.0)
    """

    vector: SteeringVector
    alpha: float | tuple[float, ...]
    layers: tuple[int, ...]
    positions: Positions = Positions.ALL
    units: Units = Units.RAW
    scale: tuple[float, ...] = ()  # per layer: what alpha multiplies the direction by
    preserve_norm: bool = False
    op: Operator = Operator.ADD
    # per layer, for ablate, cap and set: the bounds of the projection on the unit direction,
    # in raw units (-inf / inf: open); alpha is then the share of the move (1: all of it)
    lo: tuple[float, ...] = ()
    hi: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        """Refuse a steering whose added vector is not finite or beyond :data:`MAX_DELTA_NORM`
        at some layer, or whose bounds are not ordered finite-or-open values within it
        (checked on every new value: :meth:`create`, :meth:`with_alpha`)."""
        if self.op is not Operator.ADD:
            self._check_bounds()
            return
        values = self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)
        strongest = max((abs(a) for a in values), default=0.0)
        if strongest == 0.0:
            return
        scales = self.scale or (1.0,) * len(self.layers)
        for layer, k in zip(self.layers, scales, strict=True):
            size = strongest * abs(k) * float(self.vector.direction(layer).double().norm())
            if not size <= MAX_DELTA_NORM:  # NaN fails too
                what = "is not finite" if not math.isfinite(size) else f"has norm {size:.3g}"
                raise SteerlabError(
                    f"the vector added at layer {layer} (alpha {strongest:g} x scale {k:.3g} "
                    f"x direction) {what}; at most {MAX_DELTA_NORM:g} is allowed (the "
                    "residual stream would overflow: check the vector's residual norms and "
                    "the strength)", field="alpha")

    def _check_bounds(self) -> None:
        values = self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)
        if any(not 0.0 <= a <= 1.0 for a in values):
            raise SteerlabError(f"{self.op.value} takes alpha between 0 and 1 (the share of "
                                f"the move; 1: all of it); got {self.alpha!r}", field="alpha")
        if not len(self.lo) == len(self.hi) == len(self.layers):
            raise SteerlabError(f"{self.op.value} needs one bound per layer", field="bounds")
        for layer, lo, hi in zip(self.layers, self.lo, self.hi, strict=True):
            for bound in (lo, hi):
                if math.isnan(bound) or (math.isfinite(bound) and abs(bound) > MAX_DELTA_NORM):
                    raise SteerlabError(f"the bound {bound:g} at layer {layer} is not a "
                                        f"number within +-{MAX_DELTA_NORM:g}", field="bounds")
            if not lo <= hi or lo == math.inf or hi == -math.inf:
                raise SteerlabError(f"the bounds at layer {layer} are [{lo:g}, {hi:g}]; "
                                    "expected lo <= hi", field="bounds")
            if not float(self.vector.direction(layer).double().norm()) > 0:
                raise SteerlabError(f"the vector is zero at layer {layer}; {self.op.value} "
                                    "needs a direction", field="vector")

    @classmethod
    def create(cls, model: Any, vector: SteeringVector, alpha: Any = 1.0, *,
               layers: Sequence[int] | None = None,
               positions: str | Positions = Positions.ALL,
               units: str | Units = DEFAULT_UNITS,
               preserve_norm: bool = False,
               op: str | Operator = Operator.ADD,
               bounds: tuple[float | int | str | None, float | int | str | None] | None = None,
               target: float | int | str | None = None) -> Steering:
        """A checked intervention: finite strengths, layers that the model and the vector
        both have (negative ones count from the end), the vector's width equal to the model's.

        Args:
            alpha: ``add``: the strength (or one per batch row); ``ablate``, ``cap``, ``set``:
                the share of the move, 0 to 1 (1, the default: all of it; per row too).
            units: ``"norm"`` (the default, :data:`DEFAULT_UNITS`: a fraction of the layer's
                residual norm: the norms stored with the vector, else measured once on neutral
                prompts) or ``"raw"`` (alpha times the stored vector); see :class:`Units`.
                Bounds and targets are in the same units: a fraction of the layer's residual
                norm, or the raw projection on the unit direction; or percentiles of the
                vector's reference projections, ``"25%"`` (:mod:`steerlab.steering.reference`).
            preserve_norm: rescale each steered residual to its norm before steering, so only
                its direction turns (a remedy against steering that breaks the model; ``add``).
            op: ``add``, ``ablate``, ``cap`` or ``set`` (see :class:`Operator`).
            bounds: ``cap``: ``(lo, hi)``, either None for an open side; a number, or a
                percentile of the vector's reference projections (``"25%"``).
            target: ``set``: the projection to move to (a number or ``"50%"``).

        Examples:
            >>> ablate = sl.Steering.create(model, vec, op="ablate", layers=[10])
            >>> cap = sl.Steering.create(model, vec, op="cap", bounds=(None, 0.1), layers=[10])
            >>> cap.hi[0] > 0  # 0.1 of layer 10's residual norm, raw
            True
        """
        if not isinstance(vector, SteeringVector):
            raise SteerlabError(f"got {type(vector).__name__}; expected a SteeringVector",
                                field="vector")
        d_model = model.cfg.d_model
        if vector.d_model != d_model:
            raise SteerlabError(f"the vector has d_model {vector.d_model}; the model "
                                f"{d_model}", field="vector")
        chosen = check_layers(model, list(vector.layers if layers is None else layers))
        if not chosen:
            raise SteerlabError("no layers to steer; give e.g. 10 or 10,12", field="layers")
        missing = [x for x in chosen if x not in vector.layers]
        if missing:
            raise SteerlabError(f"the vector has no layer {missing[0]}; it has "
                                f"{list(vector.layers)}", field="layers")
        units = Units.parse(units, field="units")
        op = Operator.parse(op, field="op")
        positions = Positions.parse(positions, field="positions")
        if op is Operator.ADD:
            if bounds is not None or target is not None:
                raise SteerlabError("add takes a strength, not bounds or a target; use op "
                                    "'cap' or 'set'", field="op")
            return cls(vector, _strengths(alpha), tuple(chosen), positions, units,
                       _scales(model, vector, chosen, units), bool(preserve_norm))
        if preserve_norm:
            raise SteerlabError(f"preserve_norm goes with add, not {op.value}",
                                field="preserve_norm")
        lo, hi = projection_bounds(op, bounds, target)
        size = vector_norms(model, vector, chosen) if units is Units.NORM else \
            {x: 1.0 for x in chosen}
        return cls(vector, _strengths(alpha), tuple(chosen), positions, units, (), False, op,
                   tuple(resolve_bound(lo, vector, x, size[x]) for x in chosen),
                   tuple(resolve_bound(hi, vector, x, size[x]) for x in chosen))

    def with_alpha(self, alpha: Any) -> Steering:
        """The same steering at another strength (checked)."""
        return replace(self, alpha=_strengths(alpha))

    @property
    def active(self) -> bool:
        """False when every strength is 0 (applying it leaves the model untouched)."""
        values = self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)
        return any(a != 0.0 for a in values)

    def row_bounds(self, n_rows: int) -> dict[int, tuple[torch.Tensor, ...]]:
        """``ablate``, ``cap``, ``set``: per layer, for each of ``n_rows`` rows, the unit
        direction ``[rows, d_model]``, the bounds and the share of the move ``[rows]`` each
        (float32, on the vector's device)."""
        weight = self._row_alphas(n_rows)
        out = {}
        for layer, lo, hi in zip(self.layers, self.lo, self.hi, strict=True):
            v = self.vector.direction(layer).float()
            unit = (v / v.norm())[None, :].expand(n_rows, -1)
            out[layer] = (unit, torch.full((n_rows,), lo, device=v.device),
                          torch.full((n_rows,), hi, device=v.device), weight.to(v.device))
        return out

    def _row_alphas(self, n_rows: int) -> torch.Tensor:
        if isinstance(self.alpha, tuple):
            if len(self.alpha) != n_rows:
                raise SteerlabError(f"alpha has {len(self.alpha)} rows, the batch {n_rows}",
                                    field="alpha")
            return torch.tensor(self.alpha, dtype=torch.float32)
        return torch.full((n_rows,), self.alpha, dtype=torch.float32)

    def row_deltas(self, n_rows: int) -> dict[int, Float[torch.Tensor, "batch d_model"]]:
        """What each layer adds to each of ``n_rows`` rows: ``alpha_row * scale_L * v_L``
        (float32, on the vector's device)."""
        alphas = self._row_alphas(n_rows)
        scales = self.scale or (1.0,) * len(self.layers)
        out = {}
        for layer, k in zip(self.layers, scales, strict=True):
            v = self.vector.direction(layer).float()
            out[layer] = alphas.to(v.device)[:, None] * (v * k)[None, :]
        return out

    @contextmanager
    def apply(self, model: Any) -> Iterator[Steering]:
        """Add the vector while inside (hooks removed on exit, also on errors).

        Forward passes of the bridge or its HF model are steered by hooks; generation
        (:func:`steerlab.generation.generate`) finds the steering in force and adds it itself."""
        if not self.active:
            yield self  # nothing to add: leave the model untouched
            return
        registered = in_force(model)
        registered.append(self)
        try:
            if self.positions is not Positions.ALL:  # outside generation these steer nothing
                yield self
                return
            hooks: dict[int, Callable[[torch.Tensor], torch.Tensor | None]] = {}
            deltas: dict[int, torch.Tensor] = {}

            def hook_for(layer: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
                def add(h: torch.Tensor) -> torch.Tensor | None:
                    if is_generating(model):
                        return None
                    if self.op is not Operator.ADD:
                        n = h.shape[0] if isinstance(self.alpha, tuple) else 1
                        unit, lo, hi, w = (t.expand(h.shape[0], *t.shape[1:])
                                           for t in self.row_bounds(n)[layer])
                        return clamp_projection(h, unit, lo, hi, w, None)
                    if layer not in deltas:
                        deltas.update(self.row_deltas(h.shape[0]) if isinstance(
                            self.alpha, tuple) else self.row_deltas(1))
                    delta = deltas[layer]
                    if delta.shape[0] != h.shape[0]:
                        delta = delta.expand(h.shape[0], -1)
                    return add_steering(h, delta, None, self.preserve_norm)

                return add

            for layer in self.layers:
                hooks[layer] = hook_for(layer)
            with layer_hooks(model, hooks, graph_safe=True):
                yield self
        finally:
            # by identity: two steerings of equal value are both in force (== compares their
            # vectors' tensors, which has no single truth value)
            del registered[max(i for i, s in enumerate(registered) if s is self)]


def _scales(model: Any, vector: SteeringVector, layers: Sequence[int],
            units: Units) -> tuple[float, ...]:
    if units is Units.RAW:
        return tuple(1.0 for _ in layers)
    known = vector_norms(model, vector, layers)
    out = []
    for x in layers:
        size = float(vector.direction(x).float().norm())
        if not size > 0:
            raise SteerlabError(f"the vector is zero at layer {x}; norm units need a "
                                "direction", field="vector")
        out.append(float(known[x]) / size)
    return tuple(out)


@contextmanager
def steer(
    model: Any,
    vector: SteeringVector,
    alpha: float | Float[torch.Tensor, " batch"],
    *,
    layers: Sequence[int] | None = None,
    positions: str | Positions = "all",
    units: str | Units = DEFAULT_UNITS,
    preserve_norm: bool = False,
) -> Iterator[None]:
    """Add ``alpha * vector.direction(L)`` to ``resid_post`` of each layer ``L`` while inside.

    Shorthand for ``Steering.create(model, vector, alpha, ...).apply(model)``.

    Args:
        model: a bridge (hooks sit on its decoder layers, shared with its HF model).
        vector: the steering vector; its stored scale is the unit of ``alpha``.
        alpha: strength, or one strength per batch row (a ``[batch]`` tensor or sequence).
        layers: which of the vector's layers to steer (default all of them).
        positions: ``"all"``, ``"generated"`` or ``"output"`` (see :class:`Positions`).
        units: ``"norm"`` (the default: fractions of the layer's residual norm) or ``"raw"``
            (multiples of the stored vector); see :class:`Units`.
        preserve_norm: keep each steered residual's norm (see :meth:`Steering.create`).

    Examples:
        >>> prompts = [sl.encode_chat(model.tokenizer, q) for q in ("Hi!", "Describe the sea.")]
        >>> plain = sl.generate(model, prompts, max_new_tokens=8)
        >>> with sl.steer(model, vec, 0.2, layers=[12], units="norm"):  # 0.2 x the norm
        ...     replies = sl.generate(model, prompts, max_new_tokens=8)
        >>> with sl.steer(model, vec, 4.0, layers=[10]):  # 4 x the stored vector
        ...     replies = sl.generate(model, prompts, max_new_tokens=8)
        >>> sl.generate(model, prompts, max_new_tokens=8) == plain  # no hook left behind
        True
    """
    with Steering.create(model, vector, alpha, layers=layers, positions=positions, units=units,
                         preserve_norm=preserve_norm).apply(model):
        yield
