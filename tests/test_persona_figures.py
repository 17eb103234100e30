"""Persona-space figures (issue 29, item 4): each figure's data equal to the space's arrays
(a duck-typed space, so every number is planted), NaN metrics left out, one colour per
category in every figure; the run report's "Persona space" section with activations and not
without; the standalone page of `steerlab personas map`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from steerlab.base.errors import SteerlabError
from steerlab.inference.geometry import Correlation, persona_space
from steerlab.inference.infer import InferConfig, run_inference
from steerlab.inference.report import write_persona_space_page, write_run_report
from steerlab.model.personas import Persona
from steerlab.reporting.persona_figures import category_colours, persona_space_figures

NAMES = ("Hamlet", "assistant", "pirate", "AI assistant", "Cleopatra")
CATS = ("fiction", "assistant", "fiction", "assistant", "history")


def _space(k: int = 3, entropy=(2.5, 1.0, np.nan, 1.2, 2.0)) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    n, layers = len(NAMES), (4, 8, 12)
    proj = rng.normal(size=(n, len(layers)))
    width = rng.uniform(0.1, 0.5, size=(n, len(layers), 2)) * [-1, 1]
    explained = np.sort(rng.dirichlet(np.ones(k + 1), size=len(layers))[:, :k], axis=1)[:, ::-1]
    return SimpleNamespace(
        personae=NAMES, categories=CATS, assistant="assistant", layers=layers,
        projections=proj, intervals=proj[..., None] + width, explained=explained,
        scores=rng.normal(size=(n, len(layers), k)), pc1_cosine=np.array([0.5, 0.9, 0.7]),
        metrics={"avg_entropy": np.array(entropy, dtype=float),
                 "avg_top_k_mass": np.full(n, 0.5)},
        correlations={"avg_entropy": tuple(Correlation(-0.8 + i / 10, -0.95, 0.1, 4)
                                           for i in range(len(layers))),
                      "avg_top_k_mass": (Correlation(math.nan, math.nan, math.nan, 5),) * 3})


def _by_name(fig) -> dict[str, object]:
    return {t.name: t for t in fig.data}


def test_one_colour_per_category_in_every_figure_assistant_first():
    space = _space()
    colours = category_colours(space)
    assert list(colours) == ["assistant", "fiction", "history"]
    assert len(set(colours.values())) == 3
    figs = persona_space_figures(space)
    for name in ("pc", "axis", "entropy"):
        assert [t.name for t in figs[name].data] == list(colours), name  # one trace each
        for t in figs[name].data:
            assert t.marker.color == colours[t.name], (name, t.name)
    assert figs["axis"].data[0].error_x.color == colours["assistant"]


def test_many_categories_never_share_a_colour():
    cats = tuple(f"c{i}" for i in range(33)) + ("assistant",)
    colours = category_colours(SimpleNamespace(categories=cats, assistant="assistant"))
    assert list(colours)[0] == "assistant" and len(set(colours.values())) == 34


def test_pc_scatter_is_the_scores_at_the_middle_layer():
    space = _space()
    fig = persona_space_figures(space)["pc"]
    assert "layer 8" in fig.layout.title.text
    for cat, t in _by_name(fig).items():
        idx = [j for j, c in enumerate(CATS) if c == cat]
        assert list(t.hovertext) == [NAMES[j] for j in idx]
        np.testing.assert_array_equal(t.x, space.scores[idx, 1, 0])
        np.testing.assert_array_equal(t.y, space.scores[idx, 1, 1])
    assert fig.layout.xaxis.title.text == f"PC1 ({100 * space.explained[1, 0]:.1f}% of variance)"
    assert fig.layout.yaxis.title.text == f"PC2 ({100 * space.explained[1, 1]:.1f}% of variance)"
    fig = persona_space_figures(space, layer=12)["pc"]
    np.testing.assert_array_equal(_by_name(fig)["history"].x, space.scores[[4], 2, 0])


def test_pc_scatter_with_one_persona_dimension_puts_pc2_at_zero():
    space = _space(k=1)
    fig = persona_space_figures(space)["pc"]
    assert all(list(t.y) == [0.0] * len(t.x) for t in fig.data)
    assert "PC2" in fig.layout.yaxis.title.text and "%" not in fig.layout.yaxis.title.text


def test_axis_projections_sorted_with_their_intervals_as_error_bars():
    space = _space()
    fig = persona_space_figures(space, layer=4)["axis"]
    proj, iv = space.projections[:, 0], space.intervals[:, 0]
    order = list(np.argsort(proj))
    assert list(fig.layout.yaxis.categoryarray) == [NAMES[j] for j in order]
    seen = []
    for cat, t in _by_name(fig).items():
        idx = [j for j in order if CATS[j] == cat]  # in sorted order within the trace too
        assert list(t.y) == list(t.hovertext) == [NAMES[j] for j in idx]
        np.testing.assert_array_equal(t.x, proj[idx])
        assert t.error_x.symmetric is False
        np.testing.assert_allclose(np.asarray(t.x) + t.error_x.array, iv[idx, 1], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(t.x) - t.error_x.arrayminus, iv[idx, 0],
                                   rtol=1e-12)
        seen += idx
    assert sorted(seen) == list(range(len(NAMES)))


def test_entropy_scatter_leaves_nan_metrics_out_and_titles_the_correlation():
    space = _space()
    fig = persona_space_figures(space)["entropy"]
    traces = _by_name(fig)
    assert list(traces["fiction"].hovertext) == ["Hamlet"]  # pirate's entropy is NaN
    np.testing.assert_array_equal(traces["fiction"].x, space.projections[[0], 1])
    np.testing.assert_array_equal(traces["fiction"].y, [2.5])
    np.testing.assert_array_equal(traces["assistant"].y, [1.0, 1.2])
    assert sum(len(t.x) for t in fig.data) == 4
    assert "Pearson r = -0.70 [-0.95, 0.10], n = 4" in fig.layout.title.text
    space.correlations["avg_entropy"] = (Correlation(math.nan, math.nan, math.nan, 2),) * 3
    space.metrics["avg_entropy"][:] = np.nan
    fig = persona_space_figures(space)["entropy"]
    assert "r undefined (n = 2)" in fig.layout.title.text
    assert all(len(t.x) == 0 for t in fig.data)


def test_variance_lines_per_component_and_the_cosine_per_layer():
    space = _space()
    fig = persona_space_figures(space)["variance"]
    lines = _by_name(fig)
    assert list(lines) == ["PC1", "PC2", "PC3", "cos(PC1, axis)"]
    for k in range(3):
        assert list(lines[f"PC{k + 1}"].x) == [4, 8, 12]
        np.testing.assert_array_equal(lines[f"PC{k + 1}"].y, space.explained[:, k])
    np.testing.assert_array_equal(lines["cos(PC1, axis)"].y, space.pc1_cosine)
    assert lines["cos(PC1, axis)"].xaxis == "x2"
    colours = {t.line.color for t in fig.data}
    assert len(colours) == 4 and not colours & set(category_colours(space).values())


def test_a_layer_not_captured_is_one_error_line():
    with pytest.raises(SteerlabError, match=r"layer 5 was not captured; the space has \[4, 8"):
        persona_space_figures(_space(), layer=5)


# --- on a run ------------------------------------------------------------------------------
PERSONAE = [Persona("assistant", "assistant", "an"), Persona("AI assistant", "assistant", "an"),
            Persona("Hamlet", "fictional-character", ""),
            Persona("Cleopatra", "historical-figure", "")]
PROMPTS = ["Who are you?", "Describe the sea.", "Name a food."]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pf")
    out = {}
    for name, personae, layers in (("captured", PERSONAE, (1, 2)), ("plain", PERSONAE, ()),
                                   ("assistant only", PERSONAE[:2], (1,))):
        cfg = InferConfig(max_tokens=4, batch_size=8, capture_layers=layers)
        out[name] = run_inference(tiny_model, PROMPTS, personae, root / name.replace(" ", "_"),
                                  cfg, progress=False)
    return out


def test_report_has_a_persona_space_section_only_with_activations(runs):
    page = write_run_report(runs["captured"]).read_text()
    assert "<h2>Persona space</h2>" in page
    assert page.count("Plotly.newPlot") == 3 + 4  # the three boxes, then the four figures
    assert "Assistant-axis projection at layer 2" in page  # the middle of (1, 2)
    plain = write_run_report(runs["plain"]).read_text()
    assert "Persona space" not in plain and plain.count("Plotly.newPlot") == 3


def test_report_says_why_without_a_second_category(runs):
    page = write_run_report(runs["assistant only"]).read_text()
    assert "<h2>Persona space</h2><p>No persona space: it needs the 'assistant' category and " \
           "at least one other; this run has assistant.</p>" in page
    assert page.count("Plotly.newPlot") == 3


def test_persona_space_page(runs, tmp_path):
    space = persona_space(runs["captured"], n_boot=50)
    path = write_persona_space_page(space, tmp_path / "space.html")
    page = path.read_text()
    assert path == tmp_path / "space.html" and page.startswith("<!DOCTYPE html>")
    assert page.count("Plotly.newPlot") == 4 and "<script src=" not in page
    # the table: personae by projection at the figures' layer, highest first
    rows = page.split("<h2>Personae</h2>")[1]
    order = [space.personae[j] for j in np.argsort(-space.projections[:, 1], kind="stable")]
    assert [rows.index(f"<td>{n}</td>") for n in order] == sorted(
        rows.index(f"<td>{n}</td>") for n in order)
    for head in ("projection L1", "95% interval L2", "avg_entropy", "category"):
        assert f"<th>{head}</th>" in rows
    lo, hi = space.intervals[0, 0]
    assert f"[{lo:.3f}, {hi:.3f}]" in rows
