"""Drift over a conversation (issue 29, item 5): batched scripted conversations equal the chat
session turn by turn; a cap on the axis holds the replies' projections; the terminal chat's
status line and the widget's plot; `steerlab personas drift` and its bad input (exit 2,
before the model loads)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli

from steerlab.base.errors import SteerlabError
from steerlab.chat.drift import conversation_drift, load_conversations
from steerlab.chat.session import ChatSession
from steerlab.steering.intervention import Steering
from steerlab.steering.reference import with_reference
from steerlab.steering.vector import SteeringVector

CONVERSATIONS = [["Hello there.", "Who are you, really?", "Tell me a secret."],
                 ["What is the sea?"],
                 ["Good morning!", "Do you dream?"]]


@pytest.fixture(scope="module")
def axis(tiny_model):
    g = torch.Generator().manual_seed(11)
    vec = SteeringVector(torch.randn(2, tiny_model.cfg.d_model, generator=g), (1, 2))
    rng = np.random.default_rng(0)
    return with_reference(vec, {1: rng.normal(0, 1, 50), 2: rng.normal(0.5, 2, 50)},
                          "seeded draws")


def test_batched_drift_equals_the_session_turn_by_turn(tiny_model, axis):
    drift = conversation_drift(tiny_model, CONVERSATIONS, axis, max_tokens=5, batch_size=2,
                               progress=False)
    assert drift.layer == 2 and drift.projections.shape == (3, 3)
    for i, turns in enumerate(CONVERSATIONS):
        s = ChatSession(tiny_model, max_tokens=5)
        s.watch(axis)
        for t, turn in enumerate(turns):
            reply = s.reply(turn)
            assert drift.replies[i][t] == reply.text
            # one row alone vs a left-padded batch: float32 summation order, ~1e-6 of |h|
            assert drift.projections[i, t] == pytest.approx(reply.mean_projection, rel=1e-4,
                                                            abs=1e-4)
        assert np.isnan(drift.projections[i, len(turns):]).all()
    # no intervention: before == after
    np.testing.assert_array_equal(np.isnan(drift.before), np.isnan(drift.projections))
    ok = np.isfinite(drift.projections)
    np.testing.assert_allclose(drift.before[ok], drift.projections[ok], rtol=1e-6, atol=1e-6)
    want = [np.nanmean(drift.projections[:, t]) for t in range(3)]
    np.testing.assert_allclose(drift.per_turn(), want)
    json.dumps(drift.to_dict(CONVERSATIONS), allow_nan=False)


def test_a_cap_on_the_axis_holds_every_turn(tiny_model, axis):
    plain = conversation_drift(tiny_model, CONVERSATIONS, axis, max_tokens=4, progress=False)
    floor = float(np.nanmax(plain.projections)) + 1.0  # above every plain reply
    cap = Steering.create(tiny_model, axis, op="cap", bounds=(floor, None), units="raw")
    capped = conversation_drift(tiny_model, CONVERSATIONS, axis, interventions=[cap],
                                max_tokens=4, progress=False)
    ok = np.isfinite(capped.projections)
    # every token's projection is at least the floor after the cap (float32 re-projection
    # ~1e-6 of |h|), so the mean is too; before the cap it is the model's own, below it
    assert (capped.projections[ok] >= floor - 1e-3).all()
    assert (capped.before[ok] < floor).all()


def test_conversation_files_and_bad_turns(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps([["a", "b"], {"turns": ["c"]}]))
    assert load_conversations(good) == [["a", "b"], ["c"]]
    for body, field in [([["a"], []], "conversations[1]"),
                        ([{"turns": ["a", 3]}], "conversations[0].turns[1]"),
                        ([["  "]], "conversations[0][0]"),
                        ([["a\ud800"]], "conversations[0][0]"),
                        ({"turns": ["a"]}, None)]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(body))
        with pytest.raises(SteerlabError) as err:
            load_conversations(bad)
        assert "\n" not in str(err.value)
        if field:
            assert f"field '{field}'" in str(err.value), str(err.value)


def test_widget_plots_the_axis_over_turns(tiny_model, axis):
    pytest.importorskip("ipywidgets")
    from steerlab.chat.widget import SteeringChat

    chat = SteeringChat(tiny_model, {"axis": axis}, max_tokens=4, axis=axis)
    replies = [chat.send(t) for t in CONVERSATIONS[0]]
    assert chat.turn_projections == [r.mean_projection for r in replies]
    assert chat.drift_view.value.count("<circle") == 3 and "axis" in chat.status.value
    chat.clear()
    assert chat.turn_projections == [] and chat.drift_view.value == ""
    other = SteeringVector(torch.ones(1, 32), (1,))
    with pytest.raises(SteerlabError, match="d_model 32"):
        SteeringChat(tiny_model, axis=other)


def test_terminal_chat_status_line(tiny_model, axis):
    from steerlab.cli.chat import _status

    s = ChatSession(tiny_model, max_tokens=4)
    assert _status(s, s.reply("Hi")) == ""
    s.watch(axis, 1)
    line = _status(s, s.reply("Hi"))
    assert line.startswith("[axis, layer 1: ") and "before" not in line
    s.add_intervention(axis, "cap", [1], bounds=("90%", None))
    line = _status(s, s.reply("Hi"))
    assert "before the interventions" in line


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    from families import build_family

    return build_family("llama", tmp_path_factory.mktemp("drift"), tokenizer)


def test_personas_drift_cli(model_dir, tmp_path, tokenizer):
    from steerlab.model.loading import load_model

    model = load_model(model_dir, device="cpu")
    g = torch.Generator().manual_seed(2)
    n = model.cfg.n_layers
    vec = SteeringVector(torch.randn(n, model.cfg.d_model, generator=g), tuple(range(n)))
    vec = with_reference(vec, {x: np.linspace(-1, 1, 21) for x in range(n)}, "linear")
    vec.save(tmp_path / "axis")
    convs = tmp_path / "c.json"
    convs.write_text(json.dumps(CONVERSATIONS[:2]))
    out = tmp_path / "drift.json"
    assert run_cli("personas", "drift", "--model", str(model_dir), "--axis",
                   str(tmp_path / "axis"), "--conversations", str(convs), "-o", str(out),
                   "--max-tokens", "3", "--cap", "50%", "--no-progress") == 0
    data = json.loads(out.read_text())
    assert len(data["conversations"]) == 2 and data["cap"] == "50%"
    assert len(data["conversations"][0]["projection"]) == 3
    after = [x for c in data["conversations"] for x in c["projection"] if x is not None]
    assert after and all(math.isfinite(x) for x in after)


@pytest.mark.parametrize("extra, field", [
    (["--cap", "lots"], "cap"),
    (["--layer", "7"], "layers"),
    (["--max-tokens", "0"], "max_tokens"),
])
def test_personas_drift_bad_input_before_the_model_loads(model_dir, tmp_path, tripwire,
                                                         capsys, extra, field):
    SteeringVector(torch.ones(2, 64), (0, 1)).save(tmp_path / "axis")
    convs = tmp_path / "c.json"
    convs.write_text(json.dumps(CONVERSATIONS))
    code = run_cli("personas", "drift", "--model", str(model_dir), "--axis",
                   str(tmp_path / "axis"), "--conversations", str(convs), "-o",
                   str(tmp_path / "o.json"), *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"'{field}'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.json").exists()


def test_an_axis_of_another_width_is_refused(model_dir, tmp_path, tripwire, capsys):
    SteeringVector(torch.ones(2, 32), (0, 1)).save(tmp_path / "axis")
    convs = tmp_path / "c.json"
    convs.write_text(json.dumps(CONVERSATIONS))
    code = run_cli("personas", "drift", "--model", str(model_dir), "--axis",
                   str(tmp_path / "axis"), "--conversations", str(convs), "-o",
                   str(tmp_path / "o.json"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "d_model 32" in err, err
