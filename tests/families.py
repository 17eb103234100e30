"""Tiny random-weight models of each architecture family steerlab is tested on.

Each family is a config (``FAMILIES``: HF ``model_type`` and the keyword arguments on top of
``COMMON``) built by :func:`build_family` into a folder with ``save_pretrained`` and the embedded
SmolLM2 tokenizer, so ``steerlab.load_model(folder)`` loads it as it would a hub checkpoint.
Every model is d_model 64, 4 layers, 4 query and 2 key/value heads; the families with a sliding
window get ``WINDOW`` = 8 tokens, shorter than the matrix's prompts, and 4 layers so Gemma-3,
OLMo-3 and Cohere-2 mix sliding and global layers as the real models do. The tests are
``tests/test_families.py``; ``docs/gen_models.py`` writes their outcomes to ``docs/models.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WINDOW = 8
N_LAYERS = 4

COMMON: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)

# family -> (display name, HF model_type, config keyword arguments on top of COMMON)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("Llama", "llama", {}),
    "qwen2": ("Qwen2", "qwen2", {}),
    "qwen3": ("Qwen3", "qwen3", dict(head_dim=16)),
    "qwen3_moe": ("Qwen3-MoE", "qwen3_moe", dict(head_dim=16, num_experts=4,
                                                 num_experts_per_tok=2,
                                                 moe_intermediate_size=32)),
    "mistral": ("Mistral (sliding window)", "mistral", dict(sliding_window=WINDOW)),
    "gemma": ("Gemma", "gemma", dict(head_dim=16)),
    # Gemma-2 caps logits at 30 and attention scores at 50, the size of a real model's; this
    # one's are ~1, so its caps are scaled down with them (else tanh is the identity here)
    "gemma2": ("Gemma-2 (sliding + global)", "gemma2",
               dict(head_dim=16, sliding_window=WINDOW, final_logit_softcapping=1.0,
                    attn_logit_softcapping=1.0)),
    "gemma3": ("Gemma-3 text (sliding + global)", "gemma3_text",
               dict(head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2)),
    "phi3": ("Phi-3", "phi3", {}),
    "olmo2": ("OLMo-2", "olmo2", {}),
    "olmo3": ("OLMo-3 (sliding + global)", "olmo3", dict(sliding_window=WINDOW)),
    "cohere2": ("Cohere-2 (sliding + global)", "cohere2", dict(sliding_window=WINDOW)),
    # Granite's multipliers at the sizes of granite-3 (1.0 in the config class would hide them)
    "granite": ("Granite", "granite", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                           attention_multiplier=0.0625, logits_scaling=8.0)),
    "gpt_oss": ("GPT-OSS (MoE, sliding + global)", "gpt_oss",
                dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=WINDOW,
                     # YaRN as gpt-oss ships it, its original context scaled down with ours
                     rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                          beta_fast=32.0, beta_slow=1.0,
                                          original_max_position_embeddings=16))),
    "gpt2": ("GPT-2", "gpt2", dict(n_embd=64, n_layer=N_LAYERS, n_head=4, n_positions=512)),
    "gpt_neox": ("GPT-NeoX", "gpt_neox", {}),
}

# GPT-2 names its sizes n_embd, n_layer, n_head, n_positions (given above) instead
_GPT2_DROPS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings"}

# family -> the file of tests/fixtures/chat_templates/ holding its real chat template (the
# families absent here ship no template of their own in the fixtures)
TEMPLATES = {
    "llama": "llama3", "qwen3": "qwen3", "qwen3_moe": "qwen3", "mistral": "mistral",
    "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "gpt_oss": "gpt_oss",
}
TEMPLATE_DIR = Path(__file__).parent / "fixtures" / "chat_templates"

# docs/models.md's columns, and the column of each test of tests/test_families.py (formatted
# with the test's parameters)
PATH_OF = {
    "test_loads_and_forward_equals_hf": "load",
    "test_greedy_generation_equals_hf": "{engine}",
    "test_metrics_equal_categorical_on_hf_logits": "{engine}",
    "test_capture_equals_hf_hidden_states": "capture",
    "test_steering_equals_a_plain_hook_on_hf": "steering",
    "test_capture_fit_steer": "steering",
    "test_lens_at_the_last_layer_is_the_model": "lens",
    "test_persona_template": "persona template",
    "test_thinking_switch": "thinking",
}
PATHS = ("load", "eager", "static", "capture", "steering", "lens", "persona template",
         "thinking")


def family_config(family: str, tokenizer: Any) -> Any:
    """The HF config of ``family`` with ``tokenizer``'s vocabulary and special tokens."""
    from transformers import AutoConfig

    _, model_type, extra = FAMILIES[family]
    kwargs = dict(COMMON, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if model_type == "gpt2":
        kwargs = {k: v for k, v in kwargs.items() if k not in _GPT2_DROPS}
    kwargs.update(extra)
    return AutoConfig.for_model(model_type, **kwargs)


def build_family(family: str, directory: Path, tokenizer: Any, seed: int = 0) -> Path:
    """Save a seeded random ``family`` model and ``tokenizer`` into ``directory``; return it."""
    from transformers import AutoModelForCausalLM

    config = family_config(family, tokenizer)
    # HF initialises from torch's global generator: seed it for these weights only
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
