"""Fitters: streaming ``update(chosen, rejected)`` then ``fit()`` -> per-layer directions.

Each fitter sees batches ``[batch, layer, d_model]`` of chosen (trait) and rejected activations
and returns a :class:`Fit` whose directions point from rejected towards chosen.

Examples:
    >>> fitter = MeanDifference()
    >>> for chosen, rejected in ActivationFile("acts.h5").iter_batches(256):
    ...     fitter.update(chosen, rejected)
    >>> fitter.fit().directions.shape
    torch.Size([30, 576])
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float

from steerlab.base.checks import finite_values
from steerlab.base.choice import Choice
from steerlab.base.errors import SteerlabError
from steerlab.extraction.store import ActivationFile, Site
from steerlab.model.loading import model_geometry
from steerlab.steering.reference import with_reference
from steerlab.steering.vector import Provenance, SteeringVector

Acts = Float[torch.Tensor, "batch layer d_model"]


@dataclass(frozen=True)
class Fit:
    """Directions ``[layer, d_model]``, pairs seen, and per-layer held-out accuracy (probes)."""

    directions: Float[torch.Tensor, "layer d_model"]
    n_pairs: int
    accuracy: Float[torch.Tensor, " layer"] | None = None


@runtime_checkable
class Fitter(Protocol):
    method: str

    def update(self, chosen: Acts, rejected: Acts) -> None: ...

    def fit(self) -> Fit: ...


def _check(chosen: Acts, rejected: Acts) -> None:
    if chosen.shape != rejected.shape or chosen.ndim != 3:
        raise SteerlabError(f"chosen {tuple(chosen.shape)} and rejected "
                            f"{tuple(rejected.shape)} must both be [batch, layer, d_model]")


class MeanDifference:
    """Difference of means (chosen - rejected), accumulated in float64: streaming == one-shot."""

    method = "mean-diff"

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._n = 0

    def update(self, chosen: Acts, rejected: Acts) -> None:
        _check(chosen, rejected)
        s = (chosen.double() - rejected.double()).sum(0)
        self._sum = s if self._sum is None else self._sum + s
        self._n += chosen.shape[0]

    def fit(self) -> Fit:
        if self._sum is None:
            raise SteerlabError("no pairs seen; the activation file is empty")
        return Fit((self._sum / self._n).float(), self._n)


class _Collect:
    def __init__(self) -> None:
        self._chosen: list[torch.Tensor] = []
        self._rejected: list[torch.Tensor] = []

    def update(self, chosen: Acts, rejected: Acts) -> None:
        _check(chosen, rejected)
        self._chosen.append(chosen.float())
        self._rejected.append(rejected.float())

    def _all(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._chosen:
            raise SteerlabError("no pairs seen; the activation file is empty")
        return torch.cat(self._chosen), torch.cat(self._rejected)


def _scaled(unit: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    """Orient unit directions [layer, d] towards chosen and scale them by the mean projection
    of the differences, so their size is comparable with the mean difference."""
    proj = torch.einsum("bld,ld->l", diffs, unit) / diffs.shape[0]
    return unit * proj[:, None]


class PCADifference(_Collect):
    """First principal direction of the paired differences (uncentred SVD), per layer."""

    method = "pca"

    def fit(self) -> Fit:
        chosen, rejected = self._all()
        diffs = chosen - rejected
        units = []
        for layer in range(diffs.shape[1]):
            _, _, vh = torch.linalg.svd(diffs[:, layer].double(), full_matrices=False)
            units.append(vh[0].float())
        return Fit(_scaled(torch.stack(units), diffs), diffs.shape[0])


class LogisticProbe(_Collect):
    """Logistic regression chosen-vs-rejected per layer; held-out accuracy on a pair split.

    Args:
        test_fraction: share of pairs held out (both of their rows) for the accuracy.
        seed: seed of the split.
        c: inverse regularisation strength.
    """

    method = "probe"

    def __init__(self, test_fraction: float = 0.25, seed: int = 0, c: float = 1.0) -> None:
        super().__init__()
        self.test_fraction, self.seed, self.c = test_fraction, seed, c

    def fit(self) -> Fit:
        from sklearn.linear_model import LogisticRegression  # deferred: sklearn
        from sklearn.preprocessing import StandardScaler  # deferred: sklearn

        chosen, rejected = self._all()
        n = chosen.shape[0]
        order = np.random.default_rng(self.seed).permutation(n)
        n_test = max(1, int(round(n * self.test_fraction))) if n > 1 else 0
        test, train = order[:n_test], order[n_test:]
        if len(train) < 2:
            raise SteerlabError(f"a probe needs at least 3 pairs; got {n}")
        units, acc = [], []
        for layer in range(chosen.shape[1]):
            def xy(idx: np.ndarray, layer: int = layer) -> tuple[np.ndarray, np.ndarray]:
                x = torch.cat([chosen[idx, layer], rejected[idx, layer]]).double().numpy()
                return x, np.r_[np.ones(len(idx)), np.zeros(len(idx))]

            x, y = xy(train)
            scaler = StandardScaler().fit(x)
            clf = LogisticRegression(C=self.c, max_iter=2000).fit(scaler.transform(x), y)
            w = torch.from_numpy(clf.coef_[0] / scaler.scale_).float()
            units.append(w / w.norm().clamp_min(1e-12))
            if len(test):
                xt, yt = xy(test)
                acc.append(float(clf.score(scaler.transform(xt), yt)))
            else:
                acc.append(float("nan"))
        return Fit(_scaled(torch.stack(units), chosen - rejected), n, torch.tensor(acc))


class Method(Choice):
    """The fitting methods by name (as on the command line and in provenance)."""

    MEAN_DIFF = "mean-diff"
    PCA = "pca"
    PROBE = "probe"

    def new(self) -> Fitter:
        """A new, empty fitter of this method."""
        kinds: dict[Method, Callable[[], Fitter]] = {
            Method.MEAN_DIFF: MeanDifference, Method.PCA: PCADifference,
            Method.PROBE: LogisticProbe}
        return kinds[self]()


def fitter(method: str | Method) -> Fitter:
    """A new fitter by method name (``mean-diff``, ``pca``, ``probe``)."""
    return Method.parse(method, field="method").new()


def _swaps(n: int, seed: int | None) -> torch.Tensor | None:
    """A ``[n]`` bool mask with exactly ``n // 2`` pairs to swap, or ``None`` (no shuffling)."""
    if seed is None:
        return None
    order = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[order[: n // 2]] = True
    return torch.from_numpy(mask)


def _check_model_layers(acts: Any) -> None:
    """Layers of a file that does not record its model's layer count (written before it was
    kept) checked against the model's config, when that is readable here without a load."""
    if acts.meta.n_layers:
        return  # checked when the file was read
    try:
        geometry = model_geometry(acts.meta.model_id)
    except SteerlabError:
        return  # the model's folder is gone: nothing to check against
    if geometry and max(acts.layers) >= geometry["n_layers"]:
        raise SteerlabError(f"layer {max(acts.layers)} does not exist: {acts.meta.model_id} has "
                            f"{geometry['n_layers']} layers (0 to {geometry['n_layers'] - 1})",
                            source=str(acts.path), field="layers")


def fit_vector(
    source: Any,
    method: Fitter | str | Method = Method.MEAN_DIFF,
    *,
    layers: list[int] | None = None,
    batch_size: int = 256,
    mean: bool = False,
    shuffle_seed: int | None = None,
) -> tuple[SteeringVector, Fit]:
    """Stream an activation file through a fitter into a :class:`SteeringVector`.

    Args:
        source: an :class:`steerlab.extraction.store.ActivationFile` or a path to one.
        method: a fitter instance or a :class:`Method` (or its name).
        layers: a subset of the file's layers (default all).
        batch_size: rows read at a time.
        mean: fit on the response means instead of the divergence point.
        shuffle_seed: fit a *shuffled-label* control instead: chosen and rejected swapped in
            exactly half of the pairs (a seeded draw), so the trait's share of the difference
            cancels and what is left is the direction's noise (an evaluation control).

    Examples:
        >>> vector, fit = sl.fit_vector("acts.h5", "probe")
        >>> vector.layers, fit.accuracy.shape  # a held-out accuracy per layer
        ((10, 12), torch.Size([2]))
    """
    acts = source if isinstance(source, ActivationFile) else ActivationFile(source)
    _check_model_layers(acts)
    f = fitter(method) if isinstance(method, str) else method  # a Method is a str
    idx = None
    if layers is not None:
        missing = sorted(set(layers) - set(acts.layers))
        if missing:
            raise SteerlabError(f"layers {missing} were not captured; the file has "
                                f"{list(acts.layers)}", source=str(acts.path), field="layers")
        idx = [acts.layers.index(x) for x in layers]
    site = Site.MEAN if mean else Site.DIVERGENCE
    swap = _swaps(acts.n_pairs, shuffle_seed)
    at = 0
    for chosen, rejected in acts.iter_batches(batch_size, site=site):
        if idx is not None:
            chosen, rejected = chosen[:, idx], rejected[:, idx]
        if swap is not None:
            s = swap[at : at + chosen.shape[0]][:, None, None]
            chosen, rejected = torch.where(s, rejected, chosen), torch.where(s, chosen, rejected)
        for name, block in (("chosen", chosen), ("rejected", rejected)):
            finite_values(block, f"the {name} activations of pairs {at}-{at + len(block) - 1}",
                          source=str(acts.path))
        at += chosen.shape[0]
        f.update(chosen, rejected)
    result = f.fit()
    chosen_layers = tuple(layers or acts.layers)
    _refuse_zero(result.directions, chosen_layers, str(acts.path))
    m = acts.meta
    capture = json.loads(m.provenance) if m.provenance else {}
    norms = capture.pop("resid_norms", {})
    chosen = [str(x) for x in chosen_layers]
    method_name = f.method + ("+mean" * mean) + (
        f"+shuffled(seed={shuffle_seed})" if swap is not None else "")
    prov = Provenance(model_id=m.model_id, hook=m.hook, method=method_name,
                      n_pairs=result.n_pairs, source=str(acts.path), capture=capture,
                      resid_norms={k: float(norms[k]) for k in chosen if k in norms},
                      n_layers=m.n_layers)
    vec = SteeringVector(result.directions, chosen_layers, prov)
    if swap is None:
        vec = _with_rejected_reference(vec, acts, site, idx, batch_size)
    return vec, result


def _with_rejected_reference(vec: SteeringVector, acts: ActivationFile, site: Site,
                             idx: list[int] | None, batch_size: int) -> SteeringVector:
    """``vec`` with the projections of the rejected answers (those without the trait, at the
    fitted site) on its unit directions as its reference: what ``cap`` bounds given as
    percentiles (``"75%"``) mean."""
    unit = vec.normalise().directions.float()
    seen: list[torch.Tensor] = []
    for _, rejected in acts.iter_batches(batch_size, site=site):
        block = rejected if idx is None else rejected[:, idx]
        seen.append((block.float() * unit[None]).sum(-1))
    p = torch.cat(seen).numpy()  # [pairs, layer]
    what = "response means" if site is Site.MEAN else "first divergent token"
    return with_reference(vec, {x: p[:, i] for i, x in enumerate(vec.layers)},
                          f"rejected answers ({what}) of {acts.path.name}")


def _refuse_zero(directions: torch.Tensor, layers: tuple[int, ...], source: str) -> None:
    """Refuse a fit with a zero direction: chosen and rejected activations that do not differ
    at a layer give no direction there (normalising it would not give a unit vector)."""
    zero = (directions.double().norm(dim=-1) == 0).nonzero()
    if len(zero):
        raise SteerlabError(f"the fitted direction at layer {layers[int(zero[0])]} is zero: the "
                            "chosen and rejected activations do not differ there; expected "
                            "pairs whose answers differ", source=source, field="layers")


def shuffled_control(vector: SteeringVector, source: Any, seed: int = 0) -> SteeringVector:
    """The shuffled-label control of a fitted vector: refitted from its activation file with
    the same method, site and layers, chosen and rejected swapped in half of the pairs.

    Examples:
        >>> control = shuffled_control(vec, "acts.h5")
        >>> control.layers == vec.layers
        True
    """
    method, *flags = vector.provenance.method.split("+")
    vec, _ = fit_vector(source, method, layers=list(vector.layers), mean="mean" in flags,
                        shuffle_seed=seed)
    return vec
