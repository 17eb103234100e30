"""The public API is what the package root and each subpackage list in ``__all__``; this test
holds a copy, so a change to it is a decision (edit the lists here and docs/api.md), never an
accident of a refactor. User-facing code (notebooks, README, docs, benchmarks, experiments)
imports public names only, and steerlab 0.1's flat module paths still import, with a
DeprecationWarning naming the new home."""

from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path

import pytest

import steerlab

ROOT = Path(__file__).resolve().parents[1]

API = {
    "steerlab": [
        "ASSISTANT", "ActivationFile", "ChatSession", "DemoConfig", "Endpoint", "EndpointClient",
        "Engine", "EvalConfig", "Generation", "InferConfig", "LogisticProbe", "MeanDifference",
        "ModelOptions", "Operator", "PCADifference", "Pair", "Persona", "PersonaSpace", "Positions",
        "Steering", "SteeringEval", "SteeringVector", "SteerlabError", "Trait", "Units",
        "__version__", "capture_pairs", "collect", "elicit_trait", "encode_chat", "encode_text",
        "evaluate_steering", "extract", "filter_pairs", "fit_vector", "generate",
        "generate_with_metrics", "judge", "load_model", "load_pairs", "load_personae",
        "load_results", "load_trait", "merge_pairs", "merge_run", "monitor", "patch_chat_template",
        "persona_space", "read_activations", "render_chat", "rubric_judge", "run_demo",
        "run_inference", "save_pairs", "scorer_from_spec", "scorer_judge", "steer",
        "system_prompt_style", "validation_report",
    ],
    "steerlab.base": ["Choice", "SteerlabError", "__version__"],
    "steerlab.chat": ["ChatSession", "Drift", "SteeringChat", "conversation_drift",
                      "load_conversations"],
    "steerlab.evaluation": ["AnswerRater", "EvalConfig", "Setting", "SteeringEval",
                            "ValidationReport", "evaluate_steering", "validation_report",
                            "write_validation"],
    "steerlab.extraction": ["ActivationFile", "ExtractConfig", "LogisticProbe",
                            "MeanDifference", "PCADifference", "capture_pairs", "extract",
                            "fit_vector", "merge_shards", "shuffled_control", "tokenize_pair"],
    "steerlab.generation": ["Engine", "Generation", "NonFiniteError", "SlotBatch",
                            "StepProgram", "bucket_batch", "bucket_capacity", "captures",
                            "count_host_syncs", "generate", "generate_with_metrics",
                            "release_workspaces", "workspaces"],
    "steerlab.inference": ["InferConfig", "PersonaSpace", "RunActivations", "load_prompts",
                           "load_results", "merge_run", "persona_space", "read_activations",
                           "read_per_token", "run_inference", "run_tokenizer",
                           "write_persona_space_page", "write_run_report"],
    "steerlab.model": ["ASSISTANT", "HookPoint", "ModelOptions", "Persona",
                       "embedded_model_dir", "encode_chat", "encode_text", "left_pad",
                       "load_model", "load_personae", "parse_dtype", "patch_chat_template",
                       "render_chat", "system_prompt_style"],
    "steerlab.reporting": ["box_by_category", "categories", "filter_records", "html_table",
                           "lens_heatmap", "persona_space_figures", "steering_figure",
                           "summary_figures", "summary_stats", "write_page"],
    "steerlab.serving": ["VectorShelf", "make_server"],
    "steerlab.steering": ["Operator", "Positions", "Steering", "SteeringVector", "Units", "bake",
                          "monitor", "random_like", "reference_value", "residual_norms",
                          "steer", "with_reference"],
    "steerlab.traits": ["Endpoint", "EndpointClient", "EndpointResponder", "LocalResponder",
                        "Pair", "Trait", "collect", "elicit_trait", "filter_pairs", "judge",
                        "load_pairs", "load_trait", "merge_pairs", "rubric_judge", "save_pairs",
                        "scorer_from_spec", "scorer_judge", "select_pairs"],
}


def public_modules() -> list[str]:
    return ["steerlab", *sorted(f"steerlab.{p.parent.name}" for p in
                                (ROOT / "steerlab").glob("*/__init__.py")
                                if p.parent.name not in {"cli", "builtin"})]


def test_the_public_api_changes_only_on_purpose():
    assert public_modules() == list(API), "a subpackage was added or removed: update API"
    for name, expected in API.items():
        assert sorted(importlib.import_module(name).__all__) == expected, name


@pytest.mark.parametrize("module", list(API))
def test_every_public_name_resolves_and_is_documented(module):
    package = importlib.import_module(module)
    for name in package.__all__:
        value = getattr(package, name)
        if name != "__version__" and not isinstance(value, (str, tuple)):
            assert (value.__doc__ or "").strip(), f"{module}.{name} has no docstring"


IMPORT = re.compile(r"(?:from (steerlab(?:\.\w+)*) import ([\w, ]+)|import (steerlab(?:\.\w+)*))")


def user_facing_sources() -> dict[str, str]:
    out = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                 *sorted((ROOT / "benchmarks").glob("*.py")),
                 *sorted((ROOT / "experiments").rglob("*.py"))]:
        out[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        out[str(path.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells)
    return out


def test_user_facing_code_imports_public_names_only():
    """Notebooks, README, docs, benchmarks and experiments import from the root or a
    subpackage, names in its ``__all__`` (``steerlab.cli``'s ``main`` is the CLI's entry)."""
    wrong = []
    for where, text in user_facing_sources().items():
        for m in IMPORT.finditer(text):
            module = m[1] or m[3]
            if module == "steerlab.cli":
                continue
            if module not in API:
                wrong.append(f"{where}: {m[0]} (not a public module)")
                continue
            names = [n.strip().split(" as ")[0] for n in (m[2] or "").split(",") if n.strip()]
            wrong += [f"{where}: {m[0]} ({n} is not public)" for n in names
                      if n not in API[module]]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("old", "name", "new"), [
    ("steerlab.steer", "Steering", "steerlab.steering.intervention"),
    ("steerlab.vectors", "SteeringVector", "steerlab.steering.vector"),
    ("steerlab.generate", "left_pad", "steerlab.model.inputs"),
    ("steerlab.engine", "count_host_syncs", "steerlab.generation.host_syncs"),
    ("steerlab.report", "write_report", "steerlab.inference.report"),
    ("steerlab.chat", "encode_chat", "steerlab.model.templates"),
    ("steerlab.traits", "list_traits", "steerlab.traits.trait"),
])
def test_old_module_paths_still_import_with_a_warning(old, name, new):
    module = importlib.import_module(old)
    vars(module).pop(name, None)  # looked up once already: the stand-in keeps what it found
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(module, name)
    assert value.__module__ == new
    assert [w.category for w in caught] == [DeprecationWarning]
    assert f"is now {new}." in str(caught[0].message)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018


def test_old_paths_leave_the_root_functions_alone():
    """Importing ``steerlab.generate`` (the 0.1 module) keeps ``steerlab.generate`` the
    function, as it was."""
    importlib.import_module("steerlab.generate")
    importlib.import_module("steerlab.steer")
    assert callable(steerlab.generate) and callable(steerlab.steer)
    with pytest.warns(DeprecationWarning, match="steerlab.decoder_layers is now"):
        assert callable(steerlab.decoder_layers)
