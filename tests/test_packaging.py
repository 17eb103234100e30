"""A real wheel: built from the sources, installed (not editable) into a folder of its own and
run from a directory outside the repository, so built-in data read from the checkout would
fail. Also: the dependencies pyproject.toml declares are the third-party packages steerlab
imports. The demo's checks are structural (every file is there, the summary is the run's
numbers, values are in range): whether steering works is what `make demo`'s report shows, not
what a test asserts."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from steerlab.demo import DemoConfig, DemoSummary
from steerlab.evaluation.evaluate import SteeringEval, spread_groups
from steerlab.evaluation.verdict import validation_report
from steerlab.extraction.store import ActivationFile
from steerlab.inference.results import load_results
from steerlab.traits.pairs import load_pairs
from steerlab.traits.trait import load_trait

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "steerlab"
BUILTIN = sorted(p.relative_to(ROOT).as_posix() for p in (PACKAGE / "builtin").rglob("*.json"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the sources (setuptools builds in the source
    folder, and a stale build/ there could leak deleted modules into the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "steerlab", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", ".", "-w", str(tmp / "dist")], cwd=src, check=True, timeout=300,
                   capture_output=True)
    (built,) = (tmp / "dist").glob("steerlab-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel) -> Path:
    """The wheel installed with pip into a target folder, to put first on PYTHONPATH."""
    target = wheel.parent / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300, capture_output=True)
    return target


def _from_wheel(site: Path, cwd: Path, *args: str, timeout: float = 300):
    """``python ARGS`` with the installed wheel shadowing the editable checkout."""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_wheel_ships_the_builtin_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"steerlab/builtin/traits/pirate.json", "steerlab/builtin/data/prompts.json",
            "steerlab/builtin/data/personae.json"} <= set(BUILTIN)
    assert set(BUILTIN) <= names
    assert "steerlab/builtin/__init__.py" in names and "steerlab/cli/__main__.py" in names


def test_traits_list_runs_from_the_installed_wheel(site, tmp_path):
    where = _from_wheel(site, tmp_path, "-c", "import steerlab; print(steerlab.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(site)  # the wheel, not the checkout
    run = _from_wheel(site, tmp_path, "-m", "steerlab.cli", "traits", "list")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split()[0]: line for line in run.stdout.splitlines()}
    assert set(rows) == {"cowboy", "emoji", "formatting", "pirate", "playful"}
    assert "50 questions" in rows["pirate"] and "scorer lexicon" in rows["pirate"]
    for name, row in rows.items():
        assert Path(row.split()[-1]) == site / "steerlab" / "builtin" / "traits" / f"{name}.json"


def _imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a source file (function-level ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def test_declared_dependencies_are_the_imported_ones():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_norm(Requirement(r).name) for r in project["dependencies"]}
    extras = {_norm(Requirement(r).name) for reqs in project["optional-dependencies"].values()
              for r in reqs}
    imported = set().union(*(_imports(p) for p in PACKAGE.rglob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - {"steerlab", "__future__"}
    assert "tqdm" not in imported  # rich is the one progress library (steerlab.base.progress)
    dists = importlib.metadata.packages_distributions()
    provided = {m: {_norm(d) for d in dists.get(m, [m])} for m in third_party}
    undeclared = {m: d for m, d in provided.items() if not d & (core | extras)}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = core - set().union(*provided.values())
    assert not unused, f"declared in pyproject.toml but never imported by steerlab: {unused}"


def _in_range(setting: dict, n_answers: int) -> None:
    assert 0.0 <= setting["trait"] <= 100.0 and 0.0 <= setting["coherent_trait"] <= 100.0
    assert 0.0 <= setting["coherence"] <= 1.0 and 0.0 <= setting["distinct"] <= 1.0
    assert len(setting["answers"]) == len(setting["coherent"]) == n_answers


def _consistent(out, s: DemoSummary, config: DemoConfig) -> dict:
    """The summary's numbers are the run's (pairs, HDF5 rows, sweep, probe, persona results),
    the sweep covers the configured grid, and every score is in range."""
    pairs = load_pairs(out / "pairs" / "pairs.jsonl")
    assert s.pairs_kept == len(pairs) == ActivationFile(out / "activations.h5").n_pairs
    assert 0 < s.pairs_kept <= s.pairs_collected
    ev = json.loads((out / "steering-eval.json").read_text())
    groups = {tuple(g) for g in spread_groups(config.layers)}
    assert {tuple(x["layers"]) for x in ev["sweep"]} == groups  # every group searched
    assert len(ev["sweep"]) <= config.search.most_points(len(groups))
    assert all(0 < x["alpha"] <= config.search.max_alpha for x in ev["sweep"])
    n = len(load_trait(config.trait).held_out_questions[: config.n_held_out])
    for setting in [ev["unsteered"], ev["prompted"], ev["random"], ev["shuffled"],
                    *ev["sweep"]]:
        _in_range(setting, n)
    best = ev["best"]
    assert best in ev["sweep"]
    assert (s.best_layers, s.best_alpha) == ("+".join(map(str, best["layers"])), best["alpha"])
    rep = validation_report(SteeringEval.load(out / "steering-eval.json"), trait=config.trait)
    assert (s.gap_low, s.gap_high, s.passed) == (rep.row("steered").gap_low,
                                                 rep.row("steered").gap_high, rep.passed)
    assert s.shuffled_gap_closed == rep.row("shuffled").gap_closed
    assert (out / "steering-eval.html").is_file()
    assert s.trait_steered == best["coherent_trait"]
    assert s.trait_unsteered == ev["unsteered"]["coherent_trait"]
    assert s.trait_prompted == ev["prompted"]["coherent_trait"]
    assert s.coherence_steered == best["coherence"]
    gap = s.trait_prompted - s.trait_unsteered
    for closed, steered in [(s.gap_closed, s.trait_steered),
                            (s.random_gap_closed, ev["random"]["coherent_trait"])]:
        if gap:
            assert closed == pytest.approx((steered - s.trait_unsteered) / gap)
        else:
            assert math.isnan(closed)
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe) == {str(layer) for layer in config.layers}
    assert all(0.0 <= acc <= 1.0 for acc in probe.values())
    assert s.probe_accuracy == pytest.approx(
        sum(probe[str(x)] for x in best["layers"]) / len(best["layers"]), rel=1e-12)
    assert s.persona_results == len(load_results(out / "personae")) > 0
    page = (out / "report.html").read_text()
    assert "plotly" in page.lower() and f"pairs kept: {s.pairs_kept}" in page
    return ev


@pytest.mark.slow
@pytest.mark.extended
def test_quick_demo_command_from_the_wheel(site, tmp_path):
    """`steerlab demo --quick` as a user runs it: installed, in a folder of their own."""
    from steerlab.demo import summary_json

    out = tmp_path / "demo"
    run = _from_wheel(site, tmp_path, "-m", "steerlab.cli", "demo", "--quick", "--output-dir",
                      str(out), "--no-progress", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Loading weights" not in run.stderr
    s = summary_json(out / "summary.json")
    for line in s.lines():  # the printed summary is the saved one
        assert line in run.stdout
    _consistent(out, s, DemoConfig.quick())
