"""Architectures at load and the engine each can run (issue 27, items 1-4).

The attention kernel is ``auto`` by default (HF's choice, HF's modules); an architecture whose
cache the static engine cannot hold runs eager under ``auto`` and refuses ``static`` in one
line; one whose cache breaks, or that TransformerLens has no bridge for, fails at load in one
line; ``auto`` picks static on an accelerator only after the static-vs-eager check passed
there. References: HF's own forward without a cache (a greedy loop), and the recorded proof.
"""

from __future__ import annotations

import logging

import pytest
import torch
from families import build_family

from steerlab.base.errors import SteerlabError
from steerlab.generation import engine
from steerlab.generation.cache import cache_layout, static_refusal
from steerlab.generation.engine import Engine, proof_path, proven
from steerlab.generation.generator import generate
from steerlab.generation.static_check import StaticCheck, check_static, record
from steerlab.model.attention import hf_attention, kernel
from steerlab.model.loading import load_model
from steerlab.model.provenance import provenance

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def _save(tokenizer, directory, model_type: str, **kwargs):
    """A seeded random model of ``model_type`` saved with the embedded tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg)
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _greedy_reference(directory, ids: list[int], n: int) -> list[int]:
    """HF's model alone, no cache: the argmax of a full forward, token after token."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, hf(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def gemma2_dir(tokenizer, tmp_path_factory):
    return build_family("gemma2", tmp_path_factory.mktemp("gemma2"), tokenizer)


@pytest.fixture(scope="module")
def qwen3_next_dir(tokenizer, tmp_path_factory):
    return _save(tokenizer, tmp_path_factory.mktemp("qwen3_next"), "qwen3_next", **SMALL,
                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                 linear_value_head_dim=16)


PROMPT = "Tell me a long story about the sea and the sky, please, with many words in it"


def test_auto_kernel_is_what_hf_picks_and_hf_modules_run(gemma2_dir, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="steerlab.model.loading"):
        model = load_model(gemma2_dir, device="cpu")  # no flag: Gemma-2 has no sdpa
    assert kernel(model) == "eager" and hf_attention(model)
    assert provenance(model)["attn_implementation"] == "eager"
    line = [r.getMessage() for r in caplog.records if "attention" in r.getMessage()]
    assert len(line) == 1 and "auto" in line[0] and "Gemma2ForCausalLM" in line[0]
    assert cache_layout(model).mixed  # sliding and global layers: the static engine serves it
    with pytest.raises(SteerlabError) as err:
        load_model(gemma2_dir, device="cpu", attn_implementation="sdpa")
    message = str(err.value)
    assert "\n" not in message and "'sdpa'" in message and "it can use: auto, eager" in message


def test_explicit_eager_keeps_the_bridge_attention_and_refuses_static(gemma2_dir):
    model = load_model(gemma2_dir, device="cpu", attn_implementation="eager")
    assert not hf_attention(model)
    assert "attn_implementation='eager'" in static_refusal(model)
    assert Engine.AUTO.resolve(model, batching=True) is Engine.EAGER


def test_linear_attention_hybrid_runs_eager_and_refuses_static(qwen3_next_dir, tokenizer,
                                                               caplog, monkeypatch):
    model = load_model(qwen3_next_dir, device="cpu")
    why = static_refusal(model)
    assert why is not None and "linear_attention" in why and "\n" not in why
    monkeypatch.setattr(engine, "_SAID", set())  # each reason is said once per process
    with caplog.at_level(logging.INFO, logger="steerlab.generation.engine"):
        assert Engine.AUTO.resolve(model, batching=True) is Engine.EAGER
        assert Engine.AUTO.resolve(model, batching=True) is Engine.EAGER
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and why in said[0]
    ids = list(tokenizer(PROMPT)["input_ids"])
    with pytest.raises(SteerlabError, match="engine"):
        generate(model, [ids], max_new_tokens=4, engine="static")
    # the bridge's gated-delta-net wrapper lost the recurrent state between steps; HF's
    # module is back, so the cached loop equals HF's full forward token for token
    got = generate(model, [ids], max_new_tokens=8).tokens[0]
    assert got == _greedy_reference(qwen3_next_dir, ids, len(got))


def test_an_architecture_without_a_bridge_fails_at_load_in_one_line(tokenizer, tmp_path):
    d = _save(tokenizer, tmp_path / "g3n", "gemma3n_text", **SMALL, sliding_window=8,
              vocab_size_per_layer_input=len(tokenizer), num_kv_shared_layers=2,
              layer_types=["sliding_attention", "full_attention"] * 2,
              hidden_size_per_layer_input=16, altup_num_inputs=2, laurel_rank=8,
              activation_sparsity_pattern=[0.0] * 4)
    with pytest.raises(SteerlabError) as err:
        load_model(d, device="cpu")
    assert "\n" not in str(err.value) and "Gemma3nForCausalLM" in str(err.value)


def test_a_model_whose_cache_steerlab_cannot_carry_fails_at_load(tokenizer, tmp_path):
    d = _save(tokenizer, tmp_path / "rg", "recurrent_gemma", hidden_size=64,
              intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, lru_width=64, attention_window_size=8)
    with pytest.raises(SteerlabError) as err:
        load_model(d, device="cpu")
    assert "\n" not in str(err.value) and "RecurrentGemmaForCausalLM" in str(err.value)


def test_static_check_passes_on_a_sliding_window_model(tokenizer, tmp_path):
    model = load_model(build_family("gemma3", tmp_path / "g3", tokenizer), device="cpu")
    result = check_static(model, max_new_tokens=12)  # prompts longer than the window of 8
    assert result.ok, result.summary()
    assert [c[0] for c in result.checks] == ["tokens and metrics", "strength change",
                                             "persona change", "finished row refilled"]


def test_auto_takes_static_on_an_accelerator_only_once_proven(tokenizer, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    d = build_family("llama", tmp_path / "llama", tokenizer)
    meta = load_model(d, device="meta")  # not the CPU: the device rule applies
    assert static_refusal(meta) is None and not proven(meta)
    assert Engine.AUTO.resolve(meta, batching=True) is Engine.EAGER
    passed = StaticCheck("meta", "float32", (("tokens and metrics", True, ""),), 1.0)
    path = record(passed)
    assert path == proof_path("meta", torch.float32) and path.is_file()
    assert proven(meta) and Engine.AUTO.resolve(meta, batching=True) is Engine.STATIC
    assert Engine.AUTO.resolve(meta, stepwise=True) is Engine.EAGER
    assert proof_path("meta", torch.bfloat16) != path  # a pass holds for its dtype only
    failed = StaticCheck("meta", "float32", (("tokens and metrics", False, "row 0"),), 1.0)
    assert record(failed) is None and not path.exists()
    assert Engine.AUTO.resolve(meta, batching=True) is Engine.EAGER
    cpu = load_model(d, device="cpu")
    assert proven(cpu) and Engine.AUTO.resolve(cpu, batching=True) is Engine.STATIC


def test_serve_refuses_static_for_a_cache_it_cannot_hold_and_auto_serves_eager(
        qwen3_next_dir):
    from steerlab.serving.server import make_server

    model = load_model(qwen3_next_dir, device="cpu")
    with pytest.raises(SteerlabError, match="linear_attention"):
        make_server(model, port=0, engine="static", max_context=256)
    srv = make_server(model, port=0, max_context=256)  # the default engine, auto
    try:
        assert srv.engine == "eager"
    finally:
        srv.server_close()
