"""Shared fixtures: a tiny random Llama (fast unit tests) and the embedded model (integration)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def run_cli(*args: str) -> int:
    """The real ``steerlab`` entry point in-process with ``args``; its exit code."""
    import sys

    from steerlab.cli import main

    old = sys.argv
    sys.argv = ["steerlab", *args]
    try:
        main()
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = old
    return 0


@pytest.fixture(scope="session")
def embedded_dir():
    """The converted embedded model directory (converted once per cache)."""
    from steerlab.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    """The embedded SmolLM2 tokenizer (ChatML template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tiny_hf(tokenizer, n_layers: int = 3, seed: int = 0):
    """A tiny random HF Llama (d_model 64) with the real tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def make_tiny_model(tokenizer, n_layers: int = 3, seed: int = 0):
    """A tiny random Llama (d_model 64) booted as a bridge offline with the real tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = make_tiny_hf(tokenizer, n_layers, seed)
    bridge = TransformerBridge.boot_transformers(
        "tiny-llama", hf_model=hf, tokenizer=tokenizer, device="cpu"
    )
    return bridge.eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """Session-wide tiny random Llama bridge (3 layers, d_model 64). Do not leave hooks on it."""
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def embedded_model():
    """The real embedded SmolLM2-135M-Instruct bridge, loaded once per test session."""
    from steerlab.models import load_model

    return load_model("embedded", device="cpu")
