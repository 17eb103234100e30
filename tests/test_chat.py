"""Persona template patching, system prompt styles and token ids."""

from __future__ import annotations

import copy

import pytest
from templates import ALPACA, CHATML, GEMMA, LLAMA3, QWEN3

from steerlab.base.errors import SteerlabError
from steerlab.model.personas import (
    ASSISTANT,
    Persona,
    custom_format,
    load_personae,
    no_system_prompt,
    system_prompt_style,
    you_are_a,
)
from steerlab.model.templates import (
    encode_chat,
    encode_text,
    patch_chat_template,
    render_chat,
    template_family,
    think_end_index,
    think_end_marker,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "A prince."},
    {"role": "user", "content": "Of where?"},
    {"role": "assistant", "content": "Denmark."},
    {"role": "user", "content": "Why so sad?"},
]

HEADERS = {
    "chatml": ("<|im_start|>assistant\n", "<|im_start|>Hamlet\n"),
    "llama3": (
        "<|start_header_id|>assistant<|end_header_id|>",
        "<|start_header_id|>Hamlet<|end_header_id|>",
    ),
    "gemma": ("<start_of_turn>model\n", "<start_of_turn>Hamlet\n"),
}


def _render(template, messages, **kw):
    from jinja2 import Environment

    env = Environment()
    return env.from_string(template).render(messages=messages, bos_token="<s>", **kw)


@pytest.mark.parametrize(
    "template,family",
    [(CHATML, "chatml"), (QWEN3, "chatml"), (LLAMA3, "llama3"), (GEMMA, "gemma")],
)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_patch_relabels_every_assistant_turn_and_nothing_else(
    template, family, generation_prompt
):
    old, new = HEADERS[family]
    plain = _render(template, CONVERSATION, add_generation_prompt=generation_prompt)
    patched = _render(
        patch_chat_template(template, "Hamlet"), CONVERSATION,
        add_generation_prompt=generation_prompt,
    )
    assert plain.count(old) == 2 + generation_prompt
    assert old not in patched
    assert patched.count(new) == plain.count(old)
    # the rest of the text is unchanged: undoing the relabel gives the original back
    assert patched.replace(new, old) == plain


def test_patch_keeps_thinking_switch():
    patched = patch_chat_template(QWEN3, "Hamlet")
    off = _render(patched, CONVERSATION[:2], add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>Hamlet\n<think>\n\n</think>\n\n")
    on = _render(patched, CONVERSATION[:2], add_generation_prompt=True)
    assert on.endswith("<|im_start|>Hamlet\n")


def test_patch_rejects_unknown_template_and_bad_names():
    with pytest.raises(SteerlabError, match="cannot patch"):
        patch_chat_template(ALPACA, "Hamlet")
    with pytest.raises(SteerlabError, match="one non-empty line"):
        patch_chat_template(CHATML, "two\nlines")
    assert template_family(LLAMA3).name == "llama3"


def test_persona_name_with_quotes_is_escaped():
    name = 'Dr. "Quote" O\'Brien'
    out = _render(patch_chat_template(CHATML, name), CONVERSATION[:2], add_generation_prompt=True)
    assert out.endswith(f"<|im_start|>{name}\n")


def test_system_prompt_styles():
    hamlet = Persona("Hamlet", "fictional-character", "")
    assert you_are_a()(ASSISTANT) == "You are an assistant."
    assert you_are_a()(hamlet) == "You are Hamlet."
    assert no_system_prompt()(hamlet) is None
    assert custom_format("Act as {persona} ({category}).")(hamlet) == (
        "Act as Hamlet (fictional-character)."
    )
    assert system_prompt_style("you-are-a")(hamlet) == "You are Hamlet."
    with pytest.raises(SteerlabError, match="system_prompt_style"):
        system_prompt_style("shout")
    with pytest.raises(SteerlabError, match="bad system prompt format"):
        system_prompt_style("{nonsense}")


def test_render_with_real_tokenizer(tokenizer):
    hamlet = Persona("Hamlet", "fictional-character", "")
    text = render_chat(tokenizer, "Who are you?", persona=hamlet)
    assert text.startswith("<|im_start|>system\nYou are Hamlet.<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>Hamlet\n")
    plain = render_chat(tokenizer, "Who are you?", system_prompt=no_system_prompt())
    assert plain == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], tokenize=False, add_generation_prompt=True
    )


def test_exactly_one_bos(tokenizer):
    hamlet = Persona("Hamlet", "x", "")
    ids = encode_chat(tokenizer, "Hi", persona=hamlet)
    text = render_chat(tokenizer, "Hi", persona=hamlet)
    assert ids.count(tokenizer.bos_token_id) == text.count(tokenizer.bos_token)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    # a Llama-3-like tokenizer that adds BOS itself and whose template also writes it
    llama_like = copy.deepcopy(tokenizer)
    llama_like.chat_template = "{{ bos_token }}" + LLAMA3.replace("{{- bos_token }}", "")
    text = llama_like.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = encode_text(llama_like, text)
    assert ids.count(llama_like.bos_token_id) == text.count(llama_like.bos_token)


def test_think_end_index(tokenizer):
    marker = think_end_marker(tokenizer)
    body = tokenizer("Let me think", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" Answer.", add_special_tokens=False)["input_ids"]
    assert think_end_index(body + marker + tail, marker) == len(body)
    assert think_end_index(body + tail, marker) is None
    assert think_end_index(marker, marker) == 0
    assert think_end_index(body, []) is None


def test_load_personae_errors(tmp_path):
    good = tmp_path / "p.json"
    good.write_text('[{"persona": "Hamlet", "category": "fiction", "article": ""}]')
    assert load_personae(good) == [Persona("Hamlet", "fiction", "")]
    cases = {
        "not json {": "not valid JSON",
        "[]": "non-empty JSON list",
        '{"persona": "x"}': "non-empty JSON list",
        '[{"category": "c"}]': r"'personae\[0\]\.persona'",
        '[{"persona": 3, "category": "c"}]': r"'personae\[0\]\.persona'",
        '[{"persona": "x"}]': r"'personae\[0\]\.category'",
        "[1]": "expected an object",
    }
    for text, needle in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(SteerlabError, match=needle) as err:
            load_personae(bad)
        assert "bad.json" in str(err.value)


def test_has_thinking_mode_only_where_the_template_reacts(tokenizer):
    import copy

    from steerlab.model.templates import has_thinking_mode

    assert not has_thinking_mode(tokenizer)  # SmolLM2 ships ChatML without thinking
    for template, thinks in ((QWEN3, True), (CHATML, False), (LLAMA3, False)):
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = template
        assert has_thinking_mode(tok) is thinks, template[:40]
