"""Metrics against torch.distributions references; the logit lens against HF hidden states."""

from __future__ import annotations

import pytest
import torch
from conftest import matmul_delta, metric_tolerances

from steerlab.generation.lens import lens_logits, lens_metrics, logit_lens
from steerlab.generation.metrics import (
    entropy,
    section_averages,
    split_sections,
    token_metrics,
    top_k_mass,
)
from steerlab.model.templates import think_end_marker


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_entropy_and_top_k_mass_match_categorical(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2000, generator=g) * scale
    ref = torch.distributions.Categorical(logits=logits)
    for k in (1, 5, 50):
        h_tol, m_tol = metric_tolerances(logits, k)  # the same logits: two formulas, no matmul
        torch.testing.assert_close(entropy(logits), ref.entropy(), **h_tol)
        mass = ref.probs.sort(-1, descending=True).values[:, :k].sum(-1)
        torch.testing.assert_close(top_k_mass(logits, k), mass, **m_tol)
        ent, m = token_metrics(logits, k)
        torch.testing.assert_close(ent, ref.entropy(), **h_tol)
        torch.testing.assert_close(m, mass, **m_tol)


def test_metrics_of_half_precision_logits_are_float32():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert entropy(logits).dtype == torch.float32
    _, m_tol = metric_tolerances(logits.float(), k=100)
    # k beyond vocab: all the mass, up to the float32 rounding of a 100-term sum
    torch.testing.assert_close(top_k_mass(logits, 200), torch.ones(3), **m_tol)


def test_section_split_with_and_without_think_end(tokenizer):
    marker = think_end_marker(tokenizer)
    m = len(marker)
    tokens = [11, 12, 13, *marker, 21, 22]
    s = split_sections(tokens, marker)
    assert s.think_end_position == 3 and s.n_thinking == 3 and s.n_output == 2
    assert tokens[s.thinking] == [11, 12, 13] and tokens[s.output] == [21, 22]
    values = [1.0, 2.0, 3.0, *[9.0] * m, 5.0, 7.0]
    avg = section_averages(values, s, "entropy")
    # means of a few small integers: exact in binary floating point whatever the summation
    # order, except the last (a division by 5 + m), hence pytest.approx's relative 1e-6
    assert avg["avg_entropy_thinking"] == 2.0 and avg["avg_entropy_output"] == 6.0
    assert avg["avg_entropy"] == pytest.approx(sum(values) / len(values))

    none = split_sections([5, 6, 7], marker)
    assert none.think_end_position is None and none.n_thinking == 0 and none.n_output == 3
    avg = section_averages([1.0, 2.0, 3.0], none, "top_k_mass")
    assert avg == {"avg_top_k_mass_thinking": None, "avg_top_k_mass_output": 2.0,
                   "avg_top_k_mass": 2.0}  # exact: 6 / 3

    first = split_sections([*marker, 4], marker)  # empty thinking
    assert first.think_end_position == 0 and first.n_thinking == 0 and first.n_output == 1
    assert section_averages([0.0] * m + [1.0], first, "e")["avg_e_thinking"] is None
    empty = split_sections([], marker)
    assert section_averages([], empty, "e") == dict.fromkeys(
        ("avg_e_thinking", "avg_e_output", "avg_e"))


def test_logit_lens_matches_hf_hidden_states(tiny_model, tokenizer):
    ids = torch.tensor(tokenizer("The cat sat on the mat.")["input_ids"])
    hf = tiny_model.original_model
    w = hf.lm_head.weight
    with torch.inference_mode():
        out = hf(input_ids=ids[None], output_hidden_states=True)
        ent, mass = logit_lens(tiny_model, ids, k=5)
        n = tiny_model.cfg.n_layers
        assert ent.shape == mass.shape == (n, len(ids))
        # HF hidden_states[L + 1] is resid_post[L] (the last one already normed). The lens
        # unembeds all layers' rows in one matmul, HF one layer's: other summation orders.
        for layer in range(n):
            if layer < n - 1:
                normed = hf.model.norm(out.hidden_states[layer + 1][0])
                logits = hf.lm_head(normed)
            else:
                normed, logits = out.hidden_states[-1][0], out.logits[0]
            h_tol, m_tol = metric_tolerances(logits, 5, matmul_delta(normed, w))
            ref = torch.distributions.Categorical(logits=logits.float())
            torch.testing.assert_close(ent[layer], ref.entropy(), **h_tol)
            # the masses of a random tiny model differ between layers by ~1% (its entropies
            # only by ~1e-5 of ln V): the mass is what pins the layer
            torch.testing.assert_close(mass[layer], top_k_mass(logits, 5), **m_tol)


def test_lens_chunking_does_not_change_results(tiny_model):
    resid = torch.randn(3, 7, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    whole = lens_metrics(tiny_model, resid, 5)
    tiny = lens_metrics(tiny_model, resid, 5, max_elements=1)  # one row per chunk
    # Chunking changes the matmul shapes, so the float32 summation order of every logit
    # (measured: entropies ~10.8 nats 9.5e-6 apart, masses 9e-7 relative); the tolerances
    # follow from the logits' magnitude and the dot products' length.
    with torch.inference_mode():
        normed = tiny_model.ln_final(resid)
        logits = lens_logits(tiny_model, resid)
    delta = matmul_delta(normed, tiny_model.original_model.lm_head.weight)
    h_tol, m_tol = metric_tolerances(logits, 5, delta)
    torch.testing.assert_close(whole[0], tiny[0], **h_tol)
    torch.testing.assert_close(whole[1], tiny[1], **m_tol)
