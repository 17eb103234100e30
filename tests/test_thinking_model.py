"""The thinking split on a model that really thinks (``thinking_model.py``: a tiny Qwen3 trained
at test time to answer ``<think>…</think>`` then an answer, with Qwen3's real chat template).

Nothing here asserts generated text: beyond the structural precondition (a ``</think>`` then an
answer, or no think block with thinking off) every check compares steerlab with a reference on
the same weights: plain HF (``AutoModelForCausalLM`` of the saved folder, its own attention, no
bridge), the per-token values of the same run, or the unsteered run.

Tolerances: steerlab and HF run the same float32 weights through other kernels, shapes and
summation orders. No reduction in this model is longer than 128 terms except the unembedding,
so two paths' logits agree to ~128 eps of each row's largest logit (``EPS_UNITS``), tokens may
part only at a tie of that resolution (``assert_same_tokens``), and metrics follow from that
logit bound (``conftest.metric_tolerances``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    EPS32,
    assert_close_to_scale,
    assert_same_tokens,
    matmul_delta,
    metric_tolerances,
    run_cli,
)
from thinking_model import (
    CHATS,
    QWEN3_TEMPLATE,
    THINK,
    THINK_END,
    build_thinking_model,
    hf_greedy,
    one_thread,
    reply_of,
    thinking_shape_errors,
)

import steerlab as sl
from steerlab.base.errors import SteerlabError
from steerlab.chat.session import ChatSession
from steerlab.cli._commands import Command, parse_command, run_command
from steerlab.generation.metrics import split_sections
from steerlab.inference.results import read_per_token
from steerlab.model.templates import think_end_index, think_end_marker

EPS_UNITS = 128  # see the module docstring
K = 5  # top-k of the metrics (the default)
NEW_TOKENS = 40  # far more than a trained reply (<= 17 tokens): every row stops by itself
PROMPTS = list(CHATS)[:2]
HAMLET = sl.Persona("Hamlet", "fictional-character")
PERSONAE = [sl.ASSISTANT, HAMLET]


@pytest.fixture(scope="session")
def thinking_dir(tmp_path_factory, embedded_dir):
    """The trained model and its tokenizer, saved once per session (10-15 s on 2 cores)."""
    return build_thinking_model(tmp_path_factory.mktemp("thinking-qwen3"), embedded_dir)


@pytest.fixture(scope="module")
def ref(thinking_dir):
    """Plain HF on the saved folder (its own attention, no bridge): the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(thinking_dir).eval()


@pytest.fixture(scope="module")
def shape_errors(thinking_dir, ref):
    """The training chats whose greedy HF reply lacks the trained structure (none)."""
    return thinking_shape_errors(ref, saved_tokenizer(thinking_dir))


@pytest.fixture(scope="module")
def model(thinking_dir, shape_errors):
    """The saved folder loaded by steerlab, once the precondition holds."""
    assert not shape_errors, f"precondition: the model does not think, then answer: {shape_errors}"
    return sl.load_model(thinking_dir, device="cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for this file: the tiny model's matmuls gain nothing from two, and
    lose much when other processes share the cores (OpenMP threads waiting on each other)."""
    with one_thread():
        yield


def saved_tokenizer(path):
    """The tokenizer as saved beside the model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def ids_of(tok, *names):
    return [tok.convert_tokens_to_ids(n) for n in names]


def hf_logits(ref, prompt, tokens):
    """HF's logits at every generated position of ``prompt + tokens`` (one full forward)."""
    with torch.inference_mode():
        out = ref(input_ids=torch.tensor([[*prompt, *tokens]]), output_hidden_states=True)
    at = slice(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return out.logits[0, at].float(), out.hidden_states[-1][0, at]


def same_tokens_as_hf(ref, tok, prompt, tokens):
    """``tokens`` are plain HF's greedy reply to ``prompt``, or part from it at a tie."""
    want = reply_of(tok, hf_greedy(ref, tok, prompt, NEW_TOKENS))
    assert_same_tokens(SimpleNamespace(original_model=ref), prompt, tokens, want,
                       eps_units=EPS_UNITS, stop_ids={tok.eos_token_id})


def check_metrics_against_hf(ref, prompt, tokens, entropy, mass):
    logits, _ = hf_logits(ref, prompt, tokens)
    want = torch.distributions.Categorical(logits=logits)
    want_mass = want.probs.topk(K, -1).values.sum(-1)
    for t in range(len(tokens)):
        # the two paths' logits are within EPS_UNITS eps of the row's largest
        h_tol, m_tol = metric_tolerances(logits[t], K, EPS_UNITS * EPS32 * float(
            logits[t].abs().max()))
        torch.testing.assert_close(torch.tensor(float(entropy[t])), want.entropy()[t], **h_tol)
        torch.testing.assert_close(torch.tensor(float(mass[t])), want_mass[t], **m_tol)


def test_precondition_it_thinks_then_answers(thinking_dir, ref, shape_errors):
    """Precondition of every other test: the saved model (reloaded by plain HF) answers every
    training chat greedily with ``<think>``…``</think>`` then an answer, and straight away
    after the empty think block of ``enable_thinking=False``; ``<think>`` and ``</think>`` are
    single tokens, as in Qwen3's tokenizer, and the template is Qwen3's own."""
    tok = saved_tokenizer(thinking_dir)
    assert tok.chat_template == QWEN3_TEMPLATE.read_text()
    assert think_end_marker(tok) == ids_of(tok, THINK_END)
    assert len(tok) == ref.config.vocab_size
    assert shape_errors == []


def _infer(thinking_dir, tmp_path, name, *flags):
    prompts, personae = tmp_path / "prompts.json", tmp_path / "personae.json"
    prompts.write_text(json.dumps(PROMPTS))
    personae.write_text(json.dumps([p.to_dict() for p in PERSONAE]))
    run = tmp_path / name
    code = run_cli("infer", "--prompts-json", str(prompts), "--personae-json", str(personae),
                   "--model", str(thinking_dir), "--device", "cpu", "--max-tokens",
                   str(NEW_TOKENS), "--batch-size", "4", "--no-progress", "--output-dir",
                   str(run), *flags)
    assert code == 0
    return run, sl.load_results(run)


def test_infer_splits_real_thinking_at_think_end(thinking_dir, ref, model, tmp_path):
    tok = model.tokenizer
    marker = think_end_marker(tok)
    run, records = _infer(thinking_dir, tmp_path, "thinking")
    assert len(records) == len(PROMPTS) * len(PERSONAE)
    for r in records:
        a = read_per_token(run, r["id"])
        tokens = [int(x) for x in a["tokens"]]
        persona = sl.Persona(r["persona"], r["category"], r["article"])
        prompt = sl.encode_chat(tok, r["prompt"], persona=persona)
        # real generations: plain HF's greedy reply to the same prompt
        same_tokens_as_hf(ref, tok, prompt, tokens)
        at = think_end_index(tokens, marker)
        assert at is not None and r["stopped"]  # the precondition, on steerlab's tokens
        assert r["think_end_position"] == at == r["n_thinking_tokens"]
        assert r["n_output_tokens"] == len(tokens) - at - len(marker) > 0
        assert r["thinking"] == tok.decode(tokens[:at], skip_special_tokens=True)
        assert r["response"] == tok.decode(tokens[at + 1 :], skip_special_tokens=True)
        for name in ("entropy", "top_k_mass"):
            values = a[name].astype(np.float64)
            # the record's means are taken in float64 over the same float32 values: 1e-12
            assert r[f"avg_{name}_thinking"] == pytest.approx(values[:at].mean(), rel=1e-12)
            assert r[f"avg_{name}_output"] == pytest.approx(values[at + 1 :].mean(), rel=1e-12)
            assert r[f"avg_{name}"] == pytest.approx(values.mean(), rel=1e-12)
        check_metrics_against_hf(ref, prompt, tokens, a["entropy"], a["top_k_mass"])


def test_infer_without_thinking_mode_has_no_thinking(thinking_dir, ref, model, tmp_path):
    tok = model.tokenizer
    run, records = _infer(thinking_dir, tmp_path, "no-thinking", "--no-thinking-mode")
    for r in records:
        tokens = [int(x) for x in read_per_token(run, r["id"])["tokens"]]
        persona = sl.Persona(r["persona"], r["category"], r["article"])
        same_tokens_as_hf(ref, tok, sl.encode_chat(tok, r["prompt"], persona=persona,
                                                   enable_thinking=False), tokens)
        assert not set(tokens) & set(ids_of(tok, THINK, THINK_END)) and r["stopped"]
        assert r["think_end_position"] is None and r["thinking"] is None
        assert r["avg_entropy_thinking"] is None and r["n_output_tokens"] == len(tokens)


def _observed(model, prompts, steering=None):
    """Greedy replies and every step's raw logits (a copy: the buffer is reused)."""
    steps: list[torch.Tensor] = []
    marker = think_end_marker(model.tokenizer)

    def observe(step, logits, active):
        steps.append(logits.detach().float().clone())

    if steering is None:
        gen = sl.generate(model, prompts, max_new_tokens=NEW_TOKENS, think_marker=marker,
                          observer=observe)
    else:
        with steering.apply(model):
            gen = sl.generate(model, prompts, max_new_tokens=NEW_TOKENS, think_marker=marker,
                              observer=observe)
    return gen.tokens, torch.stack(steps, 1)  # [row, step, vocab]


def test_output_only_steering_leaves_the_thinking_alone(model, ref):
    tok = model.tokenizer
    marker = think_end_marker(tok)
    prompts = [sl.encode_chat(tok, p, persona=who) for p, who in zip(PROMPTS, PERSONAE,
                                                                       strict=True)]
    plain, plain_logits = _observed(model, prompts)
    with torch.inference_mode():
        hs = ref(input_ids=torch.tensor(prompts[:1]), output_hidden_states=True).hidden_states
    g = torch.Generator().manual_seed(0)
    unit = torch.randn(model.cfg.d_model, generator=g)
    # ten times the typical residual at layer 0: the trained answers are so sure that a push
    # the residual's own size leaves them unchanged; this one changes every answer
    alpha = 10 * float(hs[1][0].norm(dim=-1).median())
    vector = sl.SteeringVector((unit / unit.norm())[None], (0,))
    steering = sl.Steering.create(model, vector, alpha, layers=[0], positions="output",
                                  units="raw")
    steered, steered_logits = _observed(model, prompts, steering)
    for row, (a, b) in enumerate(zip(plain, steered, strict=True)):
        at = think_end_index(a, marker)
        assert at is not None  # the precondition
        end = at + len(marker)  # thinking and the marker: generated before the output starts
        assert b[:end] == a[:end]
        assert b[end:] != a[end:]
        # Step t chooses token t from the forward of the tokens before it: steps 0..end-1
        # (thinking and the marker) run before `</think>` is fed back, and step `end` (the
        # first output token) is the first steered forward. Both runs have the same shapes
        # and kernels, and the hook adds nothing to a row outside its output: the same float32
        # values, bit for bit.
        assert_close_to_scale(steered_logits[row, :end], plain_logits[row, :end], 0)
        first = (steered_logits[row, end] - plain_logits[row, end]).abs().max()
        scale = plain_logits[row, end].abs().max()
        assert first > 0.1 * scale, (float(first), float(scale))  # rounding: ~1e-7 of it


def test_enable_thinking_false_gives_no_think_section(model, ref):
    tok = model.tokenizer
    think = ids_of(tok, THINK, THINK_END)
    for who in PERSONAE:
        for prompt in PROMPTS:
            text = sl.render_chat(tok, prompt, persona=who, enable_thinking=False)
            assert text.endswith(f"<|im_start|>{who.persona}\n{THINK}\n\n{THINK_END}\n\n")
            ids = sl.encode_chat(tok, prompt, persona=who, enable_thinking=False)
            (reply,) = sl.generate(model, [ids], max_new_tokens=NEW_TOKENS).tokens
            assert reply and not set(reply) & set(think)
            same_tokens_as_hf(ref, tok, ids, reply)


def test_chat_thinking_switch(model):
    tok = model.tokenizer
    marker = think_end_marker(tok)
    s = ChatSession(model, max_tokens=NEW_TOKENS)

    def thinks(reply) -> bool:
        return think_end_index(reply.tokens, marker) is not None

    def closed(session) -> bool:  # the next prompt ends with the empty think block
        return tok.decode(session.prompt_ids("Hi")).endswith(f"{THINK}\n\n{THINK_END}\n\n")

    # each way of saying it: /thinking [on|off] and /nothinking
    for first, second in (("/thinking", "/nothinking"), ("/nothinking", "/thinking on"),
                          ("/thinking on", "/thinking off"), ("/thinking OFF", "/thinking")):
        on = first in ("/thinking", "/thinking on")
        out = run_command(s, parse_command(first))
        assert out == f"thinking {'on' if on else 'off'}"  # no "no effect"
        assert closed(s) == (not on)
        one = s.reply(PROMPTS[0])
        run_command(s, parse_command(second))
        assert closed(s) == on
        two = s.reply(PROMPTS[1])  # the same conversation, the other mode
        assert (thinks(one), thinks(two)) == (on, not on)
        for reply in (one, two):
            assert (THINK_END in reply.text) == thinks(reply)  # the text keeps the thinking
        assert len(s.history) == 4
        run_command(s, Command("clear"))
    for bad in ("/thinking maybe", "/nothinking now"):
        with pytest.raises(SteerlabError, match="usage: /thinking"):
            run_command(s, parse_command(bad))


def test_lens_at_the_last_layer_is_the_model(model, ref):
    tok = model.tokenizer
    prompts = [sl.encode_chat(tok, p) for p in PROMPTS]
    rows = sl.generate_with_metrics(model, prompts, max_new_tokens=NEW_TOKENS, k=K, lens=True,
                                    think_marker=think_end_marker(tok))
    w = ref.get_output_embeddings().weight
    for prompt, row in zip(prompts, rows, strict=True):
        assert think_end_index(row.tokens, think_end_marker(tok)) is not None
        assert row.lens_entropy.shape == (len(row.tokens), model.cfg.n_layers)
        logits, normed = hf_logits(ref, prompt, row.tokens)
        for t in range(len(row.tokens)):
            # the same final norm and unembedding, the lens's rows stacked into another matmul
            # shape: the logits differ by at most a 64-term dot product's rounding
            h_tol, m_tol = metric_tolerances(logits[t], K, matmul_delta(normed[t], w))
            torch.testing.assert_close(torch.tensor(row.lens_entropy[t, -1]),
                                       torch.tensor(row.entropy[t]), **h_tol)
            torch.testing.assert_close(torch.tensor(row.lens_top_k_mass[t, -1]),
                                       torch.tensor(row.top_k_mass[t]), **m_tol)


def test_persona_relabelling_keeps_the_thinking_split(model, ref):
    tok = model.tokenizer
    marker = think_end_marker(tok)
    text = sl.render_chat(tok, PROMPTS[0], persona=HAMLET)
    assert text.endswith("<|im_start|>Hamlet\n") and "<|im_start|>assistant" not in text
    assert "You are Hamlet." in text
    ids = sl.encode_chat(tok, PROMPTS[0], persona=HAMLET)
    (row,) = sl.generate_with_metrics(model, [ids], max_new_tokens=NEW_TOKENS,
                                      think_marker=marker)
    sec = split_sections(row.tokens, marker)
    assert sec.think_end_position is not None and sec.n_output > 0 and row.stopped
    same_tokens_as_hf(ref, tok, ids, row.tokens)
    check_metrics_against_hf(ref, ids, row.tokens, row.entropy, row.top_k_mass)
