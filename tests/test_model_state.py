"""steerlab's state of a model lives in one registry beside it: the bridge object gains no
attribute, the state is the same object every call, and it goes when the model does."""

from __future__ import annotations

import gc
import weakref

import torch
from conftest import make_tiny_model

from steerlab.generation.cache import captures, release_workspaces, workspaces
from steerlab.generation.generator import generate
from steerlab.model.state import state
from steerlab.steering.intervention import steer
from steerlab.steering.step_state import in_force, is_generating, listeners
from steerlab.steering.vector import SteeringVector


def test_state_lives_beside_the_model_and_goes_with_it(tokenizer):
    from steerlab.model.attention import use_hf_mixers

    model = make_tiny_model(tokenizer, n_layers=2, seed=4)
    use_hf_mixers(model.original_model, "sdpa")
    attributes = set(vars(model))
    vec = SteeringVector(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), (0, 1))
    with steer(model, vec, 1.0, units="raw"):
        assert len(in_force(model)) == 1 and state(model).steerings == in_force(model)
        generate(model, [[1, 28, 42]], max_new_tokens=3, engine="static")
    assert state(model) is state(model)
    assert not in_force(model) and not listeners(model) and not is_generating(model)
    assert len(workspaces(model)) == 1 and captures(model) == 1
    assert set(vars(model)) == attributes  # nothing hidden on the bridge
    release_workspaces(model)
    assert not workspaces(model) and captures(model) == 0
    generate(model, [[1, 28, 42]], max_new_tokens=3, engine="static")
    kept = weakref.ref(state(model))
    del model
    gc.collect()
    assert kept() is None  # the registry holds the model weakly
