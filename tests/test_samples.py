"""Several samples per question: seeded per question (a resumed collect draws what an
uninterrupted one would), and the filter keeps each question's best-separated loop-free pair."""

from __future__ import annotations

import json

import pytest

from steerlab.base.errors import SteerlabError
from steerlab.base.files import read_jsonl
from steerlab.traits.collection import collect
from steerlab.traits.judging import dropped_path, filter_pairs, judge, select_pairs
from steerlab.traits.responders import LocalResponder, question_seed

QUESTIONS = ["Hi there", "What is rain?", "Name a colour.", "Tell me a joke."]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_best_separated_loop_free_pair_per_question(tmp_path):
    c, j = tmp_path / "c.jsonl", tmp_path / "j.jsonl"
    texts = {  # (question, role, sample): (text, score)
        ("a", "chosen", 0): ("ahoy there friend", 50), ("a", "chosen", 1): ("arr matey ho", 90),
        ("a", "rejected", 0): ("hello there friend", 10),
        ("a", "rejected", 1): ("hi hi hi hi hi hi", 0),  # a loop: never used
        ("b", "chosen", 0): ("arr arr arr arr arr", 100), ("b", "rejected", 0): ("plain", 0),
        ("c", "chosen", 0): ("a bit salty", 30), ("c", "chosen", 1): ("quite salty now", 45),
        ("c", "rejected", 0): ("not salty", 10), ("c", "rejected", 1): ("calm words", 10),
        ("d", "chosen", 0): ("ahoy matey now", 80),
    }
    write(c, [{"id": q, "index": "abcd".index(q), "prompt": f"Q {q}", "role": r, "sample": s,
               "text": t} for (q, r, s), (t, _) in texts.items()])
    write(j, [{"id": q, "role": r, "sample": s, "score": v} for (q, r, s), (_, v) in
              texts.items()])
    sel = select_pairs(c, j, threshold=40.0, min_distinct=0.5)
    assert [(p.id, p.chosen, p.rejected, p.chosen_score - p.rejected_score)
            for p in sel.pairs] == [("a", "arr matey ho", "hello there friend", 80.0)]
    why = {d.id: (d.reason, d.best_difference) for d in sel.dropped}
    assert why == {"b": ("every chosen answer loops", None),
                   "c": ("score difference < 40", 35.0),
                   "d": ("no scored rejected answer", None)}
    assert sel.reasons() == {"every chosen answer loops": 1, "score difference < 40": 1,
                             "no scored rejected answer": 1}
    greedy = select_pairs(c, j, threshold=40.0, min_distinct=0.5, samples=1)
    assert [(p.id, p.chosen) for p in greedy.pairs] == [("a", "ahoy there friend")]
    out = filter_pairs(c, j, tmp_path / "pairs.jsonl", threshold=40.0, min_distinct=0.5)
    assert out == list(sel.pairs)
    assert [r["id"] for r in read_jsonl(dropped_path(tmp_path / "pairs.jsonl"))] == ["b", "c",
                                                                                    "d"]


def test_sampled_collect_resumes_to_the_same_answers(tiny_model, tmp_path):
    a = LocalResponder(tiny_model, "Be loud.", max_tokens=6, batch_size=3)
    b = LocalResponder(tiny_model, "Be quiet.", max_tokens=6, batch_size=3)
    whole = tmp_path / "whole.jsonl"
    r = collect(QUESTIONS, a, b, whole, samples=3, seed=7, progress=False)
    assert (r.written, r.failed) == (2 * 3 * len(QUESTIONS), 0)
    recs = read_jsonl(whole)
    answer = {(x["id"], x["role"], x["sample"]): x["text"] for x in recs}
    # an interrupted run: only some of the records, in another order of arrival
    part = tmp_path / "part.jsonl"
    write(part, recs[1::3])
    again = collect(QUESTIONS, a, b, part, samples=3, seed=7, progress=False)
    assert again.skipped == len(recs[1::3])
    assert {(x["id"], x["role"], x["sample"]): x["text"] for x in read_jsonl(part)} == answer
    # sampled answers really are samples: another seed draws other texts somewhere
    other = tmp_path / "other.jsonl"
    collect(QUESTIONS, a, b, other, samples=3, seed=8, progress=False)
    moved = {(x["id"], x["role"], x["sample"]): x["text"] for x in read_jsonl(other)}
    assert all(moved[k] == v for k, v in answer.items() if k[2] == 0)  # greedy sample 0
    assert any(moved[k] != v for k, v in answer.items() if k[2] > 0)
    from steerlab.traits.judging import scorer_judge

    res = judge(whole, tmp_path / "j.jsonl", scorer_judge(len), progress=False)
    assert res.written == len(recs)
    assert {(x["id"], x["role"], x["sample"]) for x in read_jsonl(tmp_path / "j.jsonl")} == \
        set(answer)


def test_question_seeds_are_stable_and_distinct():
    assert question_seed(0, "a") == question_seed(0, "a")
    assert len({question_seed(s, q) for s in range(5) for q in QUESTIONS}) == 20
    assert all(0 <= question_seed(s, "x") < 2**31 for s in (0, 1, 10**9))


@pytest.mark.parametrize("kwargs,field", [({"samples": 0}, "samples"),
                                          ({"samples": 2, "temperature": 0.0}, "temperature")])
def test_bad_sampling_settings(tiny_model, tmp_path, kwargs, field):
    r = LocalResponder(tiny_model, "x", max_tokens=2)
    with pytest.raises(SteerlabError, match=field):
        collect(QUESTIONS, r, r, tmp_path / "c.jsonl", progress=False, **kwargs)
    assert not (tmp_path / "c.jsonl").exists()
