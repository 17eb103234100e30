"""Norm units: the residual norms against HF hidden states, the push of a norm-unit strength,
norm-preserving steering, stored norms carried from capture to the vector."""

from __future__ import annotations

import pytest
import torch

from steerlab.extraction.capture import capture_positions
from steerlab.model.templates import encode_chat
from steerlab.steering.intervention import Steering, steer
from steerlab.steering.norms import neutral_prompts, residual_norms
from steerlab.steering.vector import SteeringVector

EPS = torch.finfo(torch.float32).eps
IDS = [1, 28, 42, 99, 7, 300, 12]


@pytest.fixture(scope="module")
def vector():
    g = torch.Generator().manual_seed(1)
    return SteeringVector(torch.randn(3, 64, generator=g), (0, 1, 2))


def resid(model, layer):
    return torch.cat([capture_positions(model, [IDS], [p], [layer]).at[:, 0]
                      for p in range(len(IDS))])


def test_residual_norms_are_the_median_of_hf_hidden_state_norms(tiny_model):
    texts = neutral_prompts(5)
    # layers 0 and 1 of 3: HF's last hidden state has the final norm applied
    got = residual_norms(tiny_model, [0, 1], texts)
    tok = tiny_model.tokenizer
    norms = {0: [], 1: []}
    for t in texts:  # one prompt at a time: no padding; the first token is left out
        ids = torch.tensor([encode_chat(tok, t)])
        with torch.inference_mode():
            hs = tiny_model.original_model(ids, output_hidden_states=True).hidden_states
        for layer in norms:
            norms[layer].append(hs[layer + 1][0, 1:].float().norm(dim=-1))
    for layer, parts in norms.items():
        want = float(torch.cat(parts).median())
        # batched with left padding: float32 reductions in another order (~1e-6 relative)
        assert got[layer] == pytest.approx(want, rel=1e-4)
    # padding and each row's first token are excluded: one prompt alone gives its own median
    alone = residual_norms(tiny_model, [0], texts[:1])[0]
    hs = tiny_model.original_model(torch.tensor([encode_chat(tok, texts[0])]),
                                   output_hidden_states=True).hidden_states
    assert alone == pytest.approx(float(hs[1][0, 1:].float().norm(dim=-1).median()), rel=1e-5)


def test_a_norm_unit_strength_adds_that_fraction_of_the_residual_norm(tiny_model, vector):
    norms = residual_norms(tiny_model, [1])
    base = resid(tiny_model, 1)
    with steer(tiny_model, vector, 0.25, layers=[1], units="norm"):
        got = resid(tiny_model, 1)
    delta = got - base
    want = 0.25 * norms[1] * vector.direction(1) / vector.direction(1).norm()
    tol = 8 * EPS * float(base.abs().max() + want.abs().max())
    torch.testing.assert_close(delta, want.expand_as(delta), atol=tol, rtol=0)
    # norms stored with the vector are used as they are (no measurement)
    stored = vector.with_resid_norms({1: 10.0})
    s = Steering.create(tiny_model, stored, 0.5, layers=[1], units="norm")
    assert s.scale == pytest.approx((10.0 / float(vector.direction(1).norm()),), rel=1e-6)
    with s.apply(tiny_model):
        got = resid(tiny_model, 1)
    assert float((got - base).norm(dim=-1).mean()) == pytest.approx(5.0, rel=1e-4)


def test_norm_preserving_steering_turns_the_residual_without_growing_it(tiny_model, vector):
    base = resid(tiny_model, 2)
    with steer(tiny_model, vector, 0.8, layers=[2], units="norm", preserve_norm=True):
        got = resid(tiny_model, 2)
    torch.testing.assert_close(got.norm(dim=-1), base.norm(dim=-1), rtol=1e-5, atol=0)
    cos_before = torch.nn.functional.cosine_similarity(base, vector.direction(2)[None], dim=-1)
    cos_after = torch.nn.functional.cosine_similarity(got, vector.direction(2)[None], dim=-1)
    assert bool((cos_after > cos_before).all())
    # alpha 0 rows are untouched bit for bit, even with preserve_norm
    with steer(tiny_model, vector, torch.tensor([0.0]), layers=[2], preserve_norm=True,
               units="raw"):
        assert torch.equal(resid(tiny_model, 2), base)


def test_without_removes_the_shared_component(vector):
    g = torch.Generator().manual_seed(2)
    shared = SteeringVector(torch.randn(3, 64, generator=g), (0, 1, 2))
    out = vector.without(shared)
    dots = (out.directions * shared.directions).sum(-1) / shared.norms()
    assert float(dots.abs().max()) < 1e-4 * float(vector.norms().max())
    # what is removed is exactly the projection
    unit = shared.directions / shared.norms()[:, None]
    proj = (vector.directions * unit).sum(-1, keepdim=True) * unit
    torch.testing.assert_close(out.directions + proj, vector.directions)


def test_vector_files_keep_their_norms(tmp_path, vector):
    v = vector.with_resid_norms({0: 3.5, 2: 7.25})
    back = SteeringVector.load(v.save(tmp_path / "v"))
    assert back.resid_norm(0) == 3.5 and back.resid_norm(2) == 7.25 and back.resid_norm(1) is None


def test_default_norms_are_measured_once_per_model_and_a_server_measures_first(
        tiny_model, tmp_path, monkeypatch):
    """The default measurement is kept beside the model: a second call runs no forward pass
    (the measuring function is made to fail), and ``make_server`` with a vectors folder
    measures every layer before a request thread could need them."""
    import steerlab.steering.norms as norms_module
    from steerlab.model.state import state
    from steerlab.serving.server import make_server

    state(tiny_model).norms.clear()
    first = residual_norms(tiny_model, [0, 2])
    explicit = residual_norms(tiny_model, [0, 2], neutral_prompts())
    assert first == explicit  # the kept values are the default measurement's

    def no_forward(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(norms_module, "_measure", no_forward)
    assert residual_norms(tiny_model, [2, 0]) == {2: first[2], 0: first[0]}
    monkeypatch.undo()
    state(tiny_model).norms.clear()
    server = make_server(tiny_model, port=0, vectors_dir=tmp_path, max_context=64,
                         engine="eager")
    server.server_close()
    assert sorted(state(tiny_model).norms) == list(range(tiny_model.cfg.n_layers))
