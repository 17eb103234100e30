"""Where the weights go: devices checked before loading, weights placed where asked, sdpa = eager.

CPU machines cannot place weights on a GPU, so the placement path is proven with the ``meta``
device: ``load_model(device="meta")`` goes through the same ``device_map={"": device}`` code
that puts weights on ``cuda:0``, and the placement check runs after it.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import EPS32, assert_close_to_scale, assert_same_tokens

from steerlab.base.errors import SteerlabError
from steerlab.extraction.capture import capture_pairs
from steerlab.generation.generator import generate_with_metrics
from steerlab.model.inputs import stop_token_ids
from steerlab.model.loading import load_from_options, load_model
from steerlab.model.options import ModelOptions, check_placement, parse_device_map, resolve_device
from steerlab.model.provenance import provenance
from steerlab.model.templates import encode_chat
from steerlab.traits.pairs import Pair

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_meta_load_puts_every_parameter_on_the_meta_device():
    model = load_model("embedded", device="meta")
    hf = model.original_model
    devices = {t.device.type for t in [*hf.parameters(), *hf.buffers()]}
    assert devices == {"meta"}
    assert provenance(model)["devices"] == ["meta"]


def test_cpu_load_is_float32_on_cpu_with_sdpa(embedded_model):
    info = provenance(embedded_model)
    assert info["devices"] == ["cpu"] and info["dtype"] == "float32"
    assert info["attn_implementation"] == "sdpa"
    assert set(info["versions"]) == {"steerlab", "torch", "transformers", "transformer-lens"}


def test_bfloat16_load_has_bfloat16_weights():
    model = load_model("embedded", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.original_model.parameters()} == {torch.bfloat16}


def test_placement_check_names_weights_elsewhere(tiny_model):
    hf = tiny_model.original_model
    check_placement(hf, ModelOptions(device="cpu").validate())
    with pytest.raises(SteerlabError, match=r"weights are on cpu, not on meta \(e\.g\. "):
        check_placement(hf, ModelOptions(device="meta").validate())


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_an_error_not_a_fallback(device):
    with pytest.raises(SteerlabError, match="field 'device'.*CPU-only build"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x", ""])
def test_unknown_devices_are_named(device):
    with pytest.raises(SteerlabError, match="field 'device'.*expected auto, cpu, cuda"):
        resolve_device(device)


def test_auto_is_the_best_device_here():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type
    if want == "cpu" and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(("options", "field"), [
    (ModelOptions(dtype="float64"), "dtype"),
    (ModelOptions(attn_implementation="flash"), "attn_implementation"),
    (ModelOptions(n_devices=0), "n_devices"),
    (ModelOptions(device_map="everywhere"), "device_map"),
    (ModelOptions(device_map="{not json"), "device_map"),
    (ModelOptions(device_map="auto", n_devices=2), "n_devices"),
])
def test_bad_model_options_name_the_field(options, field):
    with pytest.raises(SteerlabError, match=f"field '{field}'"):
        options.validate()


@needs_no_cuda
@pytest.mark.parametrize("options", [ModelOptions(n_devices=2), ModelOptions(device_map="auto"),
                                     ModelOptions(device_map='{"": "cuda:1"}')])
def test_gpu_splits_without_gpus_are_errors(options):
    with pytest.raises(SteerlabError, match="GPU|CPU-only"):
        options.validate()


def test_device_maps_parse():
    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}') == {
        "model.layers.0": 0, "lm_head": "cpu"}
    assert parse_device_map(None) is None


def test_explicit_cpu_device_map_loads_and_checks():
    model = load_from_options(ModelOptions(device_map='{"": "cpu"}'))
    assert provenance(model)["devices"] == ["cpu"]


def test_yaml_model_keys_are_validated():
    opts = ModelOptions.from_mapping({"model": "embedded", "dtype": "bfloat16", "device": "cpu",
                                      "attn_implementation": "eager"}, source="x.yaml")
    assert (opts.dtype, opts.device, opts.attn_implementation) == ("bfloat16", "cpu", "eager")
    with pytest.raises(SteerlabError, match="x.yaml, field 'n_devices': got '2'; expected "
                                            "integer"):
        ModelOptions.from_mapping({"n_devices": "2"}, source="x.yaml")


# --- sdpa (HF's attention modules) and eager (the bridge's attention) agree -------------------

@pytest.fixture(scope="module")
def eager_model():
    return load_model("embedded", device="cpu", attn_implementation="eager")


QUESTIONS = ["What is the capital of France?", "Name two rivers.",
             "Write a short line about autumn leaves falling slowly."]
# The two kernels sum the same products in another order: on this float32 model logits and
# residuals differ by up to 18 and 15 eps of each position's largest entry (measured); 128 eps
# leaves ~7x headroom.
KERNEL_EPS = 128


@pytest.fixture(scope="module")
def padded_logits(embedded_model, eager_model):
    """Both models' logits at the real positions of a left-padded batch of QUESTIONS."""
    from steerlab.model.inputs import left_pad

    tok = embedded_model.tokenizer
    ids, mask = left_pad([encode_chat(tok, q) for q in QUESTIONS], tok.pad_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        a, b = (m.original_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                for m in (embedded_model, eager_model))
    real = mask.bool()
    return a[real], b[real]


def test_sdpa_and_eager_agree_on_logits_of_a_padded_batch(padded_logits):
    assert_close_to_scale(*padded_logits, KERNEL_EPS)


def test_sdpa_and_eager_agree_on_generation_metrics(embedded_model, eager_model, padded_logits):
    tok = embedded_model.tokenizer
    prompts = [encode_chat(tok, q) for q in QUESTIONS]
    a, b = (generate_with_metrics(m, prompts, max_new_tokens=8)
            for m in (embedded_model, eager_model))
    # Logits off by delta <= KERNEL_EPS eps of their scale (|z| <= ~41 on these prompts) move
    # H by <= delta sum p|log p + H| <= 2 H delta and a top-k mass by <= 2 delta relative; each
    # path's log-softmax adds e ~ eps (max|z| + ln V) (its logsumexp's rounding) and its
    # V-term sums ~log2(V) eps relative. Measured: < 0.4% of these bounds.
    z, vocab = float(padded_logits[0].abs().max()), embedded_model.cfg.d_vocab
    delta, e = KERNEL_EPS * EPS32 * z, EPS32 * (z + math.log(vocab))
    h_tol = dict(rtol=2 * delta + 2 * (e + math.log2(vocab) * EPS32), atol=2 * e)
    m_tol = dict(rtol=2 * delta + 2 * (e + 6 * EPS32), atol=0)
    stops = stop_token_ids(tok, embedded_model.original_model)
    for p, x, y in zip(prompts, a, b, strict=True):
        assert_same_tokens(embedded_model, p, x.tokens, y.tokens, eps_units=KERNEL_EPS,
                           stop_ids=stops)
        n = next((i for i, (s, t) in enumerate(zip(x.tokens, y.tokens, strict=False)) if s != t),
                 min(len(x.tokens), len(y.tokens)))  # metrics of the common prefix
        np.testing.assert_allclose(x.entropy[:n], y.entropy[:n], **h_tol)
        np.testing.assert_allclose(x.top_k_mass[:n], y.top_k_mass[:n], **m_tol)


def test_sdpa_and_eager_agree_on_captures(embedded_model, eager_model):
    pairs = [Pair(id=str(i), prompt=q, chosen="Arr, matey, it be so.",
                  rejected="Yes, it is so.") for i, q in enumerate(QUESTIONS)]
    a, b = (capture_pairs(m, pairs, [4, 12, 29], mean=True)
            for m in (embedded_model, eager_model))
    for name in ("chosen", "rejected", "chosen_mean", "rejected_mean"):
        assert_close_to_scale(getattr(a, name), getattr(b, name), KERNEL_EPS)


# --- every model-loading command checks its device before anything else --------------------

COMMANDS = {
    "infer": ["infer", "--prompts-json", "{prompts}", "--personae-json", "{personae}",
              "--output-dir", "{out}"],
    "chat": ["chat"],
    "serve": ["serve", "--port", "0"],
    "vectors eval": ["vectors", "eval", "{out}/v.safetensors"],
    "traits collect": ["traits", "collect", "pirate", "--run-dir", "{out}"],
    "demo": ["demo", "--quick", "--output-dir", "{out}"],
}


@needs_no_cuda
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_cuda_without_cuda_before_loading(command, tmp_path, capsys,
                                                                monkeypatch):
    from steerlab.cli import main

    (tmp_path / "p.json").write_text('["Hi"]')
    (tmp_path / "q.json").write_text('[{"persona": "a pirate", "category": "x", '
                                     '"article": "a"}]')
    out = tmp_path / "run"
    args = [a.format(prompts=tmp_path / "p.json", personae=tmp_path / "q.json", out=out)
            for a in COMMANDS[command]]
    monkeypatch.setattr(sys, "argv", ["steerlab", *args, "--device", "cuda"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert len(err.splitlines()) == 1 and "field 'device'" in err and "CPU-only" in err, err
    assert not out.exists()


@needs_no_cuda
def test_extract_config_with_cuda_exits_2_in_a_real_process(tmp_path):
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(f"pairs: {tmp_path / 'pairs.jsonl'}\noutput: {tmp_path / 'out' / 'a.h5'}\n"
                   "device: cuda\n")
    run = subprocess.run([sys.executable, "-m", "steerlab.cli", "extract", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "field 'device'" in run.stderr, run.stderr
    assert str(cfg) in run.stderr and not (tmp_path / "out").exists()


def test_extract_flags_override_only_the_config_keys_given(tmp_path):
    from steerlab.extraction.extractor import load_config

    cfg = tmp_path / "extract.yaml"
    cfg.write_text("pairs: p.jsonl\noutput: a.h5\nmodel: embedded\ndtype: float32\n"
                   "device: cpu\nattn_implementation: eager\n")
    opts = load_config(cfg, overrides={"dtype": "bfloat16"}).model
    assert (opts.model, opts.dtype, opts.device, opts.attn_implementation) == (
        "embedded", "bfloat16", "cpu", "eager")
    with pytest.raises(SteerlabError, match="field 'device_map'"):
        load_config(cfg, overrides={"device_map": "nowhere"})
