"""Figures, the static HTML report and the viewer notebook (on a fresh embedded-model run)."""

from __future__ import annotations

import numpy as np
import pytest

import steerlab.reporting as viz
from steerlab.model.personas import Persona

RECORDS = [
    {"id": 0, "category": "a", "avg_entropy": 1.0, "avg_entropy_thinking": None,
     "think_end_position": None},
    {"id": 1, "category": "a", "avg_entropy": 3.0, "avg_entropy_thinking": 2.0,
     "think_end_position": 4},
    {"id": 2, "category": "b", "avg_entropy": 2.0, "avg_entropy_thinking": None,
     "think_end_position": None},
]


def test_box_by_category_has_one_box_per_category_and_field():
    fig = viz.box_by_category(RECORDS, ["avg_entropy", "avg_entropy_thinking"])
    assert [t.name for t in fig.data] == ["a", "a", "b", "b"]
    assert list(fig.data[0].y) == [1.0, 3.0] and list(fig.data[1].y) == [2.0]
    assert list(fig.data[3].y) == []  # missing values are left out
    assert set(viz.summary_figures(RECORDS)) == {"entropy", "top_k_mass", "think_end_position"}


def test_summary_stats_and_filter():
    stats = viz.summary_stats(RECORDS, ["avg_entropy"])
    a = next(s for s in stats if s["category"] == "a")
    # the mean of 1 and 3 is exact in floating point; a std by another formula may round
    # differently, hence pytest.approx's relative 1e-6
    assert a["n"] == 2 and a["mean"] == 2.0 and a["std"] == pytest.approx(np.std([1.0, 3.0]))
    assert [r["id"] for r in viz.filter_records(RECORDS, ["b"])] == [2]
    html = viz.html_table(RECORDS, ["id", "avg_entropy"])
    assert html.count("<tr>") == 4 and "avg_entropy" in html


def test_lens_heatmap_is_layer_by_token():
    fig = viz.lens_heatmap(np.zeros((5, 3)), ["a", "b", "c", "d", "e"])
    assert np.asarray(fig.data[0].z).shape == (3, 5)


@pytest.fixture(scope="module")
def embedded_run(embedded_model, tmp_path_factory):
    from steerlab.inference.infer import InferConfig, run_inference

    personae = [Persona("assistant", "assistant", "an"), Persona("Hamlet", "fictional-character"),
                Persona("doctor", "profession", "a"), Persona("toaster", "object", "a")]
    cfg = InferConfig(max_tokens=6, batch_size=8, lens=True)
    out = tmp_path_factory.mktemp("viz") / "run"
    return run_inference(embedded_model, ["Who are you?", "Name a fruit."], personae, out, cfg,
                         progress=False)


@pytest.mark.slow
def test_report_is_standalone_html(embedded_run, embedded_model):
    from steerlab.inference.report import write_run_report

    path = write_run_report(embedded_run, tokenizer=embedded_model.tokenizer)
    page = path.read_text()
    assert "<script src=" not in page  # plotly.js is inlined: no network needed
    assert page.count("Plotly.newPlot") == 4  # three box figures and the lens heatmap
    assert "Logit-lens entropy" in page and "Hamlet" in page


@pytest.mark.slow
def test_report_command_writes_the_html(embedded_run, tmp_path, capsys):
    from conftest import run_cli

    target = tmp_path / "page.html"
    (embedded_run / "report.html").unlink(missing_ok=True)  # another test may have written it
    assert run_cli("report", str(embedded_run), "--output", str(target)) == 0
    assert str(target) in capsys.readouterr().out
    page = target.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("Plotly.newPlot") == 4
    assert not (embedded_run / "report.html").exists()  # --output was honoured
    assert run_cli("report", str(embedded_run)) == 0  # default: inside the run folder
    assert (embedded_run / "report.html").read_text().count("Plotly.newPlot") == 4


def test_report_command_on_a_folder_without_results_is_exit_2(tmp_path, capsys):
    from conftest import run_cli

    assert run_cli("report", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "not a steerlab run folder" in err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(embedded_run):
    from notebook_runner import run_notebook

    nb = run_notebook("01_persona_entropy.ipynb", {"STEERLAB_RESULTS": str(embedded_run)})
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figs = [o["data"]["application/vnd.plotly.v1+json"] for o in outputs
            if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert [f["data"][0]["type"] for f in figs] == ["box"] * 3 + ["heatmap"]
    assert {t["name"] for t in figs[0]["data"]} == {"assistant", "fictional-character",
                                                    "profession", "object"}
    heat = figs[-1]["data"][0]
    shape = [int(n) for n in str(heat["z"]["shape"]).split(",")]  # plotly's typed array
    assert shape == [30, len(heat["x"])] and len(heat["y"]) == 30  # layers x tokens
    assert not all(x.split(":", 1)[1].isdigit() for x in heat["x"])  # token text, not ids
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "8 of 8 results" in html and "Hamlet" in html  # summary and raw table


def test_empty_panels_say_why():
    no_thinking = [{**r, "avg_entropy_thinking": None, "think_end_position": None}
                   for r in RECORDS]
    fig = viz.box_by_category(no_thinking, ["avg_entropy", "avg_entropy_thinking"])
    texts = [a.text for a in fig.layout.annotations if a.text.startswith("no ")]
    assert len(texts) == 1 and "thinking mode" in texts[0].replace("<br>", " ")
    assert fig.layout.annotations[-1].xref == "x2 domain"
    # a panel with values gets no such note
    assert not [a for a in viz.box_by_category(RECORDS, ["avg_entropy"]).layout.annotations
                if a.text.startswith("no ")]


def test_box_legend_survives_an_empty_first_panel_and_notes_fit_their_panel():
    no_thinking = [{**r, "avg_entropy_thinking": None} for r in RECORDS]
    fields = ["avg_entropy_thinking", "avg_entropy"]
    fig = viz.box_by_category(no_thinking, fields)
    # plotly hides an empty box trace, legend entry and all: the entry goes with the values
    assert [(t.name, t.showlegend) for t in fig.data if t.showlegend] == [("a", True),
                                                                          ("b", True)]
    assert all(len(t.y) for t in fig.data if t.showlegend)
    note = next(a for a in fig.layout.annotations if a.text.startswith("no "))
    # plotly does not wrap: a set width would clip the note, so it is broken into lines
    assert note.width is None and note.text.count("<br>") >= 2
    assert max(len(line) for line in note.text.split("<br>")) <= 96 // len(fields)


def test_sweep_controls_never_take_a_layer_groups_colour():
    from steerlab.evaluation.evaluate import SteeringEval
    from steerlab.evaluation.rating import Setting

    def s(layers, alpha):
        return Setting(layers, alpha, 1.0, 1.0, 1.0, 1.0, coherent_trait=1.0)

    # three groups: by trace index the shuffled control would take the first group's colour
    sweep = tuple(s(layers, a) for layers in ((1,), (2,), (1, 2)) for a in (1.0, 2.0))
    ev = SteeringEval(s((), 0.0), s((), 0.0), sweep, sweep[0], s((1,), 1.0), 0.8,
                      shuffled=s((1,), 1.0))
    fig = viz.steering_figure(ev)
    groups = {t.line.color for t in fig.data if t.legendgroup}
    controls = [t.marker.color for t in fig.data if t.name.endswith(" vector")]
    assert len(groups) == 3 and len(controls) == 2
    assert None not in controls and len(set(controls)) == 2 and not groups & set(controls)
