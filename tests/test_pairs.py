"""Pairs: JSONL round trip, the original filtered format, clear errors for malformed files."""

from __future__ import annotations

import json

import pytest

from steerlab.base.errors import SteerlabError
from steerlab.traits.pairs import Pair, load_pairs, prompt_id, save_pairs


def test_jsonl_round_trip(tmp_path):
    pairs = [Pair("a", "Hi", "Ahoy!", "Hello.", 90.0, 5.0), Pair("b", "Q?", "Arr", "No.")]
    path = save_pairs(pairs, tmp_path / "sub" / "p.jsonl")
    assert load_pairs(path) == pairs
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_missing_id_is_a_stable_hash_and_ints_are_accepted(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Hi", "chosen": "A", "rejected": "B"}) + "\n\n"
                 + json.dumps({"id": 7, "prompt": "Yo", "chosen": "A", "rejected": "B",
                               "chosen_score": 80}) + "\n")
    a, b = load_pairs(f)
    assert a.id == prompt_id("Hi") == load_pairs(f)[0].id
    assert (b.id, b.chosen_score, b.rejected_score) == ("7", 80.0, None)


def test_original_filtered_format(tmp_path):
    f = tmp_path / "filtered.json"
    f.write_text(json.dumps({"What is love?": {"pi_response": "warm", "llama_response": "cold"},
                             "Hi": {"pi_response": "hey!", "llama_response": "hello"}}))
    pairs = load_pairs(f)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("What is love?", "warm", "cold"), ("Hi", "hey!", "hello")]
    assert pairs[1].id == prompt_id("Hi")


@pytest.mark.parametrize("content, where", [
    ('{"prompt": "Hi", "chosen": "A", "rejected": "B"}\n{oops\n', "p.jsonl:2"),
    ('{"prompt": "Hi", "chosen": "A"}\n', "'rejected'"),
    ('{"prompt": "Hi", "chosen": "A", "rejected": "B", "chosen_score": "high"}\n',
     "'chosen_score'"),
    ('[1, 2]\n', "expected a JSON object"),
    ('{"Hi": {"pi_response": "A"}}', "llama_response"),
    ('{"Hi": "just a string"}', "pi_response"),
])
def test_malformed_files_name_file_line_and_field(tmp_path, content, where):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(SteerlabError, match="p.jsonl") as e:
        load_pairs(f)
    assert where in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(SteerlabError, match="no such file"):
        load_pairs(tmp_path / "nope.jsonl")
