"""Chat commands for interventions beyond addition (issue 28, item 4): ``/ablate``, ``/cap``,
``/interventions`` and ``/unsteer``; a reply under them equals ``generate`` under the same
interventions applied by hand (the operators themselves are checked against plain HF hooks
in tests/test_operators.py)."""

from __future__ import annotations

import pytest
import torch
from families import build_family

from steerlab.base.errors import SteerlabError
from steerlab.chat.session import ChatSession
from steerlab.cli._commands import parse_command, run_command
from steerlab.generation.generator import generate
from steerlab.model.loading import load_model
from steerlab.steering.intervention import Steering
from steerlab.steering.vector import SteeringVector


@pytest.fixture(scope="module")
def model(tokenizer, tmp_path_factory):
    return load_model(build_family("llama", tmp_path_factory.mktemp("chat-ops"), tokenizer),
                      device="cpu")


@pytest.fixture(scope="module")
def vector_path(model, tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    vec = SteeringVector(torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=g),
                         tuple(range(model.cfg.n_layers)))
    return str(vec.save(tmp_path_factory.mktemp("vec") / "v"))


def test_ablate_and_cap_commands_steer_the_reply(model, vector_path):
    s = ChatSession(model, max_tokens=8, engine="eager")
    assert run_command(s, parse_command("/interventions")) == "no steering"
    assert run_command(s, parse_command(f"/ablate {vector_path} 1")).startswith("ablate")
    said = run_command(s, parse_command(f"/cap {vector_path} :0.05 2"))
    assert "bounds [open, 0.05]" in said
    assert [i.op.value for i in s.interventions] == ["ablate", "cap"]
    assert s.interventions[1].lo == (float("-inf"),) and s.interventions[1].hi[0] > 0
    listed = run_command(s, parse_command("/interventions")).splitlines()
    assert [line.split()[0] for line in listed] == ["ablate", "cap"]
    ids = s.prompt_ids("Tell me about the sea.")
    reply = s.reply("Tell me about the sea.")
    vec = SteeringVector.load(vector_path)
    by_hand = [Steering.create(model, vec, op="ablate", layers=[1]),
               Steering.create(model, vec, op="cap", bounds=(None, 0.05), layers=[2])]
    with by_hand[0].apply(model), by_hand[1].apply(model):
        want = generate(model, [ids], max_new_tokens=8, engine="eager").tokens[0]
    assert list(reply.tokens) == want
    assert run_command(s, parse_command("/unsteer")) == "steering off"
    assert s.interventions == [] and s.steering is None


@pytest.mark.parametrize("line", ["/cap {v}", "/cap {v} a:b", "/cap {v} : ", "/ablate",
                                  "/ablate {v} 1 2", "/cap {v} 0.5:0.1", "/ablate {v} 99"])
def test_bad_intervention_commands_are_one_usage_line(model, vector_path, line):
    s = ChatSession(model, max_tokens=4)
    with pytest.raises(SteerlabError) as err:
        run_command(s, parse_command(line.format(v=vector_path)))
    assert "usage: /" in str(err.value) and "\n" not in str(err.value)
    assert s.interventions == []
