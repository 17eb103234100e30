"""Steering hooks: alpha = 0 is bit-identical, exact additions, per-row strengths, positions."""

from __future__ import annotations

import pytest
import torch

from steerlab.base.errors import SteerlabError
from steerlab.generation.generator import generate
from steerlab.model.hooks import decoder_layers
from steerlab.steering.intervention import steer
from steerlab.steering.monitoring import monitor
from steerlab.steering.vector import SteeringVector

PROMPTS = [[1, 28, 42, 99, 7], [1, 500, 17], [1, 3, 4, 5, 6, 8, 9]]


@pytest.fixture(scope="module")
def vector():
    g = torch.Generator().manual_seed(0)
    return SteeringVector(torch.randn(3, 64, generator=g), (0, 1, 2))


def logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]))


def hidden(model, ids):
    with torch.inference_mode():
        return model.original_model(torch.tensor([ids]), output_hidden_states=True).hidden_states


def no_hooks(model):
    return all(not b._forward_hooks for b in decoder_layers(model))


def test_alpha_zero_is_bit_identical(tiny_model, vector):
    ids = PROMPTS[2]
    base = logits(tiny_model, ids)
    with steer(tiny_model, vector, 0.0, units="raw"):
        assert torch.equal(logits(tiny_model, ids), base)
    with steer(tiny_model, vector, torch.zeros(1), units="raw"):
        assert torch.equal(logits(tiny_model, ids), base)
    with steer(tiny_model, vector, 1.0, units="raw"):
        assert not torch.equal(logits(tiny_model, ids), base)
    assert no_hooks(tiny_model)


def test_adds_alpha_times_vector_at_resid_post(tiny_model, vector):
    from steerlab.extraction.capture import capture_positions

    ids = PROMPTS[0]
    pos = list(range(len(ids)))

    def resid(layer):  # hooks registered after steer's see the steered residual
        return torch.cat([capture_positions(tiny_model, [ids], [p], [layer]).at for p in pos])

    base0, base1 = resid(0), resid(1)
    with steer(tiny_model, vector, 2.5, layers=[1], units="raw"):
        got0, got1 = resid(0), resid(1)
    assert torch.equal(got0, base0)
    want = (2.5 * vector.direction(1)).expand_as(base1[:, 0])
    # (h + d) - h in float32 loses up to ~eps * |h| per element: the tolerance scales with |h|
    tol = 4 * torch.finfo(torch.float32).eps * float(base1.abs().max() + want.abs().max())
    torch.testing.assert_close(got1[:, 0] - base1[:, 0], want, atol=tol, rtol=0)


def test_per_row_strengths_equal_separate_runs(tiny_model, vector):
    alphas = [0.0, 1.5, -3.0]
    ids = PROMPTS[0]
    seen = []
    with steer(tiny_model, vector, torch.tensor(alphas), layers=[0, 2], units="raw"):
        gen = generate(tiny_model, [ids] * 3, max_new_tokens=6,
                       observer=lambda s, lg, a: seen.append(lg.clone()))
    for row, a in enumerate(alphas):
        one = []
        with steer(tiny_model, vector, a, layers=[0, 2], units="raw"):
            single = generate(tiny_model, [ids], max_new_tokens=6,
                              observer=lambda s, lg, a, one=one: one.append(lg.clone()))
        assert gen.tokens[row] == single.tokens[0]
        for step in range(len(one)):
            # the same rows batched with others: padding changes float32 reduction order,
            # so logits agree to ~1e-6 relative; 1e-4 of the logits' scale is far above that
            scale = float(one[step][0].abs().max())
            torch.testing.assert_close(seen[step][row], one[step][0], atol=1e-4 * scale,
                                       rtol=1e-4)
    with pytest.raises(SteerlabError, match="rows"), \
            steer(tiny_model, vector, torch.ones(2), units="raw"):
        logits(tiny_model, ids)
    assert no_hooks(tiny_model)


def test_generated_and_output_positions(tiny_model, vector):
    def run(**kw):
        steps = []
        with steer(tiny_model, vector, 3.0, **kw) if kw else torch.inference_mode():
            gen = generate(tiny_model, PROMPTS, max_new_tokens=5, think_marker=kw.pop("m", ()),
                           observer=lambda s, lg, a: steps.append(lg.clone()))
        return gen, steps

    base, base_steps = run()
    _, gen_steps = run(positions="generated")
    assert torch.equal(gen_steps[0], base_steps[0])  # prompt pass untouched
    assert not torch.allclose(gen_steps[1], base_steps[1])
    _, all_steps = run(positions="all")
    assert not torch.allclose(all_steps[0], base_steps[0])
    # without a thinking marker every generated token is output
    _, out_steps = run(positions="output")
    assert all(torch.equal(a, b) for a, b in zip(out_steps, gen_steps, strict=True))
    # with a marker that never appears nothing is output, so nothing is steered
    marker = [49151, 49150]
    steps = []
    with steer(tiny_model, vector, 3.0, positions="output", units="raw"):
        gen = generate(tiny_model, PROMPTS, max_new_tokens=5, think_marker=marker,
                       observer=lambda s, lg, a: steps.append(lg.clone()))
    ref = generate(tiny_model, PROMPTS, max_new_tokens=5, think_marker=marker)
    assert gen.tokens == ref.tokens
    # plain forward: no effect
    with steer(tiny_model, vector, 3.0, positions="generated", units="raw"):
        assert torch.equal(logits(tiny_model, PROMPTS[1]), logits(tiny_model, PROMPTS[1]))
    assert no_hooks(tiny_model)


def test_hooks_removed_on_error_and_bad_input(tiny_model, vector):
    with pytest.raises(RuntimeError), steer(tiny_model, vector, 1.0, units="raw"):
        raise RuntimeError("boom")
    assert no_hooks(tiny_model)
    with pytest.raises(SteerlabError, match="positions"), steer(tiny_model, vector, 1.0,
                                                               positions="prompt", units="raw"):
        pass
    with pytest.raises(SteerlabError, match="d_model"), steer(
            tiny_model, SteeringVector(torch.ones(1, 8), (0,)), 1.0, units="raw"):
        pass
    with pytest.raises(SteerlabError, match="no layer"), steer(tiny_model, vector.select([0]),
                                                               1.0, layers=[1], units="raw"):
        pass


def test_monitor_records_projection_per_token(tiny_model, vector):
    ids = PROMPTS[1]
    with monitor(tiny_model, vector, layers=[1]) as mon:
        gen = generate(tiny_model, [ids, PROMPTS[0]], max_new_tokens=4)
    trace = mon.trace(1)
    assert [len(t) for t in gen.tokens] == [4, 4] and trace.shape == (2, 4)
    unit = vector.direction(1) / vector.direction(1).norm()
    # a projection of a cached decode step vs a full forward: float32 summation order only,
    # ~1e-6 of |h|; the tolerance is 1e-4 of the residual's norm
    h0 = hidden(tiny_model, ids)[2][0, -1]
    tol = 1e-4 * float(h0.norm())
    torch.testing.assert_close(trace[0, 0], h0 @ unit, atol=tol, rtol=1e-4)
    full = ids + gen.tokens[0][:2]
    torch.testing.assert_close(trace[0, 2], hidden(tiny_model, full)[2][0, -1] @ unit,
                               atol=tol, rtol=1e-4)
    assert no_hooks(tiny_model)


def test_monitor_sees_the_steered_residual_during_generation(tiny_model, vector):
    ids = PROMPTS[1]
    with monitor(tiny_model, vector, layers=[1]) as plain:
        generate(tiny_model, [ids], max_new_tokens=2)
    with steer(tiny_model, vector, 2.0, layers=[1], units="raw"), \
            monitor(tiny_model, vector, layers=[1]) as steered:
        generate(tiny_model, [ids], max_new_tokens=2)
    # the prompt pass: the same residual before layer 1's output, plus 2 v at layer 1
    shift = steered.trace(1)[0, 0] - plain.trace(1)[0, 0]
    want = 2.0 * float(vector.direction(1).norm())
    torch.testing.assert_close(shift, torch.tensor(want), rtol=1e-4, atol=1e-4)
