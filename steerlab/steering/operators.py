"""The operators of an intervention beyond addition (:class:`Operator`) and their one
arithmetic (:func:`clamp_projection`): ``ablate``, ``cap`` and ``set`` each move the projection
of the residual on a unit direction into bounds (:func:`projection_bounds`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Bool, Float

from steerlab.base.choice import Choice
from steerlab.base.errors import SteerlabError
from steerlab.steering.reference import Percentile, parse_percentile


def strength(value: Any) -> float:
    """A finite number (a strength, bound or target), or one error line."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SteerlabError(f"got {value!r}; expected a finite number", field="alpha")
    return float(value)


def clamp_projection(h: Float[torch.Tensor, "batch pos d_model"],
                     unit: Float[torch.Tensor, "batch d_model"],
                     lo: Float[torch.Tensor, " batch"], hi: Float[torch.Tensor, " batch"],
                     weight: Float[torch.Tensor, " batch"],
                     rows: Bool[torch.Tensor, " batch"] | None
                     ) -> Float[torch.Tensor, "batch pos d_model"]:
    """Move each residual's projection on the unit direction ``unit`` into ``[lo, hi]``
    (``-inf``/``inf``: an open bound), by the share ``weight`` of the way (1: all of it; 0:
    the row is left as it is), at the rows ``rows`` marks (all when None), every position: the
    one arithmetic of ``ablate`` (``lo = hi = 0``), ``cap`` and ``set`` (``lo = hi = target``).
    The projection is taken in float32."""
    u = unit.to(device=h.device, dtype=torch.float32)[:, None, :]
    p = (h.float() * u).sum(-1, keepdim=True)
    moved = torch.clamp(p, lo.to(p.device)[:, None, None], hi.to(p.device)[:, None, None]) - p
    moved = moved * weight.to(device=p.device, dtype=p.dtype)[:, None, None]
    if rows is not None:
        moved = moved * rows.to(device=p.device, dtype=p.dtype)[:, None, None]
    return h + (moved * u).to(h.dtype)


class Operator(Choice):
    """What an intervention does at its layers.

    ``add``: add ``alpha * v`` (steering, the default); ``ablate``: remove the component along
    the unit direction ``v̂`` (``h - (h·v̂) v̂``, Arditi et al. 2024); ``cap``: clamp the
    projection ``h·v̂`` into ``[lo, hi]``, either bound open (activation capping, Lu et al.
    2026); ``set``: move the projection to a target (how SAE features and probes are steered).
    Within a layer the projection operators act first, in the order given, then the additions.
    """

    ADD = "add"
    ABLATE = "ablate"
    CAP = "cap"
    SET = "set"


def projection_bounds(op: Operator, bounds: Any, target: Any
                      ) -> tuple[float | Percentile, float | Percentile]:
    """``(lo, hi)`` of a projection operator, open sides infinite, each a number in the given
    units or a :class:`~steerlab.steering.reference.Percentile` (``"25%"``)."""
    if op is Operator.ABLATE:
        if bounds is not None or target is not None:
            raise SteerlabError("ablate takes no bounds or target (it moves the projection "
                                "to 0)", field="op")
        return 0.0, 0.0
    if op is Operator.SET:
        if bounds is not None or target is None:
            raise SteerlabError("set takes a target (the projection to move to), not bounds",
                                field="target")
        value = parse_percentile(target, "target") or strength(target)
        return value, value
    if target is not None or not isinstance(bounds, (tuple, list)) or len(bounds) != 2 \
            or all(b is None for b in bounds):
        raise SteerlabError(f"cap takes bounds (lo, hi), either None for an open side; got "
                            f"{bounds!r:.80}", field="bounds")
    lo, hi = (None if b is None else parse_percentile(b) or strength(b) for b in bounds)
    if isinstance(lo, Percentile) and isinstance(hi, Percentile) and lo.q > hi.q:
        raise SteerlabError(f"the bounds are [{lo}, {hi}]; expected lo <= hi", field="bounds")
    return (-math.inf if lo is None else lo), (math.inf if hi is None else hi)


def bounds_from_text(text: str, field: str = "bounds") -> tuple[Any, Any]:
    """``"LO:HI"`` as cap bounds (the chat's and the widget's grammar): each side a number, a
    percentile of the vector's reference projections (``25%``) or empty (open); a lone
    ``"LO"`` is a floor. At least one side must be given.

    Examples:
        >>> bounds_from_text("25%:"), bounds_from_text(":0.1"), bounds_from_text("-1:1")
        (('25%', None), (None, 0.1), (-1.0, 1.0))
    """
    lo, _, hi = str(text).partition(":")

    def side(part: str) -> Any:
        part = part.strip()
        if not part:
            return None
        if part.endswith("%"):
            return parse_percentile(part, field) and part
        try:
            return strength(float(part))
        except (ValueError, SteerlabError):
            raise SteerlabError(f"got {part!r:.40}; expected LO:HI, each a number, a "
                                "percentile such as 25% or empty for an open side",
                                field=field) from None

    out = side(lo), side(hi)
    if out == (None, None):
        raise SteerlabError(f"got {text!r:.40}; expected LO:HI with at least one side, e.g. "
                            "25%: or :0.1", field=field)
    return out
