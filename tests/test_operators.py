"""Interventions beyond addition (issue 28): ``ablate``, ``cap``, ``set`` and ``add`` on both
engines, batched, left-padded, with per-row shares, against plain forward hooks on a
separately loaded HF model written here; invariants of the operators; the order within a
layer (projection operators first, then additions)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_tokens
from families import build_family

from steerlab.base.errors import SteerlabError
from steerlab.generation.generator import generate
from steerlab.model.loading import load_model
from steerlab.steering.intervention import Steering
from steerlab.steering.vector import SteeringVector

NEW = 10
# greedy paths whose logits differ by float32 reordering (batch shape, padding, the static
# cache's masked capacity): a few dozen eps of the logits' scale at most
EPS_UNITS = 64
LAYERS = (1, 2)


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    return build_family("llama", tmp_path_factory.mktemp("ops"), tokenizer)


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder, device="cpu")


@pytest.fixture(scope="module")
def ref(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def vec(model):
    g = torch.Generator().manual_seed(0)
    n = model.cfg.n_layers
    return SteeringVector(torch.randn(n, model.cfg.d_model, generator=g), tuple(range(n)))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["Tell me a long story about the sea, the sky and the wind, please", "Hi"]
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def _reference_edit(s: Steering, row_share: float):
    """The operator as this test writes it: what one layer's output becomes (one row)."""
    def edit(h: torch.Tensor, layer: int) -> torch.Tensor:
        i = s.layers.index(layer)
        v = s.vector.direction(layer).float()
        if s.op.value == "add":
            return h + row_share * s.scale[i] * v
        u = v / v.norm()
        p = h @ u
        lo = -math.inf if s.lo[i] == -math.inf else s.lo[i]
        target = p.clamp(min=lo, max=s.hi[i])
        return h + row_share * (target - p)[..., None] * u
    return edit


def _hooked_greedy(ref, steerings: list[tuple[Steering, float]], prompt: list[int], n: int):
    """HF alone, no cache, with forward hooks applying ``steerings`` (each with this row's
    share) at their layers in the given order: the reference tokens and the hooked model."""
    handles = []
    for layer in range(len(ref.model.layers)):
        here = [(_reference_edit(s, share), s) for s, share in steerings if layer in s.layers]
        if not here:
            continue

        def hook(module, args, out, here=here, layer=layer):
            h = out[0] if isinstance(out, tuple) else out
            for edit, _ in here:
                h = edit(h, layer)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handles.append(ref.model.layers[layer].register_forward_hook(hook))
    try:
        x = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(n):
                nxt = ref(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                x = torch.cat([x, nxt], 1)
        return x[0, len(prompt):].tolist(), handles
    except BaseException:
        for h in handles:
            h.remove()
        raise


def _check(model, ref, prompts, steerings, shares, engine):
    """steerlab's batch (one Steering list for all rows, per-row shares) against each row
    alone through the hooked reference."""
    applied = [s.with_alpha(tuple(share)) for s, share in zip(steerings, shares, strict=True)]
    with contextlib_stack(applied, model):
        got = generate(model, prompts, max_new_tokens=NEW, engine=engine).tokens
    for row, prompt in enumerate(prompts):
        per_row = [(s, share[row]) for s, share in zip(steerings, shares, strict=True)]
        want, handles = _hooked_greedy(ref, per_row, prompt, NEW)
        try:
            assert_same_tokens(SimpleNamespace(original_model=ref), prompt, got[row][:NEW],
                               want[: len(got[row])], eps_units=EPS_UNITS)
        finally:
            for h in handles:
                h.remove()


class contextlib_stack:  # noqa: N801 - a tiny ExitStack of Steering.apply
    def __init__(self, steerings, model):
        import contextlib

        self.stack, self.steerings, self.model = contextlib.ExitStack(), steerings, model

    def __enter__(self):
        for s in self.steerings:
            self.stack.enter_context(s.apply(self.model))

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


OPS = {
    "ablate": dict(op="ablate"),
    "cap-hi": dict(op="cap", bounds=(None, 0.02)),
    "cap-lo": dict(op="cap", bounds=(0.3, None)),
    "cap-both": dict(op="cap", bounds=(-0.05, 0.05)),
    "set": dict(op="set", target=0.4),
    "add": dict(op="add"),
}


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("name", list(OPS))
def test_operator_equals_plain_hooks_on_hf(model, ref, vec, prompts, name, engine):
    s = Steering.create(model, vec, 0.5 if name == "add" else 1.0, layers=LAYERS, **OPS[name])
    shares = [(1.0, 0.5)] if name != "add" else [(0.5, -0.5)]  # per row
    _check(model, ref, prompts, [s], shares, engine)


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_projection_operators_act_before_additions_in_a_layer(model, ref, vec, prompts,
                                                              engine):
    add = Steering.create(model, vec, 0.4, layers=[1])
    cap = Steering.create(model, vec, op="cap", bounds=(None, 0.0), layers=[1])
    ablate = Steering.create(model, vec.select([2]) * -1.0, op="ablate", layers=[2])
    # given add first: the cap still acts first, so the addition survives it (the reference
    # applies them in the documented order: cap, then add)
    applied = [add.with_alpha((0.4, 0.4)), cap.with_alpha((1.0, 1.0)),
               ablate.with_alpha((1.0, 0.0))]
    with contextlib_stack(applied, model):
        got = generate(model, prompts, max_new_tokens=NEW, engine=engine).tokens
    for row, prompt in enumerate(prompts):
        order = [(cap, 1.0), (add, 0.4), (ablate, (1.0, 0.0)[row])]
        want, handles = _hooked_greedy(ref, order, prompt, NEW)
        try:
            assert_same_tokens(SimpleNamespace(original_model=ref), prompt, got[row],
                               want[: len(got[row])], eps_units=EPS_UNITS)
        finally:
            for h in handles:
                h.remove()


def _outputs(model, s: Steering, prompt) -> dict[int, torch.Tensor]:
    """Each steered layer's output as the next layer receives it, under ``s`` (hooks)."""
    hf = model.original_model
    seen: dict[int, torch.Tensor] = {}
    handles = [hf.model.layers[layer + 1].register_forward_pre_hook(
        lambda mod, args, kwargs, layer=layer: seen.__setitem__(
            layer, (args[0] if args else kwargs["hidden_states"])[0].clone()),
        with_kwargs=True) for layer in s.layers]
    try:
        with s.apply(model), torch.no_grad():
            hf(input_ids=torch.tensor([prompt]))
    finally:
        for h in handles:
            h.remove()
    return seen


def test_after_ablate_the_projection_is_zero_and_after_cap_within_bounds(model, vec, prompts):
    ablate = Steering.create(model, vec, op="ablate", layers=LAYERS)
    for layer, h in _outputs(model, ablate, prompts[0]).items():
        v = vec.direction(layer).float()
        p = (h @ (v / v.norm())) / h.norm(dim=-1)
        assert float(p.abs().max()) < 1e-6, (layer, p)  # float32 rounding of a d=64 sum
    cap = Steering.create(model, vec, op="cap", bounds=(-0.01, 0.01), layers=LAYERS)
    for i, (layer, h) in enumerate(_outputs(model, cap, prompts[0]).items()):
        v = vec.direction(layer).float()
        p = h @ (v / v.norm())
        slack = 1e-6 * float(h.norm(dim=-1).max())  # float32 rounding of the projection
        assert float(p.max()) <= cap.hi[i] + slack and float(p.min()) >= cap.lo[i] - slack
        assert float(p.max()) > cap.hi[i] - slack or float(p.min()) < cap.lo[i] + slack


@pytest.mark.parametrize("kwargs, field", [
    (dict(op="cap"), "bounds"),
    (dict(op="cap", bounds=(None, None)), "bounds"),
    (dict(op="cap", bounds=(0.5, 0.1)), "bounds"),
    (dict(op="cap", bounds=(float("nan"), 1.0)), "alpha"),
    (dict(op="cap", bounds=(None, 1e30), units="raw"), "bounds"),
    (dict(op="set"), "target"),
    (dict(op="set", target=float("inf")), "alpha"),
    (dict(op="ablate", bounds=(0, 1)), "op"),
    (dict(op="add", target=1.0), "op"),
    (dict(op="ablate", alpha=2.0), "alpha"),
    (dict(op="ablate", preserve_norm=True), "preserve_norm"),
    (dict(op="clamp"), "op"),
])
def test_bad_operator_values_are_one_line_errors(model, vec, kwargs, field):
    kwargs = dict(kwargs)
    alpha = kwargs.pop("alpha", 1.0)
    with pytest.raises(SteerlabError) as err:
        Steering.create(model, vec, alpha, layers=[1], **kwargs)
    assert f"field '{field}'" in str(err.value) and "\n" not in str(err.value)
