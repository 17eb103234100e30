"""A tiny Qwen3 that really thinks, trained at test time on the CPU in seconds.

No checkpoint is downloaded: a 2-layer ``Qwen3ForCausalLM`` (d_model 64) with the embedded
SmolLM2 tokenizer, ``<think>`` and ``</think>`` added as single tokens (as Qwen3's tokenizer has
them) and the real Qwen3 chat template (``fixtures/chat_templates/qwen3.jinja``), is trained
(150 seeded AdamW steps on one fixed batch, 10-15 s on 2 cores) on a fixed set of chats to
answer

- with thinking on: ``<think>\\n…reasoning…\\n</think>\\n\\n…answer…<|im_end|>``;
- after the empty think block the template renders for ``enable_thinking=False``: the answer
  directly.

The prompts are rendered with the tokenizer's own ``apply_chat_template`` (not steerlab's), as
the assistant and as Hamlet (the assistant header relabelled), with one and two user turns.
Whether training worked is checked, not assumed: :func:`thinking_shape_errors` (greedy HF
generation) is the precondition of ``test_thinking_model.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

QWEN3_TEMPLATE = Path(__file__).parent / "fixtures" / "chat_templates" / "qwen3.jinja"
THINK, THINK_END = "<think>", "</think>"

# prompt -> (reasoning, answer)
CHATS = {
    "Name a colour.": ("Blue is a colour.", "Blue."),
    "Count to three.": ("One, two, three.", "1, 2, 3."),
    "Who are you?": ("Say who I am.", "A helper."),
    "Say hello.": ("A greeting.", "Hello!"),
}
# (article, name) as steerlab's "you-are-a" system prompt writes them
PERSONAE = (("an", "assistant"), ("", "Hamlet"))
STEPS, FULL_STEPS, SAMPLE, LR, SEED = 150, 15, 4096, 1e-2, 0


def thinking_tokenizer(embedded_dir: str | Path):
    """A fresh copy of the embedded tokenizer with the think tokens and Qwen3's template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.add_tokens([THINK, THINK_END])  # not special: decoded replies keep them, as in Qwen3
    tok.chat_template = QWEN3_TEMPLATE.read_text()
    return tok


def reply_text(prompt: str, thinking: bool) -> str:
    """What the model is trained to answer ``prompt`` (end-of-turn token included)."""
    reasoning, answer = CHATS[prompt]
    head = f"{THINK}\n{reasoning}\n{THINK_END}\n\n" if thinking else ""
    return f"{head}{answer}<|im_end|>"


def prompt_text(tok, turns: list[str], persona: tuple[str, str], thinking: bool) -> str:
    """The chat ``turns`` (user prompts; earlier ones answered as trained) rendered by the
    tokenizer's template with a ``You are …`` system prompt, ending in the persona's header."""
    article, name = persona
    msgs = [{"role": "system", "content": f"You are {article + ' ' if article else ''}{name}."}]
    for earlier in turns[:-1]:
        answer = reply_text(earlier, thinking=True).removesuffix("<|im_end|>")
        msgs += [{"role": "user", "content": earlier}, {"role": "assistant", "content": answer}]
    msgs.append({"role": "user", "content": turns[-1]})
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=thinking)
    return text.replace("<|im_start|>assistant\n", f"<|im_start|>{name}\n")


def training_chats() -> list[tuple[list[str], tuple[str, str], bool]]:
    """(turns, persona, thinking) of every training chat, in a fixed order."""
    prompts = list(CHATS)
    one = [([p], who, t) for p in prompts for who in PERSONAE for t in (True, False)]
    two = [([p, prompts[(i + 1) % len(prompts)]], PERSONAE[0], t)
           for i, p in enumerate(prompts) for t in (True, False)]
    return one + two


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _batch(tok):
    rows = [(encode(tok, prompt_text(tok, turns, who, t)), encode(tok, reply_text(turns[-1], t)))
            for turns, who, t in training_chats()]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask, target = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        target[i, len(p) - 1 : len(p) + len(r) - 1] = torch.tensor(r)  # next-token targets
    return ids, mask, target


def train_thinking_model(tok, steps: int = STEPS, seed: int = SEED):
    """The tiny Qwen3, trained (seeded, fixed data order: one full batch per step) on the reply
    tokens of :func:`training_chats` with the full-vocabulary cross-entropy."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    ids, mask, target = _batch(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    model.train()
    # Most steps score the reply against a fixed subset of the vocabulary (the ids the chats
    # use and a seeded sample of the rest: ~10x cheaper than 49k logits); the last ones use the
    # whole vocabulary, which pushes every other token down, so the model's distributions are
    # peaked, not spread over 49k untrained tokens.
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(tok), generator=g)[:SAMPLE]
    subset = torch.unique(torch.cat([ids.flatten(), sample]))
    with one_thread():
        for step in range(steps):
            _step(model, opt, ids, mask, target, subset if step < steps - FULL_STEPS else None)

    return model.eval()


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside: these small matmuls gain little from two, and lose a lot
    (several times slower) when other processes share the cores and OpenMP threads wait on
    each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _step(model, opt, ids, mask, target, subset) -> None:
    keep = target != -100
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[keep]
    want = target[keep]
    if subset is None:
        logits = model.lm_head(hidden)
    else:  # the same logits, restricted to the subset's columns (targets renumbered)
        logits = hidden @ model.lm_head.weight[subset].T
        want = torch.searchsorted(subset, want)
    loss = torch.nn.functional.cross_entropy(logits, want)
    opt.zero_grad()
    loss.backward()
    opt.step()


def hf_greedy(model, tok, prompt_ids: list[int], max_new_tokens: int = 40) -> list[int]:
    """Plain HF greedy ``generate`` (the reference): the new ids, the end-of-turn token that
    stops it included."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return out[0, len(prompt_ids) :].tolist()


def reply_of(tok, new: list[int]) -> list[int]:
    """A reply as steerlab returns it: the ids before the end-of-turn token."""
    return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def thinking_shape_errors(model, tok) -> list[str]:
    """Training chats whose greedy reply (plain HF) lacks the trained structure: it must end
    with the end-of-turn token; with thinking, start with ``<think>`` and have one
    ``</think>`` followed by an answer (not only whitespace); without, have an answer and no
    think token at all."""
    think, end = tok.convert_tokens_to_ids([THINK, THINK_END])
    bad = []
    with torch.inference_mode():
        for turns, who, thinking in training_chats():
            prompt = encode(tok, prompt_text(tok, turns, who, thinking))
            new = hf_greedy(model, tok, prompt)
            reply = reply_of(tok, new)
            answer = reply[reply.index(end) + 1 :] if end in reply else reply
            ok = len(reply) < len(new) and tok.decode(answer).strip() != ""
            if thinking:
                ok = ok and reply[:1] == [think] and reply.count(end) == 1
            else:
                ok = ok and think not in reply and end not in reply
            if not ok:
                bad.append(f"{turns} as {who[1]}, thinking {thinking}: {tok.decode(reply)!r}")
    return bad


def build_thinking_model(path: Path, embedded_dir: str | Path) -> Path:
    """Train the model and ``save_pretrained`` it with its tokenizer into ``path``."""
    tok = thinking_tokenizer(embedded_dir)
    model = train_thinking_model(tok)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
