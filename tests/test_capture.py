"""Divergence-point capture against HF hidden states, on the tiny and the embedded model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import assert_close_to_scale

from steerlab.base.errors import SteerlabError
from steerlab.extraction.capture import capture_pairs, capture_positions, tokenize_pair
from steerlab.model.hooks import decoder_layers


@dataclass(frozen=True)
class P:
    id: str
    prompt: str
    chosen: str
    rejected: str


PAIRS = [
    P("a", "How are you?", "Arr, I be fine, matey!", "I am fine, thank you."),
    P("b", "Name a colour.", "Blue as the briny deep, arr.", "Blue."),
    P("c", "What is 2+2?", "Four, ye landlubber!", "Four, of course. It is a simple sum."),
    P("d", "Say hi.", "Hello there, me hearty", "Hello there, friend"),
]


def _hf_hidden(model, ids):
    with torch.inference_mode():
        out = model.original_model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states


def test_tokenize_pair_finds_first_divergent_response_token(tokenizer):
    t = tokenize_pair(tokenizer, "Say hi.", "Hello there, me hearty", "Hello there, friend")
    assert t.chosen[: t.divergence] == t.rejected[: t.divergence]
    assert t.chosen[t.divergence] != t.rejected[t.divergence]
    assert t.response_start < t.divergence
    head = tokenizer.decode(t.chosen[t.response_start : t.divergence])
    assert head == "Hello there,"
    assert tokenizer.decode(t.chosen[t.response_start : t.chosen_end]) == "Hello there, me hearty"
    with pytest.raises(SteerlabError, match="same tokens"):
        tokenize_pair(tokenizer, "Hi", "Same.", "Same.", pair_id="x")


# A batch of pairs vs one unpadded sequence: padding and the batch change the matmul shapes, so
# reductions of <= 128 terms (d_mlp) may run in other orders, <= ~128 eps of each residual's
# scale (measured: bit-identical at the divergence, 1.2 eps for the span means).
TINY_EPS = 128


def test_capture_equals_hf_hidden_states_at_divergence(tiny_model):
    layers = [1, 0]  # hidden_states[n_layers] is after the final norm in HF
    acts = capture_pairs(tiny_model, PAIRS, layers, mean=True)
    assert acts.chosen.shape == (len(PAIRS), 2, 64)
    for i, t in enumerate(acts.tokens):
        for side, ids, end in (("chosen", t.chosen, t.chosen_end),
                               ("rejected", t.rejected, t.rejected_end)):
            hs = _hf_hidden(tiny_model, ids)
            got = getattr(acts, side)[i]
            got_mean = getattr(acts, side + "_mean")[i]
            for j, layer in enumerate(layers):
                want = hs[layer + 1][0, t.divergence]
                assert_close_to_scale(got[j], want, TINY_EPS)
                span = hs[layer + 1][0, t.response_start : end].mean(0)
                assert_close_to_scale(got_mean[j], span, TINY_EPS)


def test_resid_pre_and_mid_hooks(tiny_model):
    ids = [1, 5, 9, 13, 17, 21]
    mlp = tiny_model.original_model.model.layers[1].mlp
    mlp_out = {}
    handle = mlp.register_forward_hook(lambda m, a, out: mlp_out.setdefault(1, out))
    try:
        hs = _hf_hidden(tiny_model, ids)
    finally:
        handle.remove()
    pre = capture_positions(tiny_model, [ids], [4], [2], hook="resid_pre").at
    assert_close_to_scale(pre[0, 0], hs[2][0, 4], TINY_EPS)
    mid = capture_positions(tiny_model, [ids], [4], [1], hook="resid_mid").at
    # HF's layer output is resid_mid + mlp_out: the reference is the difference (one more
    # rounding, <= eps of the scale)
    assert mid.shape == (1, 1, 64)
    assert_close_to_scale(mid[0, 0], hs[2][0, 4] - mlp_out[1][0, 4], TINY_EPS)
    with pytest.raises(SteerlabError, match="hook"):
        capture_positions(tiny_model, [ids], [4], [1], hook="attn_out")
    with pytest.raises(SteerlabError, match=r"got layer 7; expected 0\.\.2"):
        capture_positions(tiny_model, [ids], [4], [7])
    with pytest.raises(SteerlabError, match=r"got layer -1"):  # negative: refused, not wrapped
        capture_positions(tiny_model, [ids], [4], [-1])


def test_forward_stops_after_last_needed_layer(tiny_model):
    calls = []
    blocks = decoder_layers(tiny_model)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, b in enumerate(blocks)]
    try:
        capture_positions(tiny_model, [[1, 2, 3]], [2], [0])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]
    assert all(not b._forward_hooks for b in blocks)


@pytest.mark.slow
def test_embedded_capture_equals_hf_hidden_states(embedded_model):
    layers = [3, 10, 20]
    acts = capture_pairs(embedded_model, PAIRS[:3], layers)
    for i, t in enumerate(acts.tokens):
        hs = _hf_hidden(embedded_model, t.rejected)
        for j, layer in enumerate(layers):
            want = hs[layer + 1][0, t.divergence]
            # a left-padded batch vs one unpadded sequence: eager attention agrees exactly
            # (measured 0), the fused sdpa kernel sums padded rows in another order (measured
            # up to 1.7 eps of the residual's largest entry); 32 eps leaves ~18x headroom
            assert_close_to_scale(acts.rejected[i, j], want, 32)
