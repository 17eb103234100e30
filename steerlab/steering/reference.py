"""Reference distributions of projections stored with a vector, and bounds given as their
percentiles.

A vector may carry, per layer, the percentiles 0, 1, ..., 100 of the projections (raw units,
on the unit direction) of a reference set of activations: the rejected answers of its trait
dataset (:func:`steerlab.extraction.fitters.fit_vector` records them), or the default
assistant's answers for a persona axis. A ``cap`` or ``set`` bound written ``"25%"`` is then
that layer's 25th percentile (Lu et al. 2026 cap the assistant axis at the 25th percentile of
the assistant's own projections).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from steerlab.base.checks import text
from steerlab.base.errors import SteerlabError
from steerlab.steering.vector import SteeringVector

# the stored percentiles: 0, 1, ..., 100 (values between them are interpolated linearly)
QUANTILES = tuple(range(101))
_PERCENT = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*%\s*")


@dataclass(frozen=True)
class Percentile:
    """A bound given as a percentile ``q`` (0 to 100) of the vector's reference projections."""

    q: float

    def __str__(self) -> str:
        return f"{self.q:g}%"


def parse_percentile(value: Any, field: str = "bounds") -> Percentile | None:
    """``"25%"`` as :class:`Percentile` (0 to 100); ``None`` for a value that is not a string;
    one error line for a string that is not a percentage."""
    if isinstance(value, Percentile):
        return value
    if not isinstance(value, str):
        return None
    match = _PERCENT.fullmatch(value)
    q = float(match.group(1)) if match else math.nan
    if not 0.0 <= q <= 100.0:
        raise SteerlabError(f"got {value!r:.40}; expected a number or a percentile of the "
                            "vector's reference projections such as '25%' (0% to 100%)",
                            field=field)
    return Percentile(q)


def with_reference(vector: SteeringVector, projections: Mapping[int, Any],
                   label: str) -> SteeringVector:
    """``vector`` carrying, per layer, the percentiles of ``projections`` (raw projections on
    the layer's unit direction, any number of finite values) as its reference, described by
    ``label`` (say what the values are, e.g. "rejected answers, response means").

    Examples:
        >>> import numpy as np
        >>> ref = {10: np.arange(101.0), 12: np.arange(101.0) * 2}
        >>> v = with_reference(vec, ref, "a test")
        >>> reference_value(v, 12, 25.0), reference_value(v, 10, 2.5)
        (50.0, 2.5)
    """
    label = text(label, "label")
    table = {}
    for layer, values in projections.items():
        vector.direction(layer)  # one of its layers
        x = np.asarray(values, dtype=np.float64).ravel()
        if not len(x) or not np.isfinite(x).all():
            raise SteerlabError(f"the reference projections at layer {layer} are empty or not "
                                "finite; expected finite numbers", field="reference")
        table[str(layer)] = [float(v) for v in np.percentile(x, QUANTILES)]
    if not table:
        raise SteerlabError("no layers; expected projections for at least one layer",
                            field="reference")
    n = {str(layer): int(np.size(values)) for layer, values in projections.items()}
    reference = {"label": label, "n": n, "percentiles": table}
    return replace(vector, provenance=replace(vector.provenance, reference=reference))


def reference_value(vector: SteeringVector, layer: int, q: float | int) -> float:
    """The ``q``-th percentile (0 to 100, interpolated) of the vector's reference projections
    at ``layer``, raw units; one error line when the vector has none there."""
    stored = vector.provenance.reference.get("percentiles", {})
    if not isinstance(stored, dict) or str(layer) not in stored:
        have = sorted(int(k) for k in stored) if isinstance(stored, dict) else []
        where = f"it has them at layers {have}" if have else "it has none"
        raise SteerlabError(
            f"the vector has no reference projections at layer {layer} ({where}); percentile "
            "bounds need them (fit_vector records those of the rejected answers) or give the "
            "bounds as numbers", field="bounds")
    table = stored[str(layer)]
    if not isinstance(table, list) or len(table) != len(QUANTILES) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in table) or any(
            b < a for a, b in zip(table, table[1:], strict=False)):
        raise SteerlabError(f"expected {len(QUANTILES)} finite non-decreasing numbers "
                            "(percentiles 0 to 100)", field=f"reference.percentiles.{layer}")
    return float(np.interp(q, QUANTILES, table))


def resolve_bound(bound: float | Percentile, vector: SteeringVector, layer: int,
                  size: float) -> float:
    """A bound in raw units at ``layer``: a percentile of the reference, a number times the
    unit ``size`` (1 for raw units, the layer's residual norm for norm units), or an open
    (infinite) side as it is."""
    if isinstance(bound, Percentile):
        return reference_value(vector, layer, bound.q)
    return bound * size if math.isfinite(bound) else bound
