"""Steering vectors: per-layer directions with provenance, arithmetic, files, GGUF export."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from steerlab.base.checks import finite_values, integer, text
from steerlab.base.errors import SteerlabError
from steerlab.base.files import atomic_path, read_text, write_json_atomic
from steerlab.base.metadata import json_object, layer_list, layer_values, strict_json
from steerlab.model.hooks import HookPoint
from steerlab.model.loading import model_type

log = logging.getLogger(__name__)

FORMAT = "steerlab.vector/1"


@dataclass(frozen=True)
class Provenance:
    """Where a vector came from. Every field is checked (and normalised) on construction, the
    sidecar's as well: a wrong type is one :class:`SteerlabError` line naming the field."""

    model_id: str = "unknown"
    hook: str = "resid_post"
    method: str = "mean-diff"
    n_pairs: int = 0
    normalisation: str = "none"
    source: str = ""
    # where the activations were captured: devices, dtype, attention kernel, versions
    capture: dict[str, Any] = field(default_factory=dict)
    # {layer (as a string): the layer's typical residual norm}, the unit of norm-unit strengths
    # (see steerlab.steering.norms); empty when unknown (it is then measured when steering)
    resid_norms: dict[str, float] = field(default_factory=dict)
    # the model's decoder-layer count (0: unknown, vectors written before it was recorded)
    n_layers: int = 0
    # percentiles of reference projections (steerlab.steering.reference); {}: none
    reference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in provenance_fields(vars(self)).items():
            object.__setattr__(self, name, value)


# how each provenance field is checked: (value, field, source) -> the value accepted
_CHECKS: dict[str, Callable[[Any, str, str | None], Any]] = {
    "model_id": lambda v, n, s: text(v, n, source=s),
    "hook": lambda v, n, s: HookPoint.parse(v, field=n, source=s).value,
    "method": lambda v, n, s: text(v, n, source=s),
    "n_pairs": lambda v, n, s: integer(v, n, lo=0, source=s),
    "normalisation": lambda v, n, s: text(v, n, source=s),
    "source": lambda v, n, s: text(v, n, source=s),
    "capture": lambda v, n, s: json_object(v, n, source=s),
    "resid_norms": lambda v, n, s: layer_values(v, n, source=s),
    "n_layers": lambda v, n, s: integer(v, n, lo=0, source=s),
    "reference": lambda v, n, s: json_object(v, n, source=s),
}


def provenance_fields(values: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """The :class:`Provenance` fields among ``values`` (a sidecar), checked and normalised:
    strings are text, ``n_pairs`` and ``n_layers`` integers >= 0, ``hook`` a
    :class:`~steerlab.model.hooks.HookPoint`, ``capture`` and ``reference`` strict-JSON objects,
    ``resid_norms`` ``{layer: finite norm > 0}`` (keyed by the vector's layers: checked by
    :class:`SteeringVector`). Other keys are left out (fields of later versions).

    Examples:
        >>> provenance_fields({"n_pairs": 3.0, "extra": 1})
        {'n_pairs': 3}
    """
    return {name: check(values[name], name, source) for name, check in _CHECKS.items()
            if name in values}


@dataclass(frozen=True)
class SteeringVector:
    """Directions ``[layer, d_model]`` for ``layers`` (row i belongs to ``layers[i]``).

    Supports ``a + b``, ``a - b`` (same layers), ``2.0 * a``, ``-a`` and :meth:`normalise`.

    Examples:
        >>> import torch
        >>> v = sl.SteeringVector.load("vectors/pirate.safetensors")  # layers 10 and 12
        >>> other = sl.SteeringVector(torch.randn(2, 576), v.layers)
        >>> w = (v - other).normalise()
        >>> w.direction(10).shape, round(float(w.direction(10).norm()), 4)
        (torch.Size([576]), 1.0)
    """

    directions: Float[torch.Tensor, "layer d_model"]
    layers: tuple[int, ...]
    provenance: Provenance = Provenance()

    def __post_init__(self) -> None:
        if not isinstance(self.provenance, Provenance):
            raise SteerlabError(f"got {type(self.provenance).__name__}; expected a Provenance",
                                field="provenance")
        layers = layer_list(self.layers, n_layers=self.provenance.n_layers)
        d = self.directions
        if not isinstance(d, torch.Tensor) or d.ndim != 2 or d.shape[0] != len(layers) or \
                not d.is_floating_point():
            raise SteerlabError(f"directions must be floats [len(layers)={len(layers)}, d_model]"
                                f"; got {getattr(d, 'dtype', type(d))} "
                                f"{tuple(getattr(d, 'shape', ()))}", field="directions")
        finite_values(d, "the vector", field="directions")
        layer_values(self.provenance.resid_norms, "resid_norms", layers=layers)
        object.__setattr__(self, "layers", layers)

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[1])

    def direction(self, layer: int) -> Float[torch.Tensor, " d_model"]:
        """The direction at a model layer."""
        if layer not in self.layers:
            raise SteerlabError(f"the vector has no layer {layer}; it has {list(self.layers)}",
                                field="layers")
        return self.directions[self.layers.index(layer)]

    def norms(self) -> Float[torch.Tensor, " layer"]:
        """L2 norm per layer."""
        return self.directions.norm(dim=-1)

    def resid_norm(self, layer: int) -> float | None:
        """The layer's typical residual norm stored with the vector (``None`` if unknown)."""
        value = self.provenance.resid_norms.get(str(layer))
        return None if value is None else float(value)

    def with_resid_norms(self, norms: dict[int, float]) -> SteeringVector:
        """This vector with the residual norms of its layers recorded (see
        :func:`steerlab.steering.norms.residual_norms`)."""
        stored = {str(k): float(v) for k, v in norms.items() if k in self.layers}
        return replace(self, provenance=replace(self.provenance, resid_norms={
            **self.provenance.resid_norms, **stored}))

    def without(self, other: SteeringVector) -> SteeringVector:
        """This vector with its component along ``other`` removed, layer by layer (e.g. the
        mean direction shared by several traits' vectors).

        Examples:
            >>> import torch
            >>> emoji = sl.SteeringVector(torch.randn(2, 576), vec.layers)
            >>> shared = vec.normalise() + emoji.normalise()
            >>> specific = vec.without(shared)
            >>> abs(float(specific.direction(10) @ shared.direction(10))) < 1e-3
            True
        """
        if other.layers != self.layers or other.d_model != self.d_model:
            raise SteerlabError(f"cannot project out a vector with layers {list(other.layers)} "
                                f"from one with {list(self.layers)}", field="layers")
        unit = other.directions.float() / other.norms().float().clamp_min(1e-12)[:, None]
        d = self.directions.float()
        out = d - (d * unit).sum(-1, keepdim=True) * unit
        p = self.provenance
        method = f"({p.method}) without ({other.provenance.method})"
        return replace(self, directions=out.to(self.directions.dtype),
                       provenance=replace(p, method=method, normalisation="none",
                                          reference={}))

    def select(self, layers: list[int] | tuple[int, ...]) -> SteeringVector:
        """Only the given layers (with only their residual norms)."""
        norms = {k: v for k, v in self.provenance.resid_norms.items() if int(k) in layers}
        return replace(self, directions=torch.stack([self.direction(x) for x in layers]),
                       layers=tuple(layers),
                       provenance=replace(self.provenance, resid_norms=norms))

    def zero_layer(self) -> int | None:
        """The first layer whose direction is zero (it has no direction to steer along or to
        normalise), or ``None``."""
        if self.directions.device.type == "meta":
            return None
        zero = (self.directions.double().norm(dim=-1) == 0).nonzero()
        return self.layers[int(zero[0])] if len(zero) else None

    def check_model(self, n_layers: int, d_model: int, *, source: str | None = None) -> None:
        """Refuse a model this vector does not fit (its layer count, its width), e.g. with
        :func:`steerlab.model.loading.model_geometry` before the model loads.

        Examples:
            >>> vec.check_model(30, 576)  # fits: nothing to say
            >>> vec.check_model(30, 2048)
            Traceback (most recent call last):
            ...
            steerlab.base.errors.SteerlabError: ...the vector has d_model 576; the model 2048
        """
        layer_list(self.layers, n_layers=n_layers, source=source)
        if self.d_model != d_model:
            raise SteerlabError(f"the vector has d_model {self.d_model}; the model {d_model}",
                                source=source, field="d_model")

    def normalise(self) -> SteeringVector:
        """Unit norm at every layer (computed in float64); a zero direction is refused."""
        zero = self.zero_layer()
        if zero is not None:
            raise SteerlabError(f"the direction at layer {zero} is zero and has no unit "
                                "direction", field="directions")
        d = self.directions.double()
        unit = (d / d.norm(dim=-1, keepdim=True)).to(self.directions.dtype)
        return replace(self, directions=unit,
                       provenance=replace(self.provenance, normalisation="unit"))

    def _combine(self, other: SteeringVector, sign: float, op: str) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.layers != self.layers or other.d_model != self.d_model:
            raise SteerlabError(f"cannot {op} vectors with layers {list(self.layers)} and "
                                f"{list(other.layers)} (d_model {self.d_model}/{other.d_model})")
        p = self.provenance
        method = f"({p.method}) {op} ({other.provenance.method})"
        return replace(self, directions=self.directions + sign * other.directions.to(
            self.directions), provenance=replace(p, method=method, normalisation="none",
                                                 reference={}))

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0, "-")

    def __mul__(self, k: float | int) -> SteeringVector:
        if not isinstance(k, (int, float)):
            return NotImplemented
        # a negative k turns the direction: its reference projections no longer hold
        kept = self.provenance if k > 0 else replace(self.provenance, reference={})
        return replace(self, directions=self.directions * float(k), provenance=kept)

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.safetensors`` and the JSON sidecar ``<path>.json``; returns the former.

        Only what :meth:`load` accepts is written: a zero direction, or a sidecar that is not
        strict JSON (NaN, infinities), is refused before either file is touched.

        Examples:
            >>> path = vec.save("saved/pirate")  # saved/pirate.safetensors + saved/pirate.json
            >>> path, sl.SteeringVector.load(path).layers
            (PosixPath('saved/pirate.safetensors'), (10, 12))
        """
        from safetensors.torch import save_file  # deferred: safetensors

        st, side = vector_paths(path)
        zero = self.zero_layer()
        if zero is not None:
            raise SteerlabError(f"the direction at layer {zero} is zero; a saved vector has a "
                                "non-zero direction at every layer", source=str(st),
                                field="directions")
        tensors = {"directions": self.directions.detach().float().cpu().contiguous(),
                   "layers": torch.tensor(self.layers, dtype=torch.int64)}
        meta = {"format": FORMAT, "layers": list(self.layers), "d_model": self.d_model,
                **asdict(self.provenance)}
        json_object(meta, "capture", source=str(side))  # a mutable dict: checked again now
        with atomic_path(st) as tmp:
            save_file(tensors, str(tmp))
        write_json_atomic(side, meta, allow_nan=False)
        return st

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a vector written by :meth:`save` (give either file or the common stem).

        Checked like command-line flags, each refusal one :class:`SteerlabError` line naming
        the file and field: the sidecar is strict JSON with ``format``, ``layers`` (distinct
        indices >= 0, below ``n_layers`` when recorded), ``d_model`` (the directions' width)
        and provenance fields of the right types (:func:`provenance_fields`; ``resid_norms``
        keyed by the vector's layers); the tensors are finite floats ``[layer, d_model]``,
        non-zero at every layer, and ``layers`` there is the sidecar's list.
        """
        st, side = vector_paths(path)
        for p in (st, side):
            if not p.is_file():
                raise SteerlabError("no such file (a steering vector is a .safetensors file "
                                    "and its .json sidecar)", source=str(p))
        what = "a steering vector's JSON sidecar"
        meta = strict_json(read_text(side, what), source=str(side), what=what)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SteerlabError(f"expected format {FORMAT!r}", source=str(side), field="format")
        for key in ("layers", "d_model"):
            if key not in meta:
                raise SteerlabError(f"missing; expected {what} as written by "
                                    "SteeringVector.save", source=str(side), field=key)
        prov = Provenance(**provenance_fields(meta, str(side)))
        layers = layer_list(meta["layers"], n_layers=prov.n_layers, source=str(side))
        layer_values(prov.resid_norms, "resid_norms", layers=layers, source=str(side))
        d_model = integer(meta["d_model"], "d_model", lo=1, source=str(side))
        directions = _tensors(st, layers)
        if directions.shape[1] != d_model:
            raise SteerlabError(f"got {d_model}; the directions in {st.name} are "
                                f"{directions.shape[1]} wide", source=str(side), field="d_model")
        vec = cls(directions, layers, prov)
        zero = vec.zero_layer()
        if zero is not None:
            raise SteerlabError(f"the direction at layer {zero} is zero; expected a non-zero "
                                "direction at every layer", source=str(st), field="directions")
        return vec

    def to_gguf(self, path: str | os.PathLike, model_hint: str | None = None) -> Path:
        """Export as a llama.cpp control vector (``--control-vector``): arch
        ``controlvector``, one f32 tensor ``direction.{L}`` per layer ``L``.

        llama.cpp adds ``direction.N`` to the output of its 0-based layer ``N``: the residual
        steerlab steers at layer ``N`` (``resid_post``), so the numbers are the same. It has no
        slot for layer 0 (index 0 is invalid there), so layer 0 is left out with a warning.
        ``model_hint`` defaults to the model's architecture (``llama``, ``qwen3``: its
        ``model_type``, what llama.cpp's own generator writes), else its id.

        Examples:
            >>> vec.to_gguf("pirate.gguf")  # llama-cli -m model.gguf --control-vector pirate.gguf
            PosixPath('pirate.gguf')
        """
        import gguf  # deferred: gguf

        path = Path(path)
        layers = [x for x in self.layers if x > 0]
        if len(layers) < len(self.layers):
            log.warning("llama.cpp cannot steer layer 0 (no control-vector slot for it); "
                        "%s leaves it out", path)
        if not layers:
            raise SteerlabError("the vector has only layer 0, which llama.cpp cannot steer",
                                source=str(path), field="layers")
        if model_hint is None:
            model_hint = model_type(self.provenance.model_id) or self.provenance.model_id
        with atomic_path(path) as tmp:
            writer = gguf.GGUFWriter(str(tmp), "controlvector")
            writer.add_string("controlvector.model_hint", model_hint)
            writer.add_uint32("controlvector.layer_count", len(layers))
            for layer in layers:
                writer.add_tensor(f"direction.{layer}",
                                  self.direction(layer).detach().float().cpu().numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return path


def _tensors(st: Path, layers: tuple[int, ...]) -> torch.Tensor:
    """The ``directions`` of a vector's safetensors file: finite floats ``[layer, d_model]``,
    one row per layer of the sidecar, whose list its ``layers`` tensor (when there) matches."""
    from safetensors import SafetensorError  # deferred: safetensors
    from safetensors.torch import load_file  # deferred: safetensors

    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError) as err:
        raise SteerlabError(f"not a readable safetensors file ({err})", source=str(st)) from None
    if "directions" not in tensors:
        raise SteerlabError("tensor missing", source=str(st), field="directions")
    stored = tensors.get("layers")
    if stored is not None and stored.tolist() != list(layers):
        raise SteerlabError(f"holds {stored.tolist()!s:.60}; the sidecar lists {list(layers)}",
                            source=str(st), field="layers")
    d = tensors["directions"]
    if d.ndim != 2 or not d.is_floating_point() or d.shape[0] != len(layers):
        raise SteerlabError(f"is {str(d.dtype).removeprefix('torch.')} {list(d.shape)}; expected "
                            f"floats [{len(layers)} layers, d_model]", source=str(st),
                            field="directions")
    finite_values(d, "the vector", source=str(st), field="directions")
    return d


def read_gguf(path: str | os.PathLike) -> dict[int, Any]:
    """``{layer: direction}`` of a GGUF control vector, via ``GGUFReader``: tensor
    ``direction.N`` is steerlab layer ``N`` (the inverse of :meth:`SteeringVector.to_gguf`)."""
    import gguf  # deferred: gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as err:
        raise SteerlabError(f"not a readable GGUF file ({err})", source=str(path)) from None
    return {int(t.name.split(".")[1]): torch.from_numpy(t.data.copy())
            for t in reader.tensors if t.name.startswith("direction.")}


def vector_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """The two files of a vector: ``(stem.safetensors, stem.json)`` for a stem or either."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def random_like(vector: SteeringVector, seed: int = 0) -> SteeringVector:
    """A random vector with the same per-layer norms (the control in evaluations)."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(vector.directions.shape, generator=gen, dtype=torch.float32)
    r = r / r.norm(dim=-1, keepdim=True) * vector.norms().float()[:, None].cpu()
    return replace(vector, directions=r.to(vector.directions),
                   provenance=replace(vector.provenance, method=f"random(seed={seed})",
                                      reference={}))
