"""Reference projections stored with a vector and ``cap``/``set`` bounds given as their
percentiles (issue 28, item 1); the monitor's projections before and after the interventions
(issue 28, item 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_fitters import planted, write_planted_file

from steerlab.base.errors import SteerlabError
from steerlab.extraction.fitters import fit_vector
from steerlab.extraction.store import ActivationFile, Site
from steerlab.generation.generator import generate
from steerlab.serving.requests import RequestError, parse_steering
from steerlab.serving.shelf import VectorShelf
from steerlab.steering.intervention import Steering
from steerlab.steering.monitoring import monitor
from steerlab.steering.reference import reference_value, with_reference
from steerlab.steering.vector import SteeringVector, random_like

PROMPTS = [[1, 28, 42, 99, 7], [1, 500, 17]]


@pytest.fixture(scope="module")
def vec(tiny_model):
    g = torch.Generator().manual_seed(3)
    n = tiny_model.cfg.n_layers
    return SteeringVector(torch.randn(n, tiny_model.cfg.d_model, generator=g), tuple(range(n)))


@pytest.fixture(scope="module")
def hf_attention_model(tokenizer, tmp_path_factory):
    """A tiny Llama with HF's attention (what both engines run; tiny_model is eager)."""
    from families import build_family

    from steerlab.model.loading import load_model

    return load_model(build_family("llama", tmp_path_factory.mktemp("mon"), tokenizer),
                      device="cpu")


@pytest.fixture(scope="module")
def draws():
    rng = np.random.default_rng(0)
    return {0: rng.normal(2.0, 1.5, 500), 1: rng.standard_t(3, 37), 2: rng.uniform(-4, 1, 11)}


def test_reference_percentiles_equal_numpy(vec, draws):
    v = with_reference(vec, draws, "seeded draws")
    for layer, x in draws.items():
        for q in (0, 2.5, 25, 50, 90.25, 100):
            # np.percentile is linear between order statistics and so is the interpolation
            # between stored integer percentiles, except inside a segment: within one step
            want = np.percentile(x, q)
            lo, hi = np.percentile(x, math.floor(q)), np.percentile(x, math.ceil(q))
            got = reference_value(v, layer, q)
            assert min(lo, hi) - 1e-12 <= got <= max(lo, hi) + 1e-12
            if q == int(q):
                assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert v.provenance.reference["n"] == {"0": 500, "1": 37, "2": 11}


def test_percentile_bounds_resolve_per_layer_in_raw_units(tiny_model, vec, draws):
    v = with_reference(vec, draws, "seeded draws")
    cap = Steering.create(tiny_model, v, op="cap", bounds=("25%", "75%"), layers=[0, 2])
    assert cap.lo == pytest.approx((np.percentile(draws[0], 25), np.percentile(draws[2], 25)))
    assert cap.hi == pytest.approx((np.percentile(draws[0], 75), np.percentile(draws[2], 75)))
    # a percentile beside a number in norm units: each side resolved on its own
    mixed = Steering.create(tiny_model, v, op="cap", bounds=("10%", None), layers=[1])
    assert mixed.lo[0] == pytest.approx(np.percentile(draws[1], 10)) and mixed.hi[0] == math.inf
    target = Steering.create(tiny_model, v, op="set", target="50%", layers=[1])
    assert target.lo == target.hi == pytest.approx((np.median(draws[1]),))


@pytest.mark.parametrize("bounds, field", [
    (("25", None), "bounds"),         # a string that is not a percentage
    (("x%", None), "bounds"),
    (("150%", None), "bounds"),
    (("-5%", None), "bounds"),
    (("75%", "25%"), "bounds"),       # percentiles out of order
])
def test_bad_percentile_bounds_are_one_line(tiny_model, vec, draws, bounds, field):
    v = with_reference(vec, draws, "seeded draws")
    with pytest.raises(SteerlabError) as err:
        Steering.create(tiny_model, v, op="cap", bounds=bounds, layers=[0])
    assert f"field '{field}'" in str(err.value) and "\n" not in str(err.value)


def test_a_vector_without_reference_refuses_percentiles(tiny_model, vec, draws):
    with pytest.raises(SteerlabError, match="field 'bounds'.*no reference projections at "
                       "layer 0 \\(it has none\\)"):
        Steering.create(tiny_model, vec, op="cap", bounds=("25%", None), layers=[0])
    partial = with_reference(vec, {1: draws[1]}, "layer 1 only")
    with pytest.raises(SteerlabError, match="layer 2 \\(it has them at layers \\[1\\]"):
        Steering.create(tiny_model, partial, op="cap", bounds=(None, "90%"), layers=[2])


def test_reference_survives_files_and_leaves_with_a_new_direction(tmp_path, vec, draws):
    v = with_reference(vec, draws, "seeded draws")
    back = SteeringVector.load(v.save(tmp_path / "v"))
    assert back.provenance.reference == v.provenance.reference
    assert (2.0 * v).provenance.reference == v.provenance.reference  # same unit direction
    assert v.normalise().provenance.reference == v.provenance.reference
    for changed in (-v, v + v, v - vec, v.without(random_like(vec, 1)), random_like(v, 2)):
        assert changed.provenance.reference == {}
    # a sidecar edited by hand: refused where it is used, naming the field
    bad = with_reference(vec, draws, "x")
    table = dict(bad.provenance.reference)
    table["percentiles"] = {**table["percentiles"], "0": [1.0, 0.0] * 50 + [2.0]}
    from dataclasses import replace
    broken = replace(bad, provenance=replace(bad.provenance, reference=table))
    with pytest.raises(SteerlabError, match="reference.percentiles.0"):
        reference_value(broken, 0, 50)


def test_fit_vector_records_the_rejected_projections(tmp_path):
    chosen, rejected, _ = planted(n=60)
    write_planted_file(tmp_path / "a.h5", chosen, rejected)
    vec, _ = fit_vector(tmp_path / "a.h5", "mean-diff", batch_size=16)
    acts = ActivationFile(tmp_path / "a.h5")
    rows = torch.cat([r for _, r in acts.iter_batches(64, site=Site.DIVERGENCE)]).double()
    for i, layer in enumerate(vec.layers):
        unit = vec.direction(layer).double() / vec.direction(layer).double().norm()
        p = (rows[:, i] @ unit).numpy()
        for q in (5, 25, 50, 95):
            # float32 projections (the fitter's) vs float64 here: ~1e-6 of |h| at most
            assert reference_value(vec, layer, q) == pytest.approx(
                np.percentile(p, q), abs=1e-5 * float(rows.norm(dim=-1).max()))
    assert "rejected" in vec.provenance.reference["label"]
    # the shuffled-label control's direction is noise: it records no reference
    control, _ = fit_vector(tmp_path / "a.h5", "mean-diff", shuffle_seed=1)
    assert control.provenance.reference == {}


def test_serve_takes_percentile_bounds(tiny_model, vec, draws, tmp_path):
    with_reference(vec, draws, "seeded draws").save(tmp_path / "ref")
    vec.save(tmp_path / "plain")
    shelf = VectorShelf(tmp_path)
    (cap,) = parse_steering(tiny_model, {"vector": "ref", "op": "cap", "bounds": ["25%", None],
                                         "layers": [0]}, shelf)
    assert cap.lo[0] == pytest.approx(np.percentile(draws[0], 25))
    for body, param in [({"vector": "ref", "op": "cap", "bounds": ["lots", None]},
                         "steering.bounds"),
                        ({"vector": "ref", "op": "set", "target": "101%"}, "steering.target"),
                        ({"vector": "plain", "op": "cap", "bounds": ["25%", None]},
                         "steering")]:
        with pytest.raises(RequestError) as err:
            parse_steering(tiny_model, body, shelf)
        assert err.value.param == param and "\n" not in str(err.value)


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("monitor_first", [True, False])
def test_monitor_reads_before_and_after_the_interventions(hf_attention_model, engine,
                                                          monitor_first):
    """After a full cap at a layer, each step's projection there is the one before it,
    clamped: whichever context was entered first, on both engines."""
    tiny_model, layer = hf_attention_model, 1
    g = torch.Generator().manual_seed(4)
    vec = SteeringVector(torch.randn(2, tiny_model.cfg.d_model, generator=g), (0, 1))
    plain_mon = monitor(tiny_model, vec, layers=[layer])
    with plain_mon as plain:
        generate(tiny_model, PROMPTS, max_new_tokens=1, engine=engine)
    first = plain.trace(layer)[:, 0]
    mid = float(first.mean())
    cap = Steering.create(tiny_model, vec, op="cap", bounds=(None, mid), units="raw",
                          layers=[layer])
    contexts = [monitor(tiny_model, vec, layers=[layer]), cap.apply(tiny_model)]
    if not monitor_first:
        contexts.reverse()
    with contexts[0] as a, contexts[1] as b:
        generate(tiny_model, PROMPTS, max_new_tokens=5, engine=engine)
    mon = a if monitor_first else b
    before, after = mon.trace(layer, before=True), mon.trace(layer)
    assert before.shape == after.shape == (2, 5)
    # the prompt pass is the unsteered model's; float32 summation order only
    torch.testing.assert_close(before[:, 0], first, rtol=1e-5, atol=1e-5)
    scale = float(before.abs().max())
    # the cap moved a row above it, and left every projection at most mid (+ rounding of
    # the re-projected residual, ~1e-6 of its size)
    assert bool((before[:, 0] > mid).any())
    torch.testing.assert_close(after, before.clamp(max=mid), rtol=0, atol=1e-5 * scale)
    # an unmonitored layer
    with pytest.raises(SteerlabError, match="not monitored"):
        mon.trace(0)
