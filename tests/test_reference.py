"""steerlab's generation paths against plain HF on the same weights, loaded without the bridge.

The reference is ``AutoModelForCausalLM`` from the embedded model's directory, never booted as
a bridge, so nothing TransformerLens does (or stops doing after a release) can move it. These
tests are the ones that failed under transformers 5.24 with TransformerLens 4.3 (the bridge
ignored the renamed KV cache) and that ``make test-latest`` runs against the newest releases.

The batch, infer and steering tests run twice: with ``sdpa`` (steerlab's default: HF's own
attention modules) and with ``eager`` (the bridge's re-implemented attention, the path the 5.24
cache rename broke); the chat, collect and single-prompt paths run with sdpa. Both
sides run in float32 with the same attention, so greedy tokens agree exactly; logits are
compared with a tolerance explained at ``LOGIT_ATOL``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steerlab.base.compat import _bridge_reads, ensure_bridge_reads_cache, kv_cache_filled
from steerlab.chat.session import ChatSession
from steerlab.generation.generator import generate, generate_with_metrics
from steerlab.model.hooks import hidden_of, replace_hidden
from steerlab.model.inputs import stop_token_ids
from steerlab.model.loading import load_model
from steerlab.model.personas import Persona
from steerlab.model.templates import encode_chat
from steerlab.steering.intervention import steer
from steerlab.steering.vector import SteeringVector
from steerlab.traits.responders import LocalResponder

pytestmark = pytest.mark.slow

# Cached incremental decoding and one full-sequence forward add the same terms in a different
# order (and, in padded batches, over different widths). In float32 over 30 layers that moved
# logits of magnitude up to ~36 by at most 1.0e-4 (measured on 3 prompts x 16 tokens); 2e-3
# leaves 20x headroom, while a broken cache moves them by whole units (the 5.24 breakage
# measured 44).
LOGIT_ATOL = 2e-3
NEW_TOKENS = 16
QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Why is the sky blue? Answer briefly, in plain words, for a child of six.",
]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def attn(request):
    """Both attention paths: sdpa runs HF's attention modules, eager the bridge's own."""
    return request.param


@pytest.fixture(scope="module")
def model(attn, embedded_model):
    """The embedded model through steerlab (the session's sdpa model, or an eager one)."""
    if attn == "sdpa":
        return embedded_model
    return load_model("embedded", device="cpu", attn_implementation="eager")


@pytest.fixture(scope="module")
def reference(embedded_dir, attn):
    """The embedded weights as a plain HF model with the same attention, never a bridge."""
    hf = AutoModelForCausalLM.from_pretrained(
        embedded_dir, dtype=torch.float32, attn_implementation=attn
    )
    return hf.eval()


@pytest.fixture(scope="module")
def ref_tokenizer(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


def _prompts(tokenizer) -> list[list[int]]:
    hamlet = Persona("Hamlet", "fictional-character", "")
    return [encode_chat(tokenizer, q, persona=hamlet) if i % 2 else encode_chat(tokenizer, q)
            for i, q in enumerate(QUESTIONS)]


def hf_greedy(hf, tokenizer, prompts, max_new_tokens=NEW_TOKENS) -> list[list[int]]:
    """Plain HF ``generate`` on a left-padded batch, cut at the first stop token."""
    stops = sorted(stop_token_ids(tokenizer, hf))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=stops, pad_token_id=pad)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


def hf_logits(hf, prompt, tokens) -> torch.Tensor:
    """Teacher-forced next-token logits of a plain HF forward at each generated position."""
    with torch.inference_mode():
        logits = hf(input_ids=torch.tensor([list(prompt) + list(tokens)])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def test_kv_cache_is_filled_after_the_prefill(embedded_model, tiny_model, tokenizer):
    ids = encode_chat(tokenizer, QUESTIONS[0])
    assert kv_cache_filled(embedded_model, ids)
    assert kv_cache_filled(tiny_model, ids)


def test_bridge_attention_reads_the_cache_under_both_names():
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    ensure_bridge_reads_cache()
    for keyword in ("cache", "past_key_values"):
        assert _bridge_reads(AttentionBridge._update_kv_cache, keyword), keyword


def test_chat_template_ids_equal_the_tokenizers_own(embedded_model, ref_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = ref_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
    assert encode_chat(embedded_model.tokenizer, messages) == list(expected)


@pytest.fixture(scope="module")
def batch(model):
    """Prompts of different lengths (so the batch is left-padded), two relabelled for Hamlet."""
    prompts = _prompts(model.tokenizer)
    assert len({len(p) for p in prompts}) > 1
    return prompts


@pytest.fixture(scope="module")
def expected(reference, model, batch):
    """HF ``generate``'s greedy replies to the batch."""
    return hf_greedy(reference, model.tokenizer, batch)


def test_greedy_generate_and_its_logits_equal_plain_hf(model, reference, batch, expected):
    steps: list[torch.Tensor] = []
    gen = generate(model, batch, max_new_tokens=NEW_TOKENS,
                   observer=lambda step, logits, active: steps.append(logits.clone()))
    assert gen.tokens == expected
    stacked = torch.stack(steps, 1)  # [batch, step, d_vocab]
    for row, (prompt, tokens) in enumerate(zip(batch, gen.tokens, strict=True)):
        stop = [int(stacked[row, len(tokens)].argmax())] if gen.stopped[row] else []
        full = list(tokens) + stop  # the step that chose the stop token counts too
        got, want = stacked[row, : len(full)], hf_logits(reference, prompt, full)
        assert torch.allclose(got, want, atol=LOGIT_ATOL, rtol=0), (
            row, float((got - want).abs().max()))


# Paths that differ from the batch tests only above the attention layer run with sdpa alone.
SDPA_ONLY = pytest.mark.parametrize("attn", ["sdpa"], indirect=True)


@SDPA_ONLY
def test_greedy_generate_alone_equals_hf_generate_alone(model, reference, batch):
    alone = generate(model, batch[-1:], max_new_tokens=NEW_TOKENS).tokens
    assert alone == hf_greedy(reference, model.tokenizer, batch[-1:])


def test_infer_path_equals_hf_tokens_and_entropy(model, reference, batch, expected):
    rows = generate_with_metrics(model, batch, max_new_tokens=NEW_TOKENS)
    assert [r.tokens for r in rows] == expected
    for prompt, row in zip(batch, rows, strict=True):
        logits = hf_logits(reference, prompt, row.tokens)
        want = torch.distributions.Categorical(logits=logits).entropy().numpy()
        # dH/dz_i = -p_i (log p_i + H): a logit error e moves H by at most e * sum p_i|log p_i + H|,
        # a few units for these peaked distributions, so 1e-2 nats covers LOGIT_ATOL
        assert abs(row.entropy - want).max() < 1e-2


@SDPA_ONLY
def test_chat_path_equals_hf_generate(model, reference):
    session = ChatSession(model, max_tokens=NEW_TOKENS)
    first = session.prompt_ids(QUESTIONS[0])
    assert list(session.reply(QUESTIONS[0]).tokens) == hf_greedy(
        reference, model.tokenizer, [first])[0]
    second = session.prompt_ids(QUESTIONS[1])  # the history now holds the first exchange
    assert list(session.reply(QUESTIONS[1]).tokens) == hf_greedy(
        reference, model.tokenizer, [second])[0]


@SDPA_ONLY
def test_collect_path_equals_hf_generate(model, reference, ref_tokenizer):
    responder = LocalResponder(model, "Talk like a pirate.", max_tokens=NEW_TOKENS,
                               batch_size=len(QUESTIONS))
    got = dict(responder.respond(QUESTIONS))
    prompts = [responder.encode(q) for q in QUESTIONS]
    expected = hf_greedy(reference, model.tokenizer, prompts)
    assert [got[i] for i in range(len(QUESTIONS))] == [
        ref_tokenizer.decode(t, skip_special_tokens=True) for t in expected]


def test_steered_generate_equals_hf_with_a_plain_torch_hook(model, reference, batch,
                                                            expected):
    """Steering through the bridge equals adding the same vector with a hook on plain HF."""
    tok = model.tokenizer
    prompts = batch
    g = torch.Generator().manual_seed(0)
    layer, alpha = 12, 4.0
    vector = SteeringVector(torch.randn(1, model.cfg.d_model, generator=g), (layer,))
    add = alpha * vector.direction(layer)

    def hook(module, args, output):
        return replace_hidden(output, hidden_of(output) + add)

    handle = reference.model.layers[layer].register_forward_hook(hook)
    try:
        want = hf_greedy(reference, tok, prompts)
    finally:
        handle.remove()
    with steer(model, vector, alpha, units="raw"):
        got = generate(model, prompts, max_new_tokens=NEW_TOKENS).tokens
    assert got == want
    assert got != expected  # the vector does change the replies


@SDPA_ONLY
def test_static_engine_equals_plain_hf(model, reference, batch, expected):
    """The static engine (slot cache, one graph-replayable step) against HF ``generate``:
    the same greedy tokens, and entropy of HF's teacher-forced logits (same bound as above)."""
    rows = generate_with_metrics(model, batch, max_new_tokens=NEW_TOKENS, engine="static")
    assert [r.tokens for r in rows] == expected
    for prompt, row in zip(batch, rows, strict=True):
        logits = hf_logits(reference, prompt, row.tokens)
        want = torch.distributions.Categorical(logits=logits)
        assert abs(row.entropy - want.entropy().numpy()).max() < 1e-2
        chosen = want.log_prob(torch.tensor(row.tokens)).numpy()
        assert abs(row.logprob - chosen).max() < 1e-2  # |d log p| <= 2 |d logit|


@SDPA_ONLY
def test_static_engine_steered_equals_hf_with_a_plain_torch_hook(model, reference, batch):
    g = torch.Generator().manual_seed(1)
    layer, alpha = 10, 3.0
    vector = SteeringVector(torch.randn(1, model.cfg.d_model, generator=g), (layer,))
    add = alpha * vector.direction(layer)
    handle = reference.model.layers[layer].register_forward_hook(
        lambda module, args, output: replace_hidden(output, hidden_of(output) + add))
    try:
        want = hf_greedy(reference, model.tokenizer, batch)
    finally:
        handle.remove()
    with steer(model, vector, alpha, units="raw"):
        assert generate(model, batch, max_new_tokens=NEW_TOKENS, engine="static").tokens == want
