"""`steerlab vectors bake`: a vector baked into a checkpoint equals the runtime intervention.

The references are plain torch forward hooks on the ORIGINAL HF model, written here: for
``ablate``, ``h - (h.r) r`` on the embedding output(s) and on every attention and MLP block's
output (each write into the residual stream; hooks on the decoder layers' outputs alone would
not do: the MLP reads the attention's write inside the layer); for ``add``, ``+ delta`` on one
decoder layer's output. The baked checkpoint is loaded with plain ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import EPS32, assert_close_to_scale, run_cli
from families import build_family, family_config

from steerlab.steering.baking import BAKE_FILE, bake
from steerlab.steering.vector import Provenance, SteeringVector

# family -> (embedding modules, per decoder layer: the attention and MLP blocks, the layers)
WRITES = {
    "llama": (("model.embed_tokens",), ("self_attn", "mlp"), "model.layers"),
    "qwen2": (("model.embed_tokens",), ("self_attn", "mlp"), "model.layers"),
    "qwen3": (("model.embed_tokens",), ("self_attn", "mlp"), "model.layers"),
    "qwen3_moe": (("model.embed_tokens",), ("self_attn", "mlp"), "model.layers"),
    "mistral": (("model.embed_tokens",), ("self_attn", "mlp"), "model.layers"),
    "phi3": (("model.embed_tokens",), ("self_attn", "mlp"), "model.layers"),
    "gpt2": (("transformer.wte", "transformer.wpe"), ("attn", "mlp"), "transformer.h"),
    "gpt_neox": (("gpt_neox.embed_in",), ("attention", "mlp"), "gpt_neox.layers"),
}
LAYER = 2
# in float32 eps of each logits row's largest magnitude; measured at most 4.8 over the
# families: the baked weights are the exact projection rounded to float32 once (about 1 eps
# of each weight), the hooked model rounds each projected activation instead, and four layers
# and a final norm pass those roundings on. A missed write is ~1e4 eps off (checked below:
# the ablation itself moves the logits by more than 1e3 eps)
ABLATE_EPS = 32
ADD_EPS = 32  # the same delta added by a bias or by a hook on the layer: rounding only


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _refused(capsys, fragment: str, *args: str) -> None:
    """One ``error:`` line holding ``fragment``, exit code 2."""
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _tied(tokenizer, folder: Path) -> Path:
    """A tiny Llama whose unembedding is its embedding (as SmolLM2's)."""
    from transformers import AutoModelForCausalLM

    config = family_config("llama", tokenizer)
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("bake-models")
    out = {f: build_family(f, root / f, tokenizer) for f in [*WRITES, "gemma2", "olmo2"]}
    out["llama-tied"] = _tied(tokenizer, root / "llama-tied")
    return out


def _vector(folder: Path, d_model: int = 64, layers=(1, 2), seed: int = 0, norms=None) -> Path:
    gen = torch.Generator().manual_seed(seed)
    prov = Provenance(model_id="tiny", n_layers=4, resid_norms=norms or {})
    vec = SteeringVector(torch.randn(len(layers), d_model, generator=gen), layers, prov)
    return vec.save(folder / f"vec-{d_model}-{len(layers)}")


def _ids(tokenizer, n: int = 12):
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, len(tokenizer), (2, n), generator=gen)


def _ablating(hf, family: str, r: torch.Tensor) -> list:
    """Hooks removing ``(h.r) r`` from every write into the residual stream of ``hf``."""
    embeddings, blocks, layers = WRITES[family.removesuffix("-tied")]

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h - (h @ r)[..., None] * r
        return (h, *out[1:]) if isinstance(out, tuple) else h

    mods = [_get(hf, e) for e in embeddings]
    mods += [_get(layer, b) for layer in _get(hf, layers) for b in blocks]
    return [m.register_forward_hook(hook) for m in mods]


@pytest.mark.parametrize("family", [*WRITES, "llama-tied"])
def test_ablate_equals_hooks_and_leaves_no_component(family, models, tokenizer, tmp_path):
    vec_path = _vector(tmp_path)
    out = bake(models[family], vec_path, tmp_path / "baked", op="ablate", layer=LAYER)
    v = SteeringVector.load(vec_path).direction(LAYER).float()
    r = v / v.norm()
    ids = _ids(tokenizer)
    original, baked = _hf(models[family]), _hf(out)
    handles = _ablating(original, family, r)
    try:
        with torch.inference_mode():
            want = original(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    seen: list[torch.Tensor] = []
    layers = _get(baked, WRITES[family.removesuffix("-tied")][2])
    handles = [m.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(
        o, tuple) else o)) for m in layers]
    try:
        with torch.inference_mode():
            result = baked(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    assert_close_to_scale(result.logits, want, ABLATE_EPS)
    # the invariant: the stream after the embedding and after every layer has no component
    # along r, to float32 rounding of its norm (measured at most 0.6 eps; a random direction
    # in 64 dimensions holds ~1/8 of the norm, 1e6 eps)
    for h in [result.hidden_states[0], *seen]:
        ratio = (h @ r).abs() / h.norm(dim=-1)
        assert float(ratio.max()) < 8 * EPS32, float(ratio.max())
    with torch.inference_mode():  # and the bake did something: the model changed
        plain = _hf(models[family])(input_ids=ids).logits
    assert float((plain - want).abs().max()) > 1e3 * EPS32 * float(want.abs().max())
    record = json.loads((out / BAKE_FILE).read_text())
    assert record["op"] == "ablate" and record["layer"] == LAYER
    assert baked.config.steerlab_bake["vector"]["sha256"] == record["vector"]["sha256"]


@pytest.mark.parametrize(("family", "units"), [("llama", "raw"), ("llama", "norm"),
                                               ("gpt2", "raw"), ("gpt_neox", "norm")])
def test_add_equals_a_hook_on_the_layer_output(family, units, models, tokenizer, tmp_path):
    vec_path = _vector(tmp_path, norms={"1": 3.0, "2": 5.0})
    alpha = 3.0 if units == "raw" else 0.5
    out = bake(models[family], vec_path, tmp_path / "baked", op="add", layer=LAYER,
               alpha=alpha, units=units)
    v = SteeringVector.load(vec_path).direction(LAYER).float()
    delta = alpha * v if units == "raw" else alpha * 5.0 * v / v.norm()
    ids = _ids(tokenizer)
    original = _hf(models[family])

    def hook(module, args, out):
        return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

    handle = _get(original, WRITES[family][2])[LAYER].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            want = original(input_ids=ids).logits
    finally:
        handle.remove()
    with torch.inference_mode():
        got = _hf(out)(input_ids=ids).logits
    assert_close_to_scale(got, want, ADD_EPS)
    record = json.loads((out / BAKE_FILE).read_text())
    assert (record["op"], record["alpha"], record["units"]) == ("add", alpha, units)
    assert record["added_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)


def test_add_alpha_zero_leaves_logits_bit_identical(models, tokenizer, tmp_path):
    out = bake(models["llama"], _vector(tmp_path), tmp_path / "baked", op="add", layer=LAYER,
               alpha=0.0, units="raw")
    ids = _ids(tokenizer)
    with torch.inference_mode():
        assert torch.equal(_hf(out)(input_ids=ids).logits,
                           _hf(models["llama"])(input_ids=ids).logits)


def _no_load(*args, **kwargs):
    raise AssertionError("the model loaded before the bad input was refused")


@pytest.mark.parametrize(("fragment", "case"), [
    ("gemma2 normalises each attention and MLP output", ("gemma2", "ablate", "1")),
    ("olmo2 normalises each attention and MLP output", ("olmo2", "ablate", "1")),
    ("qwen3 has no bias on its MLP output projection", ("qwen3", "add", "1")),
    ("expected one of ['ablate', 'add']", ("llama", "scale", "1")),
    ("the vector has d_model 32; the model 64", ("llama", "ablate", "32")),
    ("choose the one to bake with --layer", ("llama", "ablate", "multi")),
    ("--alpha is for --op add", ("llama", "ablate", "alpha")),
    ("--op add needs a strength", ("llama", "add", "1")),
    ("the vector has no layer 3", ("llama", "ablate", "layer3")),
    ("holds files; give a new or empty folder", ("llama", "ablate", "into-vector")),
    ("not one of the command's inputs", ("llama", "ablate", "into-model")),
])
def test_refusals_are_one_line_before_any_load(fragment, case, models, tmp_path, capsys,
                                               monkeypatch):
    from steerlab.steering import baking as module

    monkeypatch.setattr(module, "_load", _no_load)
    monkeypatch.setattr(module, "load_model", _no_load)
    family, op, how = case
    vec = _vector(tmp_path / "vectors", d_model=32 if how == "32" else 64,
                  layers=(1, 2) if how == "multi" else (2,))
    out = {"into-vector": vec.parent, "into-model": models[family]}.get(how, tmp_path / "out")
    args = ["vectors", "bake", str(vec), "-o", str(out), "--op", op, "--model",
            str(models[family])]
    if op == "add" and family != "llama":
        args += ["--alpha", "1"]
    if how == "alpha":
        args += ["--alpha", "2"]
    if how == "layer3":
        args += ["--layer", "3"]
    before = sorted(p.name for p in out.parent.iterdir())
    _refused(capsys, fragment, *args)
    assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing written


def test_cli_on_the_embedded_model_equals_the_hooks(embedded_dir, tokenizer, tmp_path, capsys):
    """SmolLM2-135M (tied embeddings: bake unties them) baked through the CLI, compared on
    a few tokens with the ablation hooks on the original."""
    gen = torch.Generator().manual_seed(5)
    vec = SteeringVector(torch.randn(2, 576, generator=gen), (10, 20)).save(tmp_path / "v")
    out = tmp_path / "smol-ablated"
    assert run_cli("vectors", "bake", str(vec), "-o", str(out), "--layer", "10") == 0
    assert f"wrote {out}" in capsys.readouterr().out
    r = SteeringVector.load(vec).direction(10).float()
    r = r / r.norm()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    original, baked = _hf(embedded_dir), _hf(out)
    assert not baked.config.tie_word_embeddings
    handles = _ablating(original, "llama", r)
    try:
        with torch.inference_mode():
            want = original(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode():
        got = baked(input_ids=ids).logits
    # 30 layers instead of 4 pass on more roundings: measured 24 eps
    assert_close_to_scale(got, want, 4 * ABLATE_EPS)
    record = json.loads((out / BAKE_FILE).read_text())
    assert record["source_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (out / "tokenizer.json").is_file()
