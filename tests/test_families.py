"""The architecture matrix: every family of ``tests/families.py`` loaded with steerlab's
defaults (``load_model(folder, device="cpu")``, nothing else) against plain HF on the same
weights.

The reference is ``AutoModelForCausalLM.from_pretrained`` of the same folder, never booted as a
bridge, with HF's own default attention, and greedy decoding is a loop of full forwards with no
KV cache at all: nothing a cache gets wrong (a sliding window, a renamed keyword) can move it.
The prompts (20-40 tokens, left-padded into one batch) and the generations (12 tokens) are
longer than the sliding windows (8 tokens). Per family: load, greedy tokens and per-step
metrics on both engines, capture, steering against a plain torch hook, the logit lens at the
last layer, capture -> fit -> steer, and the family's real chat template (persona, thinking)
where the fixtures have it. ``docs/gen_models.py`` runs this file and writes the outcome of
each (family, path) (``families.PATH_OF``) to ``docs/models.md``.

Tolerances: steerlab and the reference run the same float32 weights through other kernels
(sdpa or eager), shapes (a padded batch, a cache) and summation orders. No reduction in these
models is longer than 128 terms except the unembedding, so two paths' logits agree to ~128 eps
of each row's largest logit (``EPS_UNITS``); tokens may part only where the reference shows a
tie at that resolution (``assert_same_tokens``), and metrics follow from that logit bound
(``metric_tolerances``).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    EPS32,
    assert_close_to_scale,
    assert_same_tokens,
    matmul_delta,
    metric_tolerances,
)
from families import FAMILIES, N_LAYERS, PATHS, TEMPLATE_DIR, TEMPLATES, WINDOW, build_family

from steerlab.base.errors import SteerlabError
from steerlab.extraction.capture import capture_pairs
from steerlab.extraction.fitters import MeanDifference
from steerlab.generation.generator import generate, generate_with_metrics
from steerlab.generation.metrics import top_k_mass
from steerlab.model.hooks import decoder_layers, hidden_of, replace_hidden
from steerlab.model.inputs import stop_token_ids
from steerlab.model.loading import load_model
from steerlab.model.personas import Persona, no_system_prompt
from steerlab.model.templates import encode_chat, has_thinking_mode, render_chat
from steerlab.steering.intervention import steer
from steerlab.steering.vector import SteeringVector
from steerlab.traits.pairs import Pair

EPS_UNITS = 128  # see the module docstring
NEW_TOKENS = 12
K = 5  # top-k of the metrics (generate_with_metrics' default)
LAYERS = [0, 2]  # captured and steered; hidden_states[N_LAYERS] is after the final norm
QUESTIONS = [
    "Hi",
    "Why is the sky blue? Answer briefly, in plain words.",
    "Tell me a long story about the sea, the sky and a small boat.",
]
PAIRS = [
    Pair("a", "How are you?", "Arr, I be fine, matey!", "I am fine, thank you."),
    Pair("b", "Name a colour.", "Blue as the briny deep, arr.", "Blue."),
    Pair("c", "What is 2+2?", "Four, ye landlubber!", "Four, of course. It is a simple sum."),
]
HAMLET = Persona("Hamlet", "fictional-character", "")

ENGINES = pytest.mark.parametrize("engine", ["eager", "static"])


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request):
    """One family at a time: pytest runs all of a family's tests before the next family's."""
    return request.param


@pytest.fixture(scope="session")
def folder(family, tmp_path_factory, tokenizer):
    """The family's seeded random model saved with the embedded tokenizer."""
    return build_family(family, tmp_path_factory.mktemp(family), tokenizer)


@pytest.fixture(scope="session")
def model(folder):
    """The family through steerlab with default settings."""
    return load_model(folder, device="cpu")


@pytest.fixture(scope="session")
def ref(folder):
    """The same weights as a plain HF model (HF's default attention), never a bridge."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def prompts(tokenizer):
    """Chat prompts of different lengths, all longer than the sliding window."""
    out = [encode_chat(tokenizer, q) for q in QUESTIONS]
    assert min(map(len, out)) >= 2 * WINDOW and len(set(map(len, out))) == len(out)
    return out


@pytest.fixture(scope="session")
def stops(tokenizer, ref):
    return stop_token_ids(tokenizer, ref)


@pytest.fixture(scope="session")
def expected(ref, prompts, stops):
    """HF's greedy tokens for each prompt alone."""
    return [hf_greedy(ref, p, stops) for p in prompts]


def hf_greedy(hf, prompt, stops, n=NEW_TOKENS) -> list[int]:
    """Greedy tokens by full forwards of the growing sequence (no cache), cut before a stop."""
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            token = int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in stops:
                break
            ids.append(token)
            out.append(token)
    return out


def hf_logits(hf, prompt, tokens) -> torch.Tensor:
    """HF's teacher-forced next-token logits at each generated position."""
    with torch.inference_mode():
        logits = hf(input_ids=torch.tensor([[*prompt, *tokens]])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def hf_layers(hf) -> list[torch.nn.Module]:
    """The plain HF model's decoder layers (``model.layers``, GPT-2's ``transformer.h``)."""
    base = hf.base_model
    return list(base.layers if hasattr(base, "layers") else base.h)


def check_tokens(hf, prompts, got, want, stops) -> None:
    for prompt, g, w in zip(prompts, got, want, strict=True):
        assert_same_tokens(SimpleNamespace(original_model=hf), prompt, g, w,
                           eps_units=EPS_UNITS, stop_ids=stops)


def _values(message: str) -> str:
    """``assert_close``'s "Expected x but got y" and relative difference, on one line."""
    keep = [x.strip() for x in message.splitlines()
            if x.strip().startswith(("Expected", "Relative difference"))]
    return "; ".join(keep) or message


def no_hooks(model) -> bool:
    return all(not b._forward_hooks and not b._forward_pre_hooks for b in decoder_layers(model))


def test_loads_and_forward_equals_hf(model, ref, prompts):
    assert model.cfg.n_layers == N_LAYERS and model.cfg.d_model == 64
    ids = torch.tensor([prompts[-1]])
    with torch.inference_mode():
        assert_close_to_scale(model(ids), ref(input_ids=ids).logits, EPS_UNITS)


@ENGINES
def test_greedy_generation_equals_hf(model, ref, prompts, expected, stops, engine):
    got = generate(model, prompts, max_new_tokens=NEW_TOKENS, engine=engine)
    check_tokens(ref, prompts, got.tokens, expected, stops)


@ENGINES
def test_metrics_equal_categorical_on_hf_logits(model, ref, prompts, expected, stops, engine):
    rows = generate_with_metrics(model, prompts, max_new_tokens=NEW_TOKENS, k=K, engine=engine)
    check_tokens(ref, prompts, [r.tokens for r in rows], expected, stops)
    for prompt, row in zip(prompts, rows, strict=True):
        logits = hf_logits(ref, prompt, row.tokens)  # steerlab's own tokens, ties or not
        want = torch.distributions.Categorical(logits=logits)
        mass = want.probs.sort(-1, descending=True).values[:, :K].sum(-1)
        for t in range(len(row.tokens)):
            # the two paths' logits are within EPS_UNITS eps of the row's largest
            delta = EPS_UNITS * EPS32 * float(logits[t].abs().max())
            h_tol, m_tol = metric_tolerances(logits[t], K, delta)
            torch.testing.assert_close(
                torch.tensor(row.entropy[t]), want.entropy()[t], **h_tol,
                msg=lambda m, t=t: f"entropy at step {t} is not HF's: {_values(m)}")
            torch.testing.assert_close(
                torch.tensor(row.top_k_mass[t]), mass[t], **m_tol,
                msg=lambda m, t=t: f"top-{K} mass at step {t} is not HF's: {_values(m)}")


def test_capture_equals_hf_hidden_states(model, ref):
    acts = capture_pairs(model, PAIRS, LAYERS, mean=True)
    for i, t in enumerate(acts.tokens):
        assert t.divergence > WINDOW
        for side, ids, end in (("chosen", t.chosen, t.chosen_end),
                               ("rejected", t.rejected, t.rejected_end)):
            with torch.inference_mode():
                hs = ref(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for j, layer in enumerate(LAYERS):
                # a padded batch of pairs vs one sequence: <= 128-term reductions in other orders
                assert_close_to_scale(getattr(acts, side)[i, j], hs[layer + 1][0, t.divergence],
                                      EPS_UNITS)
                span = hs[layer + 1][0, t.response_start : end].mean(0)
                assert_close_to_scale(getattr(acts, side + "_mean")[i, j], span, EPS_UNITS)


@ENGINES
def test_steering_equals_a_plain_hook_on_hf(model, ref, prompts, expected, stops, engine):
    layer = LAYERS[1]
    g = torch.Generator().manual_seed(0)
    unit = torch.randn(model.cfg.d_model, generator=g)
    unit /= unit.norm()
    with torch.inference_mode():  # a strength of the residual's own size: it changes tokens
        hs = ref(input_ids=torch.tensor([prompts[-1]]), output_hidden_states=True).hidden_states
    alpha = float(hs[layer + 1][0].norm(dim=-1).median())
    vector = SteeringVector(unit[None], (layer,))
    with steer(model, vector, alpha, units="raw"):
        got = generate(model, prompts, max_new_tokens=NEW_TOKENS, engine=engine).tokens
    assert no_hooks(model)
    add = alpha * unit
    handle = hf_layers(ref)[layer].register_forward_hook(
        lambda module, args, output: replace_hidden(output, hidden_of(output) + add))
    try:
        want = [hf_greedy(ref, p, stops) for p in prompts]
        check_tokens(ref, prompts, got, want, stops)  # ties judged on the steered logits
    finally:
        handle.remove()
    assert want != expected  # the vector does change the replies


@ENGINES
def test_lens_at_the_last_layer_is_the_model(model, ref, prompts, engine):
    rows = generate_with_metrics(model, prompts, max_new_tokens=NEW_TOKENS, k=K, lens=True,
                                 engine=engine)
    w = ref.get_output_embeddings().weight
    for prompt, row in zip(prompts, rows, strict=True):
        assert row.lens_entropy.shape == (len(row.tokens), N_LAYERS)
        ids = torch.tensor([[*prompt, *row.tokens]])
        with torch.inference_mode():
            out = ref(input_ids=ids, output_hidden_states=True)
        at = slice(len(prompt) - 1, len(prompt) - 1 + len(row.tokens))
        logits, normed = out.logits[0, at].float(), out.hidden_states[-1][0, at]
        for t in range(len(row.tokens)):
            # the same final norm and unembedding on another matmul shape (the lens's rows)
            h_tol, m_tol = metric_tolerances(logits[t], K, matmul_delta(normed[t], w))
            torch.testing.assert_close(
                torch.tensor(row.lens_entropy[t, -1]), torch.tensor(row.entropy[t]), **h_tol,
                msg=lambda m, t=t: f"lens entropy at the last layer, step {t}, is not the "
                                   f"model's: {_values(m)}")
            torch.testing.assert_close(
                torch.tensor(row.lens_top_k_mass[t, -1]), top_k_mass(logits[t], K), **m_tol,
                msg=lambda m, t=t: f"lens top-{K} mass at the last layer, step {t}, is not "
                                   f"HF's: {_values(m)}")


def test_capture_fit_steer(model, prompts):
    """Pairs -> divergence capture -> mean difference -> a steered generation (norm units,
    the default), hooks gone afterwards."""
    acts = capture_pairs(model, PAIRS, LAYERS)
    fitter = MeanDifference()
    fitter.update(acts.chosen, acts.rejected)
    fit = fitter.fit()
    assert fit.n_pairs == len(PAIRS) and bool(torch.isfinite(fit.directions).all())
    assert bool((fit.directions.norm(dim=-1) > 0).all())
    vector = SteeringVector(fit.directions, tuple(LAYERS))
    plain = generate(model, prompts, max_new_tokens=NEW_TOKENS)
    with steer(model, vector, 1.0):
        steered = generate(model, prompts, max_new_tokens=NEW_TOKENS)
    assert steered.tokens != plain.tokens
    assert no_hooks(model)
    # exact: the same batch through the same kernels once the hooks are gone
    assert generate(model, prompts, max_new_tokens=NEW_TOKENS) == plain


def template_tokenizer(family, folder):
    """The family's tokenizer carrying its real chat template, or a skip where the fixtures
    have none (the table's "—")."""
    from transformers import AutoTokenizer

    path = TEMPLATE_DIR / f"{TEMPLATES.get(family, family)}.jinja"
    if family not in TEMPLATES or not path.is_file():
        pytest.skip(f"no real chat template of {family} in tests/fixtures/chat_templates")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = path.read_text(encoding="utf-8")
    return tok


def test_persona_template(family, folder, model):
    """The real template relabelled for a persona: the assistant's label at the generation
    prompt becomes the persona's name, every other character stays, and the model generates
    from it. A template steerlab refuses by design (no assistant role to relabel) is the
    table's "—" with the reason."""
    tok = template_tokenizer(family, folder)
    none = no_system_prompt()  # Gemma-2's template refuses a system turn
    plain = render_chat(tok, "Who are you?", system_prompt=none)
    try:
        text = render_chat(tok, "Who are you?", persona=HAMLET, system_prompt=none)
    except SteerlabError as err:
        if err.field != "chat_template":
            raise
        pytest.skip(f"refused: {err}")
    assert text.count("Hamlet") == 1, text
    assert any(text.replace("Hamlet", label) == plain for label in ("assistant", "model")), (
        plain, text)
    ids = encode_chat(tok, "Who are you?", persona=HAMLET, system_prompt=none)
    assert len(generate(model, [ids], max_new_tokens=4).tokens[0]) > 0


def test_thinking_switch(family, folder):
    """A template with a thinking switch closes an empty think block when it is off, for the
    assistant and for a persona."""
    tok = template_tokenizer(family, folder)
    if not has_thinking_mode(tok):
        pytest.skip(f"the chat template of {family} has no thinking switch")
    for persona in (None, HAMLET):
        kw = {} if persona is None else {"persona": persona}
        off = render_chat(tok, "Hi", enable_thinking=False, **kw)
        on = render_chat(tok, "Hi", enable_thinking=True, **kw)
        assert off.startswith(on) and "</think>" in off[len(on):], (on, off)


def test_models_page_lists_exactly_the_families():
    """docs/models.md (written by docs/gen_models.py) has one row per family of families.py."""
    page = (Path(__file__).parents[1] / "docs" / "models.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([^|]+?) \| `([a-z0-9_]+)` \|", page, flags=re.M)
    assert [(name, key) for name, key in rows] == [(v[0], k) for k, v in FAMILIES.items()]
    header = re.search(r"^\| family \| key \|(.*)\|$", page, flags=re.M)
    assert header and [c.strip() for c in header.group(1).split("|")] == list(PATHS)
