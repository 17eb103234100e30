"""Regenerate docs/models.md: the architecture matrix (``tests/test_families.py``) as a table.

Usage: ``make models-table`` (or ``python docs/gen_models.py``; a few minutes on 2 cores). It
runs the matrix in-process with a pytest plugin that records each test's outcome under its
(family, path) cell (``PATH_OF`` in ``tests/families.py``), then rewrites the whole page: ✓
where every test of the cell passed, ✗ with a numbered note (the error's first line and its
tests) where one failed, — where none applies (no real chat template in the fixtures, no
thinking switch, or a template steerlab refuses by design, with the reason). The exit code is
0 whatever the cells say: the page is the report.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
DOC = Path(__file__).with_name("models.md")
sys.path.insert(0, str(TESTS))

from families import FAMILIES, PATH_OF, PATHS, WINDOW  # noqa: E402  (imports no steerlab)

INTRO = f"""# Models

Which model families steerlab runs, path by path. Each row is a tiny random-weight model of
the family (d_model 64, 4 layers, built from its HF config by `tests/families.py`, saved with
the embedded tokenizer) loaded with `steerlab.load_model(folder, device="cpu")` and no other
argument, and checked by `tests/test_families.py` against plain HF on the same weights (never a
bridge; greedy decoding by full forwards, no KV cache). The sliding-window families get a
{WINDOW}-token window, shorter than every prompt (20-40 tokens, left-padded into one batch) and
every generation. Tokens may part only at a tie of the reference's logits; metrics and
activations agree to float32 rounding (the test file says how much).
"""

CHECKED = {
    "load": "default settings load; a forward's logits equal HF's",
    "eager, static": "greedy `generate` equals HF per prompt; `generate_with_metrics`' entropy "
                     "and top-5 mass equal `Categorical` on HF's logits of the same tokens "
                     "(engine `eager` / `static`)",
    "capture": "`capture_pairs` at layers 0 and 2 (divergence point and response mean) equals "
               "HF `output_hidden_states`",
    "steering": "a raw-unit `steer` generation (both engines) equals HF with a forward hook "
                "adding the vector to the layer's output; capture → mean difference → a "
                "norm-unit steered generation, hooks gone afterwards",
    "lens": "the logit lens at the last layer equals the model's own entropy and top-5 mass",
    "persona template": "the family's real chat template (`tests/fixtures/chat_templates/`) "
                        "relabelled for a persona, and a generation from it",
    "thinking": "the template's thinking switch (`enable_thinking`) closes an empty think "
                "block, with and without a persona",
}

OUTRO = """
## Outside the matrix

Every architecture gets the same default load (`attn_implementation="auto"`: the kernel HF
picks, HF's own attention modules), and either runs or fails at load in one line
(`tests/test_architectures.py` checks each case below on a tiny model):

- linear-attention hybrids (Qwen3-Next): load, and the eager engine equals HF's forward;
  `engine="static"` and `serve --engine static` are refused in one line naming
  `linear_attention`, and `auto` takes eager with one info line.
- a cache steerlab cannot carry (RecurrentGemma): refused at load, `... cannot generate
  through its cache in steerlab (...)`.
- no TransformerLens bridge (Gemma-3n text): refused at load, `TransformerLens has no bridge
  for the architecture ...`.
- an explicit kernel the architecture lacks (`--attn-implementation sdpa` on Gemma-2): refused
  at load, naming the kernels it can use.

Regenerate after a change to the library or to `tests/families.py`: `make models-table`
(about a minute on 2 cores; `tests/test_families.py` runs in `make test` too, and a test checks
that this page lists exactly the families of `tests/families.py`).
"""


class Outcomes:
    """A pytest plugin: the outcome of every test of a (family, path) cell."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], list[tuple[str, str, str]]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "family" not in params or item.originalname not in PATH_OF:
            return
        if report.when != "call" and report.passed:
            return  # setup and teardown count only when they fail or skip
        path = PATH_OF[item.originalname].format(**params)
        name = item.name
        self.cells.setdefault((params["family"], path), []).append(
            (report.outcome, name, _message(report)))


def _message(report) -> str:
    """The error's first lines (or a skip's reason), short and without module prefixes."""
    if report.passed:
        return ""
    if report.skipped:
        text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        text = text.removeprefix("Skipped: ")
    else:
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr)
    line = ""
    for part in (x.strip() for x in text.splitlines()):
        if part and len(line) < 120:  # a first line that says little takes the next one
            line = f"{line} {part}".strip()
    line = re.sub(r"\b(?:[a-z_]\w*\.)+(\w*(?:Error|Exception|Violation))\b", r"\1", line)
    line = line.replace("`", "'").replace(".;", ";")
    return line if len(line) <= 240 else line[:237] + "..."


def cell(results: list[tuple[str, str, str]] | None, notes: dict[str, list[str]]) -> str:
    """✓, ✗ (notes) or — for one cell; failures and refusals add their message to ``notes``
    (one note per distinct message, naming its tests)."""
    if not results:
        return "—"
    failed = [(n, m) for o, n, m in results if o == "failed"]
    if failed:
        mark, shown = "✗", failed
    elif any(o == "passed" for o, _, _ in results):
        return "✓"
    else:
        mark, shown = "—", [(n, m) for _, n, m in results if m.startswith("refused")]
    refs = []
    for name, message in shown:
        notes.setdefault(message, []).append(name)
        refs.append(list(notes).index(message) + 1)
    refs = sorted(set(refs))
    return f"{mark} ({', '.join(map(str, refs))})" if refs else mark


def page(outcomes: Outcomes) -> str:
    notes: dict[str, list[str]] = {}
    rows = ["| family | key | " + " | ".join(PATHS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in PATHS) + " |"]
    for key, (name, _, _) in FAMILIES.items():
        cells = [cell(outcomes.cells.get((key, p)), notes) for p in PATHS]
        rows.append(f"| {name} | `{key}` | " + " | ".join(cells) + " |")
    stack = ", ".join(f"{p} {version(p).split('+')[0]}" for p in ("transformers",
                                                                  "transformer-lens", "torch"))
    checked = ["| path | what is checked |", "| --- | --- |",
               *(f"| {p} | {text} |" for p, text in CHECKED.items())]
    out = [INTRO, *checked, "", f"Measured with {stack}.\n", *rows, ""]
    if notes:
        out += ["Notes:", ""]
        for i, (message, tests) in enumerate(notes.items(), 1):
            out.append(f"{i}. `{message}` ({', '.join(f'`{t}`' for t in tests)})")
        out.append("")
    return "\n".join(out) + OUTRO


def main() -> int:
    outcomes = Outcomes()
    pytest.main([str(TESTS / "test_families.py"), "-q", "-p", "no:cacheprovider",
                 "-k", "not models_page", "--no-header", "-rN"], plugins=[outcomes])
    DOC.write_text(page(outcomes), encoding="utf-8")
    failed = sum(o == "failed" for rs in outcomes.cells.values() for o, _, _ in rs)
    print(f"wrote {DOC.relative_to(ROOT)} ({failed} failed tests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
