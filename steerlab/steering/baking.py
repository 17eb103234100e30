"""Steering baked into a checkpoint: a vector's direction ablated from, or added by, the weights.

``ablate`` is directional ablation (Arditi et al. 2024, "Refusal in language models is
mediated by a single direction"): every matrix that writes into the residual stream is
orthogonalised against the unit direction ``r`` (``W <- W - r r^T W`` along its output axis,
embedding rows ``E <- E - (E r) r^T``, biases ``b <- b - (b.r) r``), so no write has a component
along ``r`` and the residual stream never holds one: the same as removing ``(h.r) r`` from
the embedding and from every attention and MLP write at run time. ``add`` puts ``delta`` (what
:class:`~steerlab.steering.intervention.Steering` would add at ``resid_post`` of a layer) into
the bias of that layer's last write, its MLP output projection. The result is a plain HF
checkpoint (``save_pretrained``: weights, config, tokenizer) with ``steerlab_bake.json`` beside
it and the same record in the config's ``steerlab_bake``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerlab.base.checks import number, output_dir
from steerlab.base.choice import Choice
from steerlab.base.errors import SteerlabError
from steerlab.base.files import write_json_atomic
from steerlab.base.version import __version__
from steerlab.model.loading import (
    EMBEDDED,
    EMBEDDED_REPO_ID,
    embedded_model_dir,
    load_model,
    model_geometry,
    model_type,
    parse_dtype,
)
from steerlab.steering.intervention import Units
from steerlab.steering.norms import residual_norms
from steerlab.steering.vector import SteeringVector, vector_paths

log = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "BAKE_FILE", "BakeOp", "bake", "check_bake", "check_out_dir"]

BAKE_FILE = "steerlab_bake.json"
FORMAT = "steerlab.bake/1"


class BakeOp(Choice):
    """What is baked: ``ablate`` (the direction removed from every residual write) or
    ``add`` (``alpha`` times the vector added to one layer's output)."""

    ABLATE = "ablate"
    ADD = "add"


@dataclass(frozen=True)
class _Arch:
    layers: str  # the decoder layers' ModuleList
    embeddings: tuple[str, ...]  # modules whose weight rows are written into the stream
    writers: tuple[str, ...]  # per layer: what writes into the stream (those present)
    add_bias: str | None = None  # per layer: the MLP's output projection, whose bias `add` sets
    bias_switch: str | None = None  # the config flag that gives `add_bias` a bias
    switch_zeros: tuple[str, ...] = ()  # the other biases that flag creates (set to zero)


_LLAMA_WRITERS = ("self_attn.o_proj", "mlp.down_proj", "mlp.experts.down_proj",
                  "mlp.shared_expert.down_proj")
_LLAMA = _Arch("model.layers", ("model.embed_tokens",), _LLAMA_WRITERS)

# model_type -> how its weights write into the residual stream
ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("model.layers", ("model.embed_tokens",), _LLAMA_WRITERS, "mlp.down_proj",
                   "mlp_bias", ("mlp.gate_proj", "mlp.up_proj")),
    "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "qwen3_moe": _LLAMA, "phi3": _LLAMA,
    "gpt2": _Arch("transformer.h", ("transformer.wte", "transformer.wpe"),
                  ("attn.c_proj", "mlp.c_proj"), "mlp.c_proj"),
    "gpt_neox": _Arch("gpt_neox.layers", ("gpt_neox.embed_in",),
                      ("attention.dense", "mlp.dense_4h_to_h"), "mlp.dense_4h_to_h"),
}
# architectures that normalise each attention and MLP output before the residual add
_POST_NORMS = {"gemma2", "gemma3", "gemma3_text", "olmo2", "olmo3"}


def check_bake(kind: str | None, op: BakeOp, *, source: str | None = None) -> _Arch | None:
    """The bake recipe of architecture ``kind`` (a config's ``model_type``) for ``op``, or one
    :class:`SteerlabError` line saying why it cannot carry it. ``None`` passes (not known yet:
    checked again once the config is read).

    Examples:
        >>> check_bake("qwen3", BakeOp.ADD)
        Traceback (most recent call last):
        ...
        steerlab.base.errors.SteerlabError: ...qwen3 has no bias on its MLP output projection...
    """
    if kind is None:
        return None
    arch = ARCHITECTURES.get(kind)
    if arch is None:
        why = ("normalises each attention and MLP output before it joins the residual stream "
               "(post-norms), so orthogonal weights would not ablate a direction"
               if kind in _POST_NORMS else "is not one bake knows how to edit")
        raise SteerlabError(f"architecture {kind} {why}; bake supports "
                            f"{', '.join(sorted(ARCHITECTURES))}", source=source, field="model")
    if op is BakeOp.ADD and arch.add_bias is None:
        raise SteerlabError(f"{kind} has no bias on its MLP output projection and no config "
                            "switch that creates one, so a constant cannot be added to a layer's "
                            "output; --op add supports llama, gpt2, gpt_neox", source=source,
                            field="op")
    return arch


def _resolve(model: str | os.PathLike) -> tuple[str, str]:
    """(where to load from, the id to record)."""
    name = str(model)
    return (str(embedded_model_dir()), EMBEDDED_REPO_ID) if name == EMBEDDED else (name, name)


def _pick_layer(vector: SteeringVector, layer: int | None) -> int:
    if layer is None:
        if len(vector.layers) > 1:
            raise SteerlabError(f"the vector has layers {list(vector.layers)}; choose the one "
                                "to bake with --layer", field="layer")
        return vector.layers[0]
    vector.direction(layer)  # refuses a layer the vector lacks
    return int(layer)


def _delta(model: str, vector: SteeringVector, layer: int, alpha: float,
           units: Units) -> torch.Tensor:
    """What ``Steering`` adds at ``layer``: ``alpha * v`` (raw) or ``alpha * norm * v / |v|``
    (norm: the vector's stored residual norm, else measured on the model)."""
    v = vector.direction(layer).double()
    if units is Units.RAW:
        return alpha * v
    norm = vector.resid_norm(layer)
    if norm is None:
        log.info("the vector has no residual norm for layer %d; measuring it", layer)
        norm = residual_norms(load_model(model, device="cpu"), [layer])[layer]
    return alpha * float(norm) * v / v.norm()


def _project_out(t: torch.Tensor, r: torch.Tensor, axis: int) -> None:
    """Remove from ``t`` (in place) its component along unit ``r`` on axis ``axis``."""
    x = t.data.double().movedim(axis, -1)
    x = x - (x @ r)[..., None] * r
    t.data.copy_(x.movedim(-1, axis).to(t.dtype))


def _write_axis(name: str, module: Any, d_model: int) -> list[tuple[torch.Tensor, int]]:
    """``(tensor, the axis of its d_model output)`` of a writer: a Linear's weight rows, a
    GPT-2 Conv1D's columns, the experts' ``[expert, d_model, d_ff]`` down projections."""
    from transformers.pytorch_utils import Conv1D  # deferred: transformers

    if isinstance(module, torch.nn.Linear):
        found = [(module.weight, 0)]
    elif isinstance(module, Conv1D):
        found = [(module.weight, 1)]
    elif isinstance(module, torch.nn.Parameter) and module.ndim == 3:
        found = [(module, 1)]
    else:
        raise SteerlabError(f"{name} is a {type(module).__name__}; bake expected a linear "
                            "layer", field="model")
    if getattr(module, "bias", None) is not None:
        found.append((module.bias, 0))
    for t, axis in found:
        if t.shape[axis] != d_model:
            raise SteerlabError(f"{name} writes {t.shape[axis]} values; the stream has "
                                f"{d_model}", field="model")
    return found


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _ablate(hf: Any, arch: _Arch, r: torch.Tensor) -> int:
    """Orthogonalise every residual write of ``hf`` against ``r``; the tensors edited."""
    d_model = r.shape[0]
    out_emb = hf.get_output_embeddings()
    if out_emb is not None and out_emb.weight is hf.get_input_embeddings().weight:
        out_emb.weight = torch.nn.Parameter(out_emb.weight.detach().clone())  # untie
        hf.config.tie_word_embeddings = False
        hf.config.get_text_config().tie_word_embeddings = False
    edited = []
    for name in arch.embeddings:
        edited.append((_get(hf, name).weight, 1))
    for i, layer in enumerate(_get(hf, arch.layers)):
        found = [(w, _get(layer, w)) for w in arch.writers if _get(layer, w) is not None]
        if len(found) < 2:
            raise SteerlabError(f"layer {i} has {[w for w, _ in found]}; bake expected an "
                                f"attention and an MLP output among {list(arch.writers)}",
                                field="model")
        for w, module in found:
            edited += _write_axis(f"layer {i} {w}", module, d_model)
    with torch.no_grad():
        for t, axis in edited:
            _project_out(t, r.to(t.device), axis)
    return len(edited)


def _add(hf: Any, arch: _Arch, layer: int, delta: torch.Tensor, created: bool) -> None:
    """Add ``delta`` to the bias of ``layer``'s MLP output projection; where the config
    switch has just ``created`` the biases, every one of them starts at zero."""
    layers = _get(hf, arch.layers)
    with torch.no_grad():
        if created:
            for block in layers:
                for name in (*arch.switch_zeros, arch.add_bias):
                    _get(block, name).bias.zero_()
        bias = _get(layers[layer], arch.add_bias).bias
        bias.add_(delta.to(bias.device).to(bias.dtype))


def _load(source: str, op: BakeOp, dtype: torch.dtype) -> tuple[Any, Any, _Arch, bool]:
    """(the HF model, its tokenizer, its recipe, whether the bias switch was turned on),
    loaded on the CPU with plain transformers: bake's own copy, edited in place."""
    from transformers import (  # deferred: transformers
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(source)
    arch = check_bake(config.model_type, op, source=source)
    assert arch is not None
    switch = arch.bias_switch if op is BakeOp.ADD else None
    created = switch is not None and not getattr(config, switch, False)
    if created:
        setattr(config, switch, True)
    hf = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype,
                                              device_map={"": "cpu"})
    return hf.eval(), AutoTokenizer.from_pretrained(source), arch, created


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _new_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` (absent or empty) when the block
    succeeds; on an error it is removed and ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)  # atomic; replaces an empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out_dir(out_dir: str | os.PathLike, inputs: dict[str, Any]) -> Path:
    """``out_dir`` as a new checkpoint folder: absent or empty (a checkpoint is written whole,
    never over another's files), writable, neither an input nor inside one."""
    out = output_dir(out_dir, "output", inputs=inputs)
    if out.is_dir() and any(out.iterdir()):
        raise SteerlabError("holds files; give a new or empty folder (a baked checkpoint is "
                            "written whole, never over other files)", source=str(out),
                            field="output")
    return out


def _vector(vector: SteeringVector | str | os.PathLike) -> tuple[SteeringVector, dict[str, Any]]:
    """The vector and what the record says of it: its files' SHA-256 (a vector in memory: of
    its float32 directions), layers, model and method."""
    if isinstance(vector, SteeringVector):
        vec, files = vector, {"file": None, "sha256": hashlib.sha256(
            vector.directions.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()}
    else:
        vec = SteeringVector.load(vector)
        st, side = vector_paths(vector)
        files = {"file": str(st), "sha256": _sha256(st), "sidecar_sha256": _sha256(side)}
    return vec, {**files, "layers": list(vec.layers), "model_id": vec.provenance.model_id,
                 "method": vec.provenance.method}


def _plan(model: str | os.PathLike, vector: SteeringVector | str | os.PathLike,
          out_dir: str | os.PathLike, op: str, layer: int | None, alpha: float | None,
          units: str) -> dict[str, Any]:
    """Every argument checked before a model loads; what the bake record says."""
    op_ = BakeOp.parse(op, field="op")
    units_ = Units.parse(units, field="units")
    vec, about = _vector(vector)
    chosen = _pick_layer(vec, layer)
    if op_ is BakeOp.ABLATE:
        if alpha is not None:
            raise SteerlabError("--alpha is for --op add (ablate removes the direction)",
                                field="alpha")
    elif alpha is None:
        raise SteerlabError("--op add needs a strength: give --alpha", field="alpha")
    geometry = model_geometry(model)
    if geometry:
        vec.check_model(geometry["n_layers"], geometry["d_model"], source=str(model))
    check_bake(model_type(model), op_, source=str(model))
    source, model_id = _resolve(model)
    inputs = {"vector": vector_paths(vector) if about["file"] else None,
              "model": Path(source) if Path(source).is_dir() else None}
    out = check_out_dir(out_dir, inputs)
    return {"format": FORMAT, "op": op_.value, "layer": chosen, "vector": about,
            "alpha": None if alpha is None else number(alpha, "alpha"),
            "units": None if op_ is BakeOp.ABLATE else units_.value,
            "source_model": model_id, "steerlab_version": __version__,
            "_vec": vec, "_source": source, "_out": out}


def bake(model: str | os.PathLike, vector: SteeringVector | str | os.PathLike,
         out_dir: str | os.PathLike, *, op: str | BakeOp = BakeOp.ABLATE,
         layer: int | None = None, alpha: float | None = None,
         units: str | Units = Units.NORM, dtype: str | torch.dtype = "float32") -> Path:
    """Write a checkpoint of ``model`` whose weights carry ``vector``'s steering; return it.

    ``ablate``: every residual write orthogonalised against the unit direction at ``layer``
    (the embeddings, position embeddings too, every attention and MLP output projection and
    expert down projection, their biases; tied input and output embeddings are untied, so the
    unembedding is unchanged). ``add``: ``alpha`` (in ``units``, as
    :class:`~steerlab.steering.intervention.Steering`) times the vector added to ``layer``'s
    output, through its MLP output bias (Llama gets ``mlp_bias``, every new bias zero but
    that one). Every input is checked before the model loads; the folder appears whole or
    not at all, with ``steerlab_bake.json`` and ``config.steerlab_bake`` recording the bake.

    Args:
        model: ``"embedded"``, a local ``save_pretrained`` folder or a hub id.
        vector: a vector file (``.safetensors`` or its stem) or a :class:`SteeringVector`.
        out_dir: a new or empty folder.
        op: ``ablate`` or ``add``.
        layer: the vector's layer to bake (needed when it has several).
        alpha: ``add``'s strength.
        units: ``norm`` (a fraction of the layer's residual norm: stored with the vector,
            else measured) or ``raw`` (times the stored vector).
        dtype: the weights' dtype (edits are computed in float64).

    Examples:
        >>> from transformers import AutoModelForCausalLM
        >>> out = bake("embedded", "vectors/pirate", "smol-ablated", layer=12)
        >>> AutoModelForCausalLM.from_pretrained(out).config.steerlab_bake["op"]
        'ablate'
    """
    torch_dtype = parse_dtype(dtype)
    plan = _plan(model, vector, out_dir, str(op), layer, alpha, str(units))
    vec, source, out = plan.pop("_vec"), plan.pop("_source"), plan.pop("_out")
    op_, chosen = BakeOp(plan["op"]), plan["layer"]
    if op_ is BakeOp.ADD:
        delta = _delta(str(model), vec, chosen, plan["alpha"], Units(plan["units"]))
    hf, tokenizer, arch, created = _load(source, op_, torch_dtype)
    if op_ is BakeOp.ABLATE:
        v = vec.direction(chosen).double()
        plan["tensors_edited"] = _ablate(hf, arch, v / v.norm())
    else:
        _add(hf, arch, chosen, delta, created)
        plan["added_norm"] = float(delta.norm())
    plan.update(model_type=hf.config.model_type, dtype=str(hf.dtype).removeprefix("torch."))
    hf.config.steerlab_bake = plan
    with _new_folder(out) as tmp:
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / BAKE_FILE, plan, allow_nan=False)
    log.info("baked %s of layer %d into %s", op_.value, chosen, out)
    return out
