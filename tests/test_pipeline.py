"""The pirate trait end to end on the embedded model: collect with local responders (positive
vs negative instruction), lexicon judge, score-difference filter; resume; the traits CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from steerlab.base.files import append_jsonl, read_jsonl
from steerlab.cli import app
from steerlab.traits.collection import ROLES, collect, collected_pairs
from steerlab.traits.judging import filter_pairs, judge, scorer_judge
from steerlab.traits.pairs import load_pairs, prompt_id
from steerlab.traits.responders import LocalResponder
from steerlab.traits.trait import load_trait

MAX_TOKENS = 48


@pytest.fixture(scope="session")
def pirate_run(tmp_path_factory, embedded_model):
    """One collect + judge + filter of the shipped pirate questions, shared by the session."""
    t = load_trait("pirate")
    d = tmp_path_factory.mktemp("pirate")
    pos = LocalResponder(embedded_model, t.positive_instructions[0], max_tokens=MAX_TOKENS)
    neg = LocalResponder(embedded_model, t.negative_instructions[0], max_tokens=MAX_TOKENS)
    collect(t.questions, pos, neg, d / "collected.jsonl", samples=1, progress=False)
    judge(d / "collected.jsonl", d / "judged.jsonl", scorer_judge(t.build_scorer()),
          progress=False)
    pairs = filter_pairs(d / "collected.jsonl", d / "judged.jsonl", d / "pairs.jsonl",
                         min_distinct=0.0)
    return dict(dir=d, trait=t, pairs=pairs, pos=pos, neg=neg)


@pytest.mark.slow
def test_filter_keeps_exactly_the_separated_pairs(pirate_run):
    """The kept pairs are the questions whose two answers, rescored from collected.jsonl,
    differ by >= 40 (recomputed here, not a count that moves with the model's text)."""
    pairs, t = pirate_run["pairs"], pirate_run["trait"]
    score = t.build_scorer()
    texts = {(r["id"], r["role"]): r["text"] for r in
             read_jsonl(pirate_run["dir"] / "collected.jsonl") if "text" in r}
    want = [q for q in t.questions if all((prompt_id(q), side) in texts for side in ROLES)
            and score(texts[prompt_id(q), "chosen"]) - score(texts[prompt_id(q), "rejected"])
            >= 40]
    assert [p.prompt for p in pairs] == want and pairs
    for p in pairs:
        assert p.chosen_score - p.rejected_score >= 40
        assert score(p.chosen) == p.chosen_score and score(p.rejected) == p.rejected_score
    assert load_pairs(pirate_run["dir"] / "pairs.jsonl") == pairs
    assert [p.prompt for p in pairs] == [q for q in t.questions if q in {p.prompt for p in pairs}]


@pytest.mark.slow
def test_rerun_skips_done_work_and_judge_resumes(pirate_run, tmp_path):
    d, t = pirate_run["dir"], pirate_run["trait"]
    again = collect(t.questions, pirate_run["pos"], pirate_run["neg"], d / "collected.jsonl",
                    samples=1, progress=False)
    assert (again.written, again.skipped) == (0, 2 * len(t.questions))
    # a judge run cut short (half its lines, the last one torn) resumes to the same result
    lines = (d / "judged.jsonl").read_text().splitlines(keepends=True)
    half = lines[: len(lines) // 2]
    (tmp_path / "judged.jsonl").write_text("".join(half) + lines[len(half)][:10])
    r = judge(d / "collected.jsonl", tmp_path / "judged.jsonl",
              scorer_judge(t.build_scorer()), progress=False)
    assert r.skipped == len(half) and r.written == len(lines) - len(half)
    assert filter_pairs(d / "collected.jsonl", tmp_path / "judged.jsonl",
                        min_distinct=0.0) == pirate_run["pairs"]


@pytest.mark.slow
def test_cli_judge_filter_merge(pirate_run, tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "collected.jsonl").write_text((pirate_run["dir"] / "collected.jsonl").read_text())
    runner = CliRunner()
    res = runner.invoke(app, ["traits", "judge", "pirate", "--run-dir", str(d),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["traits", "filter", "pirate", "--run-dir", str(d),
                              "--threshold", "40", "--min-distinct", "0"])
    assert res.exit_code == 0, res.output
    assert load_pairs(d / "pairs.jsonl") == pirate_run["pairs"]
    original = tmp_path / "filtered.json"
    original.write_text(json.dumps({"Extra?": {"pi_response": "Arr", "llama_response": "No"},
                                    pirate_run["pairs"][0].prompt: {
                                        "pi_response": "dup", "llama_response": "dup"}}))
    res = runner.invoke(app, ["traits", "merge", str(tmp_path / "all.jsonl"),
                              str(d / "pairs.jsonl"), str(original)])
    assert res.exit_code == 0, res.output
    merged = load_pairs(tmp_path / "all.jsonl")
    assert merged[:-1] == pirate_run["pairs"] and merged[-1].prompt == "Extra?"


def test_cli_collect_on_a_tiny_model(tmp_path, tokenizer):
    from conftest import make_tiny_hf

    model_dir = tmp_path / "tiny"
    make_tiny_hf(tokenizer, seed=1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    trait = tmp_path / "t.json"
    trait.write_text(json.dumps({
        "name": "t", "trait_instruction": "x", "positive_instructions": ["Be x."],
        "negative_instructions": ["Be y."], "questions": ["A?", "B?", "C?"],
        "scorer": {"type": "regex", "pattern": "."}}))
    args = ["traits", "collect", str(trait), "--model", str(model_dir), "--run-dir",
            str(tmp_path / "run"), "--max-tokens", "3", "--samples", "1", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "6 answers written, 0 failed" in res.output
    assert len(collected_pairs(tmp_path / "run" / "collected.jsonl")) == 3
    assert "0 answers written" in CliRunner().invoke(app, args).output
    assert {r["responder"] for r in read_jsonl(tmp_path / "run" / "collected.jsonl")} == {
        "local"}
    bad = CliRunner().invoke(app, ["traits", "collect", str(tmp_path / "missing.json")])
    assert bad.exit_code != 0


@pytest.mark.slow
def test_filter_drops_repetition_loops(pirate_run):
    from steerlab.traits.scorers import text_distinct

    d = pirate_run["dir"]
    clean = filter_pairs(d / "collected.jsonl", d / "judged.jsonl", min_distinct=0.5)
    want = [p for p in pirate_run["pairs"]
            if min(text_distinct(p.chosen), text_distinct(p.rejected)) >= 0.5]
    assert clean == want
    # and the filter has work to do: a constructed looping pair is dropped, its twin kept
    loop = "Arr, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye!"
    d2 = d / "loops"
    with append_jsonl(d2 / "c.jsonl") as w, append_jsonl(d2 / "j.jsonl") as j:
        for qid, chosen in (("loop", loop), ("fine", "Ahoy matey, the sea be calm today.")):
            for role, text, sc in (("chosen", chosen, 90), ("rejected", "Hello there.", 0)):
                w({"id": qid, "prompt": qid, "role": role, "responder": "x", "text": text})
                j({"id": qid, "role": role, "score": sc})
    kept = filter_pairs(d2 / "c.jsonl", d2 / "j.jsonl", min_distinct=0.5)
    assert [p.id for p in kept] == ["fine"]
