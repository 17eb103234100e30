"""The attributes of an activation file (:class:`StoreMeta`): what it was captured from,
checked like command-line flags whether built in code or read from a file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from steerlab.base.checks import integer, text
from steerlab.base.errors import SteerlabError
from steerlab.base.metadata import layer_list, layer_values, strict_json
from steerlab.model.hooks import HookPoint

__all__ = ["FORMAT", "StoreMeta"]

FORMAT = "steerlab.activations/1"


@dataclass(frozen=True)
class StoreMeta:
    """What a file was captured from; every part, shard and final file carries it as attrs.

    Checked on construction, attributes read from a file included (:meth:`from_attrs`), each
    refusal one :class:`SteerlabError` line naming the file and attribute: strings are text,
    ``hook`` a :class:`~steerlab.model.hooks.HookPoint`, ``d_model`` >= 1, ``n_pairs`` and
    ``n_layers`` >= 0, ``mean`` a bool, ``layers`` distinct indices >= 0 (below ``n_layers``
    when known), ``provenance`` "" or a strict-JSON object whose ``resid_norms`` are finite,
    positive and keyed by ``layers``.
    """

    model_id: str
    hook: str
    layers: tuple[int, ...]
    d_model: int
    dtype: str
    mean: bool
    steerlab_version: str
    pairs_file: str = ""
    n_pairs: int = 0  # pairs in the whole input (all shards)
    attn_implementation: str = ""  # "" in files written before it was recorded
    provenance: str = ""  # JSON: devices and versions (see steerlab.model.provenance.provenance)
    n_layers: int = 0  # the model's decoder-layer count (0: unknown, files before it was kept)

    def __post_init__(self) -> None:
        for name, value in _checked(vars(self), None).items():
            object.__setattr__(self, name, value)

    def attrs(self) -> dict[str, Any]:
        """The HDF5 attributes (and parts ``meta.json``) of this meta, ``format`` included."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["format"] = FORMAT
        return d

    def mismatch(self, other: StoreMeta, fields: Sequence[str] = ()) -> tuple[str, str, str] | None:
        """The first field (of ``fields``, default all but ``provenance``) that differs:
        ``(name, mine, other's)``. Provenance (devices, versions) may change on a resume.

        Examples:
            >>> have.mismatch(want)
            ('layers', '[0, 2]', '[1]')
        """
        for name in fields or [f for f in self.__dataclass_fields__ if f != "provenance"]:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "n_layers" and not (mine and theirs):
                continue  # unknown in a file written before it was recorded
            if mine != theirs:
                return name, _show(mine), _show(theirs)
        return None

    @classmethod
    def from_attrs(cls, attrs: Any, source: str) -> StoreMeta:
        """The meta of HDF5 attributes (or of a parts folder's ``meta.json``), checked."""
        values = {name: _plain(attrs[name]) for name in attrs}
        if values.get("format") != FORMAT:
            raise SteerlabError(f"expected attribute format={FORMAT!r}; not a steerlab "
                                "activation file", source=source, field="format")
        for name in _REQUIRED:
            if name not in values:
                raise SteerlabError("missing attribute; not a steerlab activation file",
                                    source=source, field=name)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in _checked(values, source).items() if k in names})


_REQUIRED = ("model_id", "hook", "layers", "d_model", "dtype", "mean", "steerlab_version")
_TEXT = ("model_id", "dtype", "steerlab_version", "pairs_file", "attn_implementation")


def _plain(value: Any) -> Any:
    """An HDF5 attribute's numpy value (scalar or array) as plain Python."""
    return value.tolist() if hasattr(value, "tolist") else value


def _checked(values: dict[str, Any], source: str | None) -> dict[str, Any]:
    """The :class:`StoreMeta` fields among ``values``, checked and normalised."""
    out = {k: text(values[k], k, source=source) for k in _TEXT if k in values}
    if "hook" in values:
        out["hook"] = HookPoint.parse(values["hook"], field="hook", source=source).value
    for name, lo in (("d_model", 1), ("n_pairs", 0), ("n_layers", 0)):
        if name in values:
            out[name] = integer(values[name], name, lo=lo, source=source)
    if "mean" in values:
        if not isinstance(values["mean"], bool):
            raise SteerlabError(f"got {values['mean']!r:.60}; expected true or false",
                                source=source, field="mean")
        out["mean"] = values["mean"]
    if "layers" in values:
        out["layers"] = layer_list(values["layers"], n_layers=out.get("n_layers"),
                                   source=source)
    if "provenance" in values:
        out["provenance"] = _provenance(values["provenance"], out.get("layers"), source)
    return out


def _provenance(value: Any, layers: tuple[int, ...] | None, source: str | None) -> str:
    """The ``provenance`` attribute: "" or a strict-JSON object, its ``resid_norms`` (the
    unit of norm-unit strengths, copied into fitted vectors) finite, positive, per layer."""
    value = text(value, "provenance", source=source)
    if value:
        data = strict_json(value, source=source, field="provenance", what="a JSON object")
        if not isinstance(data, dict):
            raise SteerlabError(f"holds {value!r:.60}; expected a JSON object", source=source,
                                field="provenance")
        if "resid_norms" in data:
            layer_values(data["resid_norms"], "provenance.resid_norms", layers=layers,
                         source=source)
    return value


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)
