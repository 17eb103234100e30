"""The static engine against the eager one: same greedy tokens and metrics (1e-4), the same
rules (left padding, early stops, steering positions, per-row strengths, thinking), no
rebuilt step when only strengths change, no host reads inside a decode step, and a step over
the occupied slots' bucket only (one row for a lone request in slot 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from steerlab.base.errors import SteerlabError
from steerlab.generation.cache import captures
from steerlab.generation.decode import StepProgram
from steerlab.generation.engine import Engine, bucket_batch, bucket_capacity
from steerlab.generation.generator import generate, generate_with_metrics
from steerlab.generation.host_syncs import count_host_syncs
from steerlab.generation.slots import SlotBatch
from steerlab.steering.intervention import Steering
from steerlab.steering.vector import SteeringVector

# left-padded: three lengths; rows 1 and 2 differ by one token only
PROMPTS = [[1, 28, 42, 99, 7, 12, 13], [1, 500, 17], [1, 500, 18], [1, 3, 4, 5, 6]]
# Metrics are float32 reductions over the vocabulary; the engines differ in attention length
# (the static cache attends over its whole capacity with masked slots) and in summation
# order, which moves them by ~1e-6 on these logits. 1e-4 is the bound.
TOL = 1e-4


@pytest.fixture(scope="module")
def model(tokenizer):
    from steerlab.model.attention import use_hf_mixers

    bridge = make_tiny_model(tokenizer, n_layers=3, seed=1)
    use_hf_mixers(bridge.original_model, "sdpa")
    return bridge


@pytest.fixture(scope="module")
def vector():
    g = torch.Generator().manual_seed(3)
    return SteeringVector(torch.randn(3, 64, generator=g), (0, 1, 2))


def both(model, prompts=PROMPTS, **kw):
    eager = generate_with_metrics(model, prompts, engine="eager", **kw)
    static = generate_with_metrics(model, prompts, engine="static", **kw)
    return eager, static


def assert_same(eager, static):
    for a, b in zip(eager, static, strict=True):
        assert a.tokens == b.tokens
        assert a.stopped == b.stopped
        for name in ("entropy", "top_k_mass", "logprob", "lens_entropy", "lens_top_k_mass"):
            x, y = getattr(a, name), getattr(b, name)
            if x is None:
                assert y is None
                continue
            assert x.shape == y.shape
            np.testing.assert_allclose(y, x, atol=TOL, rtol=0, err_msg=name)


def test_same_tokens_and_metrics_with_lens(model):
    eager, static = both(model, max_new_tokens=12, lens=True, k=5)
    assert_same(eager, static)
    assert eager[0].lens_entropy.shape == (12, 3)
    # the chosen-token log-prob is that of the eager logits' distribution
    assert all(np.all(r.logprob <= 0) for r in eager)


def test_rows_finishing_early_and_stop_ids(model):
    plain = generate(model, PROMPTS, max_new_tokens=14, engine="eager").tokens
    stops = {plain[0][4], plain[3][8]}  # rows end at different steps
    eager, static = both(model, max_new_tokens=14, stop_ids=stops)
    assert_same(eager, static)
    assert eager[0].stopped and len(eager[0].tokens) <= 4
    assert any(not r.stopped for r in eager) or len({len(r.tokens) for r in eager}) > 1


@pytest.mark.parametrize("positions", ["all", "generated", "output"])
def test_steering_positions_and_per_row_strengths(model, vector, positions):
    plain = generate(model, PROMPTS, max_new_tokens=10, engine="eager").tokens
    marker = plain[1][2:4]  # a "</think>" that row 1 produces, so "output" starts mid-reply
    alphas = (0.0, 3.0, -2.0, 1.5)
    s = Steering.create(model, vector, alphas, layers=[1, 2], positions=positions, units="raw")
    with s.apply(model):
        eager, static = both(model, max_new_tokens=10, think_marker=marker)
    assert_same(eager, static)
    assert [r.tokens for r in eager] != plain or positions == "output"


def test_alpha_zero_is_the_unsteered_run(model, vector):
    base = generate_with_metrics(model, PROMPTS, max_new_tokens=8, engine="static")
    with Steering.create(model, vector, 0.0, layers=[1], units="raw").apply(model):
        zero = generate_with_metrics(model, PROMPTS, max_new_tokens=8, engine="static")
    for a, b in zip(base, zero, strict=True):
        assert a.tokens == b.tokens and np.array_equal(a.entropy, b.entropy)


def test_thinking_on_and_off(model):
    plain = generate(model, PROMPTS, max_new_tokens=10, engine="eager").tokens
    for marker in ((), tuple(plain[0][3:5])):
        eager, static = both(model, max_new_tokens=10, think_marker=marker)
        assert_same(eager, static)


def test_sampling_matches_per_row_seeds(model):
    eager, static = both(model, max_new_tokens=10, temperature=0.9, seed=[5, 6, 7, 8])
    assert_same(eager, static)
    alone = generate(model, PROMPTS[2:3], max_new_tokens=10, temperature=0.9, seed=[7],
                     engine="static").tokens[0]
    assert alone == static[2].tokens  # a row draws the same tokens in any batch


def test_on_token_stop_cuts_both_engines_at_the_same_step(model):
    def stopper(seen):
        def on_token(new):
            seen.append(new)
            return len(seen) == 5
        return on_token

    a, b = [], []
    eager = generate(model, PROMPTS, max_new_tokens=12, engine="eager", on_token=stopper(a))
    static = generate(model, PROMPTS, max_new_tokens=12, engine="static", on_token=stopper(b))
    assert a == b and len(a) == 5
    assert eager.tokens == static.tokens and all(len(t) == 5 for t in eager.tokens)
    assert eager.stopped == static.stopped


def test_strength_change_reuses_the_step(model, vector):
    def run(alpha):
        with Steering.create(model, vector, alpha, layers=[1], units="raw").apply(model):
            return generate(model, PROMPTS, max_new_tokens=6, engine="static").tokens

    run(1.0)
    before = captures(model)
    first, second = run(2.0), run(-4.0)
    assert captures(model) == before  # strengths are tensor values, not step structure
    assert first != second
    run((1.0, 2.0, 3.0, 4.0))  # per-row strengths: the same structure too
    assert captures(model) == before


def test_a_decode_step_reads_nothing_from_the_device(model, vector):
    settings = StepProgram(5, True, True, (7, 8), (2,), 0)
    batch = SlotBatch(model, 4, 128, settings)
    steerings = [Steering.create(model, vector, 2.0, layers=[1], positions="generated",
                                 units="raw")]
    with batch.running():
        batch.admit([0, 1], PROMPTS[:2], limits=[8, 8], temps=[0.0, 0.7], seeds=[1, 2],
                    steerings=[steerings, ()])
        batch.step()
        with count_host_syncs() as syncs:
            for _ in range(3):
                batch.step()
    assert syncs.count == 0, syncs.ops


def test_counter_sees_host_reads():
    x = torch.ones(3)
    with count_host_syncs() as syncs:
        bool(x.any())
        x.tolist()
    assert syncs.count == 2


def test_slot_admitted_later_decodes_as_if_alone(model):
    settings = StepProgram(0, False, False, (), (2,), 0)
    alone = generate(model, PROMPTS[3:4], max_new_tokens=6, engine="eager").tokens[0]
    batch = SlotBatch(model, 2, 128, settings)
    with batch.running():
        batch.admit([0], PROMPTS[:1], limits=[20], temps=[0.0], seeds=[0])
        for _ in range(4):
            batch.step()
        batch.admit([1], PROMPTS[3:4], limits=[6], temps=[0.0], seeds=[0])
        for _ in range(5):
            batch.step()
        got = batch.st.tokens[1, : int(batch.st.n_out[1])].tolist()
    assert got == alone


def test_buckets_and_choices(model):
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert [bucket_capacity(n) for n in (1, 128, 129, 1000)] == [128, 128, 256, 1024]
    auto = Engine.parse("auto", field="engine")
    assert auto.resolve(model) is Engine.EAGER  # CPU
    assert auto.resolve(model, batching=True) is Engine.STATIC  # a server batches on the CPU
    assert auto.resolve(model, batching=True, stepwise=True) is Engine.EAGER
    assert Engine.STATIC.resolve(model, stepwise=True) is Engine.STATIC  # asked for: as is
    with pytest.raises(SteerlabError, match="engine"):
        generate(model, PROMPTS, max_new_tokens=2, engine="fast")


def test_static_needs_hf_attention(tokenizer):
    bridge_eager = make_tiny_model(tokenizer, n_layers=2)
    with pytest.raises(SteerlabError, match="attn_implementation"):
        generate(bridge_eager, PROMPTS, max_new_tokens=2, engine="static")
    assert generate(bridge_eager, PROMPTS, max_new_tokens=2).tokens  # auto: eager
    assert Engine.AUTO.resolve(bridge_eager, batching=True) is Engine.EAGER


def test_a_step_runs_over_the_occupied_slots_bucket(model):
    """A lone row in slot 0 steps over one row; a row in slot 1 makes it two; releasing it
    shrinks the step back; tokens equal each prompt decoded alone (eager)."""
    settings = StepProgram(0, False, False, (), (2,), 0)
    alone = [generate(model, [p], max_new_tokens=12, engine="eager").tokens[0]
             for p in PROMPTS[:3]]
    seen: list[int] = []
    handle = model.original_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True)
    batch = SlotBatch(model, 4, 128, settings)
    try:
        with batch.running():
            batch.admit([0], PROMPTS[:1], limits=[12], temps=[0.0], seeds=[0])
            seen.clear()
            for _ in range(3):
                batch.step()
            assert seen == [1, 1, 1]
            batch.admit([1], PROMPTS[1:2], limits=[12], temps=[0.0], seeds=[0])
            seen.clear()
            for _ in range(3):
                batch.step()
            assert seen == [2, 2, 2]
            batch.admit([2], PROMPTS[2:3], limits=[12], temps=[0.0], seeds=[0])
            seen.clear()
            batch.step()
            assert seen == [4]  # the bucket of 3 rows
            got_1 = batch.st.tokens[1, : int(batch.st.n_out[1])].tolist()
            batch.release([1, 2])
            seen.clear()
            for _ in range(12):
                batch.step()
            assert set(seen) == {1}
            got_0 = batch.st.tokens[0, : int(batch.st.n_out[0])].tolist()
    finally:
        handle.remove()
    assert got_0 == alone[0]
    assert got_1 == alone[1][: len(got_1)] and len(got_1) == 5
