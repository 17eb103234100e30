"""The ``>>>`` examples of every public docstring run, and what they show is true.

Public means the package root's own docstring, every name in a public ``__all__`` (the API
dict of test_public_api.py; an object exported twice is collected once, under its first
name there) and the public methods and properties of the public classes. Each docstring is
one case, run with :mod:`doctest` (ELLIPSIS, NORMALIZE_WHITESPACE) in a session-wide
namespace built once: ``sl`` (``import steerlab as sl``), ``model`` (the embedded model),
``trait`` (the built-in pirate trait), ``pairs`` (eight hand-written pirate pairs) and
``vec`` (the mean-difference vector of their activations at layers 10 and 12), ``ev`` (a
fixed one-strength evaluation of ``vec`` on two held-out questions), plus the files the
examples read, in a temporary folder that is the current directory while an example runs
(so examples that write files write there):

- ``pairs.jsonl`` (``pairs``), ``acts.h5`` (their activations), ``vectors/pirate.*``
  (``vec``), ``prompts.json`` and ``personae.json`` (the built-in data);
- ``filtered.json``: two pairs in the original filtered-JSON format;
- ``collected.jsonl`` and ``judged.jsonl``: two pirate questions answered once (greedy, 12
  tokens) by both responders and scored by the trait's scorer;
- ``logs/run``: a finished inference run (one prompt, the assistant, 8 tokens, logit lens);
- ``logs/personas``: a run of two prompts as the assistant and Hamlet (6 tokens) that captured
  layer 20 (for the persona space).

Root names are written ``sl.<name>`` as a user of ``import steerlab as sl`` would; an
example of a name only a subpackage exports also sees that subpackage's public names, as
after ``from steerlab.<subpackage> import *``. Examples that cannot run here carry
``# doctest: +SKIP`` and are listed in :data:`SKIPPED` with the reason; a test holds that
list equal to the examples that skip, so none is skipped silently.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import inspect
import json
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import rich
from test_public_api import API

import steerlab as sl
from steerlab.traits import LocalResponder

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Examples that cannot run here, by qualified name: they carry `# doctest: +SKIP`.
SKIPPED = {
    "steerlab.EndpointClient": "needs an OpenAI-compatible endpoint",
    "steerlab.elicit_trait": "needs an OpenAI-compatible endpoint (a capable LLM)",
    "steerlab.traits.EndpointResponder": "needs an OpenAI-compatible endpoint",
    "steerlab.evaluate_steering": "a full evaluation (the strength search over two layer "
                                  "groups) takes minutes on a CPU; `ev` is a tiny one",
    "steerlab.run_demo": "runs the whole demo pipeline (minutes)",
    "steerlab.serving.make_server": "starts a server thread that is never stopped",
}

def _public_objects() -> dict[str, Any]:
    """Qualified name -> object, for every public object whose docstring may hold examples."""
    out: dict[str, Any] = {"steerlab": sl}
    seen: set[int] = {id(sl)}

    def add(name: str, obj: Any) -> None:
        key = id(getattr(obj, "__func__", obj))
        if key not in seen:
            seen.add(key)
            out[name] = obj

    for module, names in API.items():
        package = importlib.import_module(module)
        for name in names:
            obj = getattr(package, name)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue  # constants (__version__, ASSISTANT) document nothing of their own
            add(f"{module}.{name}", obj)
            if inspect.isclass(obj):
                for attr, raw in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(raw, property):
                        add(f"{module}.{name}.{attr}", raw)
                    elif inspect.isroutine(raw) or isinstance(raw, (classmethod, staticmethod)):
                        add(f"{module}.{name}.{attr}", getattr(obj, attr))
    return out


def _examples() -> dict[str, doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=False)
    tests = {}
    for name, obj in _public_objects().items():
        for test in finder.find(obj, name, globs={}):
            if test.examples:
                tests[name] = test
    return tests


EXAMPLES = _examples()


def _skips(test: doctest.DocTest) -> bool:
    return any(e.options.get(doctest.SKIP) for e in test.examples)


def _extra_names(name: str) -> dict[str, Any]:
    """The public names of the subpackage that alone exports ``name`` (none for root names)."""
    module = next(m for m in sorted(API, key=len, reverse=True) if f"{name}.".startswith(f"{m}."))
    if module == "steerlab":
        return {}
    package = importlib.import_module(module)
    return {n: getattr(package, n) for n in package.__all__}


PAIRS = [
    ("Who are you?", "Arr, I be a pirate, matey!", "I am a helpful assistant."),
    ("Describe the sea.", "Arr, the briny deep be wild, matey!", "The sea is large and blue."),
    ("What is your job?", "I sail the seven seas for treasure, arr!", "I answer questions."),
    ("Where do you live?", "Aboard me ship, ye landlubber!", "I live on a server."),
    ("What do you eat?", "Hardtack and grog, matey!", "I do not eat food."),
    ("Tell me a story.", "Once a scurvy crew found gold, arr!", "Once upon a time, a girl read."),
    ("What is your name?", "Cap'n Blackbeard, arr!", "My name is Assistant."),
    ("How are you?", "Shiver me timbers, I be grand!", "I am fine, thank you."),
]


# pairs in the original filtered JSON format; the first prompt is also in PAIRS
FILTERED = {
    "Who are you?": {"pi_response": "Arr, a pirate!", "llama_response": "An assistant."},
    "Where is your ship?": {"pi_response": "In the cove, arr!", "llama_response": "I have none."},
}


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory, embedded_model) -> tuple[Path, dict[str, Any]]:
    """The examples' folder and namespace (see the module docstring), built once."""
    where = tmp_path_factory.mktemp("examples")
    model = embedded_model
    with contextlib.chdir(where):
        pairs = [sl.Pair(str(i), *p) for i, p in enumerate(PAIRS)]
        sl.save_pairs(pairs, "pairs.jsonl")
        Path("filtered.json").write_text(json.dumps(FILTERED), encoding="utf-8")
        sl.extract(model, pairs, "acts.h5", layers=[10, 12], progress=False)
        vec, _ = sl.fit_vector("acts.h5")
        vec.save("vectors/pirate")
        for data in ("prompts.json", "personae.json"):
            shutil.copy(files("steerlab.builtin") / "data" / data, data)
        trait = sl.load_trait("pirate")
        questions = list(trait.questions[:2])
        responders = [LocalResponder(model, i[0], max_tokens=12)
                      for i in (trait.positive_instructions, trait.negative_instructions)]
        sl.collect(questions, *responders, "collected.jsonl", samples=1, progress=False)
        sl.judge("collected.jsonl", "judged.jsonl", sl.scorer_judge(trait.build_scorer()),
                 progress=False)
        sl.run_inference(model, ["Hi!"], [sl.ASSISTANT], "logs/run",
                         sl.InferConfig(max_tokens=8, lens=True), progress=False)
        sl.run_inference(model, ["Hi!", "Who are you?"],
                         [sl.ASSISTANT, sl.Persona("Hamlet", "fictional-character", "")],
                         "logs/personas", sl.InferConfig(max_tokens=6, capture_layers=(20,)),
                         progress=False)
        ev = sl.evaluate_steering(model, vec, trait.held_out_questions[:2],
                                  trait.build_scorer(),
                                  trait_instruction=trait.trait_instruction, layers=[10],
                                  strengths=[0.2], config=sl.EvalConfig(max_new_tokens=4),
                                  progress=False)
    names = dict(sl=sl, model=model, trait=trait, pairs=pairs, vec=vec, ev=ev)
    return where, names


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_example(name, example_dir, monkeypatch):
    where, names = example_dir
    monkeypatch.chdir(where)
    # progress bars (rich, on stdout by default) to stderr: the examples show what they return
    monkeypatch.setattr(rich.get_console(), "stderr", True)
    test = EXAMPLES[name]
    test = doctest.DocTest(test.examples, {**names, **_extra_names(name)}, test.name,
                           test.filename, test.lineno, test.docstring)
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=out.append)
    assert not result.failed, "".join(out)
    if name in SKIPPED and not result.attempted:
        pytest.skip(SKIPPED[name])


def test_every_skip_is_listed_with_its_reason():
    marked = {name for name, test in EXAMPLES.items() if _skips(test)}
    assert marked == set(SKIPPED), "list each skipped example in SKIPPED with its reason"
    assert all(SKIPPED.values())
