"""`steerlab demo`: the whole pipeline on the embedded model. The quick run goes through the
real command; the full run (the `make demo` configuration) must meet the steering targets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from steerlab.demo import DemoConfig, DemoSummary, run_demo, summary_json
from steerlab.pairs import load_pairs
from steerlab.results import load_results
from steerlab.store import ActivationFile


def _consistent(out, s: DemoSummary) -> dict:
    """The summary's numbers are the run's: pairs, HDF5 rows, sweep, probe, persona results."""
    pairs = load_pairs(out / "pairs" / "pairs.jsonl")
    assert s.pairs_kept == len(pairs) == ActivationFile(out / "activations.h5").n_pairs
    ev = json.loads((out / "steering-eval.json").read_text())
    best = ev["best"]
    assert best in ev["sweep"]
    assert (s.best_layer, s.best_alpha) == (best["layer"], best["alpha"])
    assert s.trait_steered == best["coherent_trait"]
    assert s.trait_unsteered == ev["unsteered"]["coherent_trait"]
    assert s.coherence_steered == best["coherence"]
    assert s.probe_accuracy == json.loads((out / "probe.json").read_text())[str(s.best_layer)]
    assert s.persona_results == len(load_results(out / "personae")) > 0
    page = (out / "report.html").read_text()
    assert "plotly" in page.lower() and f"pairs kept: {s.pairs_kept}" in page
    return ev


@pytest.mark.extended
def test_quick_demo_command(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "steerlab.cli", "demo", "--quick",
                          "--output-dir", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    s = summary_json(out / "summary.json")
    for line in s.lines():  # the printed summary is the saved one
        assert line in run.stdout
    ev = _consistent(out, s)
    q = DemoConfig.quick()
    assert {x["layer"] for x in ev["sweep"]} == set(q.layers)
    assert len(ev["unsteered"]["answers"]) == q.n_held_out


@pytest.mark.slow
@pytest.mark.extended
def test_full_demo_steers_the_trait_coherently(embedded_model, tmp_path):
    """Issue targets on held-out questions at the automatically chosen (layer, alpha)."""
    out = tmp_path / "demo"
    s = run_demo(out, DemoConfig(), model=embedded_model, progress=False)
    ev = _consistent(out, s)
    report = [(x["layer"], x["alpha"], round(x["coherent_trait"], 1), round(x["coherence"], 2))
              for x in ev["sweep"]]
    assert s.trait_prompted > s.trait_unsteered, report  # the reference gap exists
    assert s.gap_closed >= 0.5, report
    assert s.coherence_steered >= 0.8 * s.coherence_unsteered, report
    assert s.random_gap_closed <= 0.05, (ev["random"], report)
    assert s.probe_accuracy >= 0.9
    # coherence catches what steering breaks: the loudest setting is not a coherent one
    loudest = max(ev["sweep"], key=lambda x: x["trait"])
    assert loudest["coherence"] < 0.8 * s.coherence_unsteered, report
