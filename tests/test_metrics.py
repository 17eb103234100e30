"""Metrics against torch.distributions references; the logit lens against HF hidden states."""

from __future__ import annotations

import pytest
import torch

from steerlab.chat import think_end_marker
from steerlab.lens import lens_metrics, logit_lens
from steerlab.metrics import (
    entropy,
    section_averages,
    split_sections,
    token_metrics,
    top_k_mass,
)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_entropy_and_top_k_mass_match_categorical(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2000, generator=g) * scale
    ref = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(entropy(logits), ref.entropy(), atol=1e-5, rtol=0)
    for k in (1, 5, 50):
        mass = ref.probs.sort(-1, descending=True).values[:, :k].sum(-1)
        torch.testing.assert_close(top_k_mass(logits, k), mass, atol=1e-5, rtol=0)
        ent, m = token_metrics(logits, k)
        torch.testing.assert_close(ent, ref.entropy(), atol=1e-5, rtol=0)
        torch.testing.assert_close(m, mass, atol=1e-5, rtol=0)


def test_metrics_of_half_precision_logits_are_float32():
    logits = torch.randn(3, 100).to(torch.bfloat16)
    assert entropy(logits).dtype == torch.float32
    assert top_k_mass(logits, 200).allclose(torch.ones(3))  # k beyond vocab: all the mass


def test_section_split_with_and_without_think_end(tokenizer):
    marker = think_end_marker(tokenizer)
    m = len(marker)
    tokens = [11, 12, 13, *marker, 21, 22]
    s = split_sections(tokens, marker)
    assert s.think_end_position == 3 and s.n_thinking == 3 and s.n_output == 2
    assert tokens[s.thinking] == [11, 12, 13] and tokens[s.output] == [21, 22]
    values = [1.0, 2.0, 3.0, *[9.0] * m, 5.0, 7.0]
    avg = section_averages(values, s, "entropy")
    assert avg["avg_entropy_thinking"] == pytest.approx(2.0)
    assert avg["avg_entropy_output"] == pytest.approx(6.0)
    assert avg["avg_entropy"] == pytest.approx(sum(values) / len(values))

    none = split_sections([5, 6, 7], marker)
    assert none.think_end_position is None and none.n_thinking == 0 and none.n_output == 3
    avg = section_averages([1.0, 2.0, 3.0], none, "top_k_mass")
    assert avg == {"avg_top_k_mass_thinking": None, "avg_top_k_mass_output": 2.0,
                   "avg_top_k_mass": 2.0}

    first = split_sections([*marker, 4], marker)  # empty thinking
    assert first.think_end_position == 0 and first.n_thinking == 0 and first.n_output == 1
    assert section_averages([0.0] * m + [1.0], first, "e")["avg_e_thinking"] is None
    empty = split_sections([], marker)
    assert section_averages([], empty, "e") == dict.fromkeys(
        ("avg_e_thinking", "avg_e_output", "avg_e"))


def test_logit_lens_matches_hf_hidden_states(tiny_model, tokenizer):
    ids = torch.tensor(tokenizer("The cat sat on the mat.")["input_ids"])
    hf = tiny_model.original_model
    with torch.inference_mode():
        out = hf(input_ids=ids[None], output_hidden_states=True)
        ent, mass = logit_lens(tiny_model, ids, k=5)
        n = tiny_model.cfg.n_layers
        assert ent.shape == (n, len(ids))
        # HF hidden_states[L + 1] is resid_post[L] (the last one already normed).
        for layer in range(n - 1):
            h = out.hidden_states[layer + 1][0]
            ref = torch.distributions.Categorical(logits=hf.lm_head(hf.model.norm(h)))
            torch.testing.assert_close(ent[layer], ref.entropy(), atol=1e-5, rtol=0)
        own = torch.distributions.Categorical(logits=out.logits[0].float())
        torch.testing.assert_close(ent[-1], own.entropy(), atol=1e-5, rtol=0)
        torch.testing.assert_close(mass[-1], top_k_mass(out.logits[0], 5), atol=1e-5, rtol=0)


def test_lens_chunking_does_not_change_results(tiny_model):
    resid = torch.randn(3, 7, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    whole = lens_metrics(tiny_model, resid, 5)
    tiny = lens_metrics(tiny_model, resid, 5, max_elements=1)  # one row per chunk
    # Chunking changes the matmul shapes and so the float32 summation order: entropies (up to
    # ln |V| ~ 10.8 nats) and masses move by a few ulps, i.e. ~1e-6 relative; 1e-5 is 10x that.
    for a, b in zip(whole, tiny, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
