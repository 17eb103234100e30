"""Trait files and built-in scorers: shipped traits load, schema errors are clear."""

from __future__ import annotations

import json

import pytest

from steerlab.base.errors import SteerlabError
from steerlab.traits.scorers import (
    SCORERS,
    emoji_rate_scorer,
    lexicon_scorer,
    regex_scorer,
    scorer_from_spec,
)
from steerlab.traits.trait import Trait, list_traits, load_trait, trait_dirs


@pytest.mark.parametrize("name", ["cowboy", "pirate", "emoji", "playful", "formatting"])
def test_shipped_traits_load(name):
    t = load_trait(name)
    assert t.name == name and t.trait_instruction
    assert t.positive_instructions and t.negative_instructions and t.questions
    assert t.held_out_questions and not set(t.questions) & set(t.held_out_questions)
    assert "{answer}" in t.evaluation_prompt
    if t.scorer is not None:
        assert 0.0 <= t.build_scorer()("Hello there, how are you?") <= 100.0


def test_pirate_has_enough_questions_and_a_lexicon():
    t = load_trait("pirate")
    assert len(t.questions) >= 45 and len(t.held_out_questions) >= 12
    score = t.build_scorer()
    assert score("Arr, ahoy matey! Ye be a fine sailor, aye.") == 100.0
    assert score("The weather today is mostly sunny with a light breeze.") == 0.0


BUILTIN = ["cowboy", "emoji", "formatting", "pirate", "playful"]


def test_builtin_traits_are_package_data_and_cwd_traits_come_first(tmp_path, monkeypatch):
    from importlib.resources import files

    monkeypatch.chdir(tmp_path)  # no ./traits: only the built-in ones
    builtin = files("steerlab.builtin") / "traits"
    assert trait_dirs() == [tmp_path / "traits", builtin]
    assert list_traits() == {name: builtin / f"{name}.json" for name in BUILTIN}
    Trait("pirate", "talks like a parrot").save(tmp_path / "traits" / "pirate.json")
    Trait("mine", "does mine").save(tmp_path / "traits" / "mine.json")
    (tmp_path / "traits" / "notes.txt").write_text("not a trait")
    found = list_traits()
    assert list(found) == sorted([*BUILTIN, "mine"])
    assert found["pirate"] == tmp_path / "traits" / "pirate.json"  # hides the built-in
    assert found["emoji"] == builtin / "emoji.json"
    assert load_trait("pirate").trait_instruction == "talks like a parrot"
    assert load_trait("mine").name == "mine"
    with pytest.raises(SteerlabError, match="known traits: .*'mine'"):
        load_trait("nope")


def test_traits_list_command(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    Trait("mine", "does mine", questions=("a?", "b?")).save(tmp_path / "traits" / "mine.json")
    (tmp_path / "traits" / "bad.json").write_text("{")
    assert run_cli("traits", "list") == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert list(rows) == sorted([*BUILTIN, "mine", "bad"])
    for name, row in rows.items():
        assert str(list_traits()[name]) in row
        if name != "bad":
            assert row.endswith(str(list_traits()[name]))
            t = load_trait(name)
            assert f"{len(t.questions)} questions" in row
            assert f"{len(t.held_out_questions)} held out" in row
    assert "scorer lexicon" in rows["pirate"] and "scorer llm-rubric" in rows["playful"]
    assert "2 questions   0 held out  scorer none" in rows["mine"]
    assert "invalid" in rows["bad"] and "line 1" in rows["bad"]


def test_save_load_round_trip(tmp_path):
    t = load_trait("pirate")
    assert load_trait(t.save(tmp_path / "p.json")) == t
    small = Trait("x", "does x")
    assert json.loads(small.save(tmp_path / "x.json").read_text()) == {
        "name": "x", "trait_instruction": "does x"}
    assert small.replace(questions=["q?"]).questions == ("q?",)


@pytest.mark.parametrize("data, field", [
    ({"trait_instruction": "x"}, "'name'"),
    ({"name": "x", "trait_instruction": ""}, "'trait_instruction'"),
    ({"name": "x", "trait_instruction": "y", "questions": "one?"}, "'questions'"),
    ({"name": "x", "trait_instruction": "y", "questions": ["a", 3]}, "'questions'"),
    ({"name": "x", "trait_instruction": "y", "colour": "red"}, "unknown field"),
    ({"name": "x", "trait_instruction": "y", "evaluation_prompt": "rate it"}, "{answer}"),
    ({"name": "x", "trait_instruction": "y", "scorer": {"type": "vibes"}}, "unknown scorer"),
    ({"name": "x", "trait_instruction": "y", "scorer": {"type": "lexicon", "words": []}},
     "'words'"),
    ({"name": "x", "trait_instruction": "y", "scorer": {"type": "regex", "pattern": "("}},
     "invalid regular expression"),
    ({"name": "x", "trait_instruction": "y", "scorer": {"type": "regex", "patern": "a"}},
     "unknown option"),
])
def test_malformed_trait_files(tmp_path, data, field):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(SteerlabError, match="bad.json") as e:
        load_trait(f)
    assert field in str(e.value)


def test_bad_json_and_unknown_names(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('{"name": "x",\n "trait_instruction": }')
    with pytest.raises(SteerlabError, match="line 2"):
        load_trait(f)
    with pytest.raises(SteerlabError, match="known traits: .*pirate"):
        load_trait("no-such-trait")
    with pytest.raises(SteerlabError, match="no built-in scorer"):
        Trait("x", "y").build_scorer()


def test_lexicon_scorer_counts_whole_words_and_phrases():
    s = lexicon_scorer(["arr", "shiver me timbers"], saturation=0.5)
    assert s("") == 0.0
    assert s("arr arr") == 100.0
    assert s("arr one two three") == pytest.approx(50.0)  # 1/4 hits, saturation 1/2
    assert s("Shiver me timbers, friend") == pytest.approx(50.0)  # 1 phrase / 4 words
    assert s("barrel harrowing arrow") == 0.0


def test_regex_and_emoji_scorers():
    md = regex_scorer(r"^\s*[-*]\s", saturation=4)
    assert md("- a\n- b\nplain") == 50.0 and md("no list") == 0.0
    e = emoji_rate_scorer(saturation=0.5)
    assert e("plain words only") == 0.0
    assert e("hi 🎉") == 100.0
    assert e("one two three 🎉") == pytest.approx(50.0)


def test_scorer_from_spec_uses_the_factory_table():
    assert set(SCORERS) == {"lexicon", "regex", "emoji_rate"}
    s = scorer_from_spec({"type": "lexicon", "words": ["ahoy"]})
    assert s("ahoy") == 100.0
    with pytest.raises(SteerlabError, match="cfg.yaml.*expected one of"):
        scorer_from_spec({"type": 3}, source="cfg.yaml")


def test_text_distinct_flags_loops():
    from steerlab.traits.scorers import distinct_n, text_distinct

    assert text_distinct("Boil the water, then add the egg for nine minutes.") == 1.0
    loop = "Aye, me hearty, me hearty, me hearty, me hearty, me hearty, me hearty!"
    words = ["aye", ","] + ["me", "hearty", ","] * 5 + ["me", "hearty", "!"]
    assert text_distinct(loop) == distinct_n(words) == pytest.approx(5 / 19)
    assert text_distinct("Hi") == 1.0  # too short to repeat
