"""Steering vectors: per-layer directions with provenance, arithmetic, files, GGUF export."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from steerlab.checks import finite_values
from steerlab.errors import SteerlabError
from steerlab.files import atomic_path, read_text, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "steerlab.vector/1"


@dataclass(frozen=True)
class Provenance:
    """Where a vector came from."""

    model_id: str = "unknown"
    hook: str = "resid_post"
    method: str = "mean-diff"
    n_pairs: int = 0
    normalisation: str = "none"
    source: str = ""
    # where the activations were captured: devices, dtype, attention kernel, versions
    capture: dict[str, Any] = field(default_factory=dict)
    # {layer (as a string): the layer's typical residual norm}, the unit of norm-unit strengths
    # (see steerlab.norms); empty when unknown (it is then measured when steering)
    resid_norms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SteeringVector:
    """Directions ``[layer, d_model]`` for ``layers`` (row i belongs to ``layers[i]``).

    Supports ``a + b``, ``a - b`` (same layers), ``2.0 * a``, ``-a`` and :meth:`normalise`.

    Example:
        >>> v = SteeringVector.load("pirate.safetensors")
        >>> w = (v - other).normalise()
        >>> w.direction(10).shape
        torch.Size([576])
    """

    directions: Float[torch.Tensor, "layer d_model"]
    layers: tuple[int, ...]
    provenance: Provenance = Provenance()

    def __post_init__(self) -> None:
        d = self.directions
        if not isinstance(d, torch.Tensor) or d.ndim != 2 or d.shape[0] != len(self.layers):
            raise SteerlabError(f"directions must be [len(layers)={len(self.layers)}, d_model]; "
                                f"got {getattr(d, 'shape', type(d))}", field="directions")
        if len(set(self.layers)) != len(self.layers):
            raise SteerlabError(f"layers {self.layers} repeat", field="layers")
        finite_values(d, "the vector", field="directions")
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

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
        :func:`steerlab.norms.residual_norms`)."""
        stored = {str(k): float(v) for k, v in norms.items() if k in self.layers}
        return replace(self, provenance=replace(self.provenance, resid_norms={
            **self.provenance.resid_norms, **stored}))

    def without(self, other: SteeringVector) -> SteeringVector:
        """This vector with its component along ``other`` removed, layer by layer (e.g. the
        mean direction shared by several traits' vectors).

        Example:
            >>> shared = pirate.normalise() + emoji.normalise() + formal.normalise()
            >>> specific = pirate.without(shared)
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
                       provenance=replace(p, method=method, normalisation="none"))

    def select(self, layers: list[int] | tuple[int, ...]) -> SteeringVector:
        """Only the given layers."""
        return replace(self, directions=torch.stack([self.direction(x) for x in layers]),
                       layers=tuple(layers))

    def normalise(self) -> SteeringVector:
        """Unit norm at every layer."""
        unit = self.directions / self.norms().clamp_min(1e-12)[:, None]
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
            self.directions), provenance=replace(p, method=method, normalisation="none"))

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0, "-")

    def __mul__(self, k: float | int) -> SteeringVector:
        if not isinstance(k, (int, float)):
            return NotImplemented
        return replace(self, directions=self.directions * float(k))

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.safetensors`` and the JSON sidecar ``<path>.json``; returns the former.

        Example:
            >>> v.save("vectors/pirate")  # vectors/pirate.safetensors + vectors/pirate.json
        """
        from safetensors.torch import save_file

        st, side = vector_paths(path)
        tensors = {"directions": self.directions.detach().float().cpu().contiguous(),
                   "layers": torch.tensor(self.layers, dtype=torch.int64)}
        meta = {"format": FORMAT, "layers": list(self.layers), "d_model": self.d_model,
                **asdict(self.provenance)}
        with atomic_path(st) as tmp:
            save_file(tensors, str(tmp))
        write_json_atomic(side, meta)
        return st

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a vector written by :meth:`save` (give either file or the common stem)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        st, side = vector_paths(path)
        for p in (st, side):
            if not p.is_file():
                raise SteerlabError("no such file (a steering vector is a .safetensors file "
                                    "and its .json sidecar)", source=str(p))
        try:
            meta = json.loads(read_text(side, "a steering vector's JSON sidecar"))
        except json.JSONDecodeError as err:
            raise SteerlabError(f"not valid JSON ({err})", source=str(side)) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SteerlabError(f"expected format {FORMAT!r}", source=str(side), field="format")
        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError) as err:
            raise SteerlabError(f"not a readable safetensors file ({err})",
                                source=str(st)) from None
        if "directions" not in tensors:
            raise SteerlabError("tensor missing", source=str(st), field="directions")
        layers = tuple(int(x) for x in meta.get("layers", []))
        fields = {k: meta[k] for k in Provenance.__dataclass_fields__ if k in meta}
        try:
            return cls(tensors["directions"], layers, Provenance(**fields))
        except SteerlabError as err:
            raise SteerlabError(str(err), source=str(st)) from None

    def to_gguf(self, path: str | os.PathLike, model_hint: str | None = None) -> Path:
        """Export as a llama.cpp control vector (``--control-vector``): arch
        ``controlvector``, one f32 tensor ``direction.{L}`` per layer ``L``.

        llama.cpp adds ``direction.N`` to the output of its 0-based layer ``N``: the residual
        steerlab steers at layer ``N`` (``resid_post``), so the numbers are the same. It has no
        slot for layer 0 (index 0 is invalid there), so layer 0 is left out with a warning.
        ``model_hint`` defaults to the model's architecture (``llama``, ``qwen3``: its
        ``model_type``, what llama.cpp's own generator writes), else its id.

        Example:
            >>> v.to_gguf("pirate.gguf")  # llama-cli -m model.gguf --control-vector pirate.gguf
        """
        import gguf

        path = Path(path)
        layers = [x for x in self.layers if x > 0]
        if len(layers) < len(self.layers):
            log.warning("llama.cpp cannot steer layer 0 (no control-vector slot for it); "
                        "%s leaves it out", path)
        if not layers:
            raise SteerlabError("the vector has only layer 0, which llama.cpp cannot steer",
                                source=str(path), field="layers")
        if model_hint is None:
            from steerlab.models import model_type

            model_hint = model_type(self.provenance.model_id) or self.provenance.model_id
        with atomic_path(path) as tmp:
            self._write_gguf(gguf.GGUFWriter(str(tmp), "controlvector"), model_hint, layers)
        return path

    def _write_gguf(self, writer: Any, model_hint: str, layers: list[int]) -> None:
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_uint32("controlvector.layer_count", len(layers))
        for layer in layers:
            writer.add_tensor(f"direction.{layer}",
                              self.direction(layer).detach().float().cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def read_gguf(path: str | os.PathLike) -> dict[int, Any]:
    """``{layer: direction}`` of a GGUF control vector, via ``GGUFReader``: tensor
    ``direction.N`` is steerlab layer ``N`` (the inverse of :meth:`SteeringVector.to_gguf`)."""
    import gguf

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
                   provenance=replace(vector.provenance, method=f"random(seed={seed})"))
