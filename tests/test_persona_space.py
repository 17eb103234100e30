"""Persona space (issue 29, items 2-3): per-persona means, PCA, the assistant axis, projections
with their prompt bootstrap, the join with output metrics and the axis vector's reference, all
recomputed here with numpy from the run's activations.h5 rows and results.json; bad input in
one line (library and `steerlab personas map`, exit 2)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import run_cli

from steerlab.base.errors import SteerlabError
from steerlab.inference.geometry import persona_space
from steerlab.inference.infer import InferConfig, run_inference
from steerlab.model.personas import Persona
from steerlab.steering.reference import reference_value
from steerlab.steering.vector import SteeringVector

PERSONAE = [Persona("assistant", "assistant", "an"), Persona("AI assistant", "assistant", "an"),
            Persona("Hamlet", "fictional-character", ""),
            Persona("pirate captain", "fictional-character", "a"),
            Persona("Cleopatra", "historical-figure", "")]
PROMPTS = ["Who are you?", "What do you do on Sundays?", "Describe the sea.", "Name a food."]
# sampled (seeded per task), so the two reps of a prompt differ
CONFIG = InferConfig(max_tokens=5, batch_size=8, n_reps=2, temperature=1.0, seed=3,
                     capture_layers=(1, 2))
N_BOOT = 300


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return run_inference(tiny_model, PROMPTS, PERSONAE, tmp_path_factory.mktemp("ps") / "run",
                         CONFIG, progress=False)


@pytest.fixture(scope="module")
def rows(run):
    with h5py.File(run / "activations.h5") as f:
        ids, reply = f["record_id"][:], f["reply"][:].astype(np.float64)
    records = {r["id"]: r for r in json.loads((run / "results.json").read_text())}
    return [records[int(i)] for i in ids], reply


def _means(rows):
    records, reply = rows
    names = list(dict.fromkeys(r["persona"] for r in records))
    return names, np.stack([reply[[r["persona"] == n for r in records]].mean(0)
                            for n in names])


def test_means_axis_projections_and_pca_equal_numpy(run, rows):
    space = persona_space(run, n_boot=N_BOOT)
    names, means = _means(rows)
    assert space.personae == tuple(names) and space.layers == (1, 2)
    assert space.categories == tuple(p.category for p in PERSONAE)
    # float64 means of the same float32 rows, other summation order: ~1e-16 relative
    np.testing.assert_allclose(space.means, means, rtol=1e-12, atol=1e-12)
    asst = np.array([p.category == "assistant" for p in PERSONAE])
    axis = means[asst].mean(0) - means[~asst].mean(0)
    np.testing.assert_allclose(space.axis, axis, rtol=1e-12, atol=1e-12)
    unit = axis / np.linalg.norm(axis, axis=-1, keepdims=True)
    np.testing.assert_allclose(space.projections, np.einsum("pld,ld->pl", means, unit),
                               rtol=1e-10, atol=1e-10)
    for i in range(2):
        centred = means[:, i] - means[:, i].mean(0)
        _, s, vt = np.linalg.svd(centred)
        k = space.explained.shape[1]
        np.testing.assert_allclose(space.explained[i], (s**2 / (s**2).sum())[:k], rtol=1e-9)
        # each component up to its sign (PC1's is chosen along the axis)
        for j in range(k):
            cos = abs(float(space.components[i, j] @ vt[j]))
            assert cos == pytest.approx(1.0, abs=1e-8)
        assert float(space.components[i, 0] @ unit[i]) >= 0
        assert space.pc1_cosine[i] == pytest.approx(float(space.components[i, 0] @ unit[i]))
        np.testing.assert_allclose(space.scores[:, i], centred @ space.components[i].T,
                                   rtol=1e-9, atol=1e-9)


def test_prompt_bootstrap_equals_a_loop_over_the_same_draws(run, rows):
    """The draws are documented: rng.integers(0, n_prompts, (n_boot, n_prompts)) from
    default_rng(seed), first; each draw weighs a prompt by how often it was drawn."""
    space = persona_space(run, n_boot=N_BOOT, seed=7)
    records, reply = rows
    names = list(space.personae)
    unit = space.axis / np.linalg.norm(space.axis, axis=-1, keepdims=True)
    proj = np.einsum("nld,ld->nl", reply, unit)
    draws = np.random.default_rng(7).integers(0, len(PROMPTS), size=(N_BOOT, len(PROMPTS)))
    boot = np.zeros((N_BOOT, len(names), 2))
    for b, draw in enumerate(draws):
        for p, name in enumerate(names):
            picked = [proj[n] for q in draw for n, r in enumerate(records)
                      if r["persona"] == name and r["prompt_index"] == q]
            boot[b, p] = np.mean(picked, axis=0)
    want = np.moveaxis(np.percentile(boot, [2.5, 97.5], axis=0), 0, -1)
    np.testing.assert_allclose(space.intervals, want, rtol=1e-9, atol=1e-9)
    assert (space.intervals[..., 0] <= space.intervals[..., 1]).all()


def test_metrics_join_and_axis_vector_reference(run, rows):
    space = persona_space(run, n_boot=N_BOOT)
    records, reply = rows
    for metric in ("avg_entropy", "avg_top_k_mass"):
        per = np.array([np.mean([r[metric] for r in records if r["persona"] == n
                                 and r[metric] is not None]) for n in space.personae])
        np.testing.assert_allclose(space.metrics[metric], per, rtol=1e-12)
        for i in range(2):
            c = space.correlations[metric][i]
            want = np.corrcoef(space.projections[:, i], per)[0, 1]
            assert c.r == pytest.approx(want, abs=1e-9) and c.n == len(PERSONAE)
            assert -1 - 1e-9 <= c.lo <= c.hi <= 1 + 1e-9
    vec = space.axis_vector()
    assert isinstance(vec, SteeringVector) and vec.layers == (1, 2)
    unit = space.axis / np.linalg.norm(space.axis, axis=-1, keepdims=True)
    asst = [r["category"] == "assistant" for r in records]
    for i, layer in enumerate(vec.layers):
        p = reply[asst][:, i] @ unit[i]
        for q in (0, 25, 50, 100):
            # the vector's directions are float32: percentiles stored from float64 projections
            assert reference_value(vec, layer, q) == pytest.approx(np.percentile(p, q),
                                                                   rel=1e-12, abs=1e-12)
    json.dumps(space.summary(), allow_nan=False)  # JSON-ready


def test_bad_inputs_are_one_line(tiny_model, run, tmp_path):
    cases = [(dict(assistant="villain"), "no persona has category 'villain'"),
             (dict(layers=[0]), "layer 0 was not captured"),
             (dict(section="thinking"), "no reply with thinking tokens"),
             (dict(section="middle"), "field 'section'")]
    for kwargs, message in cases:
        with pytest.raises(SteerlabError, match=message) as err:
            persona_space(run, **kwargs)
        assert "\n" not in str(err.value)
    plain = run_inference(tiny_model, PROMPTS[:1], PERSONAE[:2], tmp_path / "plain",
                          InferConfig(max_tokens=2), progress=False)
    with pytest.raises(SteerlabError, match="no captured activations"):
        persona_space(plain)
    with pytest.raises(SteerlabError, match="every persona has category 'assistant'"):
        persona_space(run_inference(tiny_model, PROMPTS[:1], PERSONAE[:2], tmp_path / "a",
                                    InferConfig(max_tokens=2, capture_layers=(1,)),
                                    progress=False))


def test_personas_map_cli_writes_summary_axis_and_page(run, tmp_path, capsys):
    out = tmp_path / "space"
    assert run_cli("personas", "map", str(run), "-o", str(out), "--n-boot", "50") == 0
    summary = json.loads((out / "persona_space.json").read_text())
    assert summary["layers"] == [1, 2] and len(summary["layer_summaries"][0]["personae"]) == 5
    axis = SteeringVector.load(out / "assistant_axis")
    np.testing.assert_allclose(axis.directions.numpy(),
                               persona_space(run, n_boot=50).axis.astype(np.float32))
    assert axis.provenance.reference["percentiles"].keys() == {"1", "2"}
    assert (out / "persona_space.html").is_file()
    # bad input: one line, exit 2, nothing written
    bad = tmp_path / "bad"
    assert run_cli("personas", "map", str(run), "-o", str(bad), "--assistant", "villain") == 2
    assert run_cli("personas", "map", str(tmp_path / "nope"), "-o", str(bad)) == 2
    assert not bad.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error") for line in err[-2:]), err
