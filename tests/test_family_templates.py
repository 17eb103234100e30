"""Persona relabelling and the thinking switch on the real chat templates of the families.

The templates are verbatim copies in ``tests/fixtures/chat_templates`` (sources in its
README). Each one either relabels every assistant turn and the generation prompt, and nothing
else, or is refused with the reason. The expected headers are written out here per file, not
taken from steerlab, and a new fixture fails until it has its row in :data:`EXPECTED`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError

from steerlab.base.errors import SteerlabError
from steerlab.model.personas import ASSISTANT, Persona, no_system_prompt
from steerlab.model.templates import has_thinking_mode, patch_chat_template, render_chat

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.jinja"))

# file -> (the assistant header as the template renders it, the same for Hamlet), or the
# reason a template is refused (a regex of the error).
EXPECTED: dict[str, tuple[str, str] | str] = {
    "qwen3": ("<|im_start|>assistant\n", "<|im_start|>Hamlet\n"),
    "llama3": (
        "<|start_header_id|>assistant<|end_header_id|>",
        "<|start_header_id|>Hamlet<|end_header_id|>",
    ),
    "gemma2": ("<start_of_turn>model\n", "<start_of_turn>Hamlet\n"),
    "gemma3": ("<start_of_turn>model\n", "<start_of_turn>Hamlet\n"),
    "gpt_oss": ("<|start|>assistant", "<|start|>Hamlet"),
    "mistral": r"writes no assistant role to relabel \(the \[INST\] format",
    "phi3": r"assistant role is a special token of its own.*Phi-3",
}
RELABELLED = [n for n in NAMES if isinstance(EXPECTED.get(n), tuple)]
REFUSED = [n for n in NAMES if isinstance(EXPECTED.get(n), str)]
THINKING = {"qwen3"}  # the templates that take enable_thinking

HAMLET = Persona("Hamlet", "fictional-character", "")
# the words "assistant" and "model" in the contents stay as they are
CONVERSATION = [
    {"role": "system", "content": "Be brief, assistant."},
    {"role": "user", "content": "Who are you, model?"},
    {"role": "assistant", "content": "A prince, not an assistant."},
    {"role": "user", "content": "Of where?"},
]


@pytest.fixture
def family(request, tokenizer):
    """(name, a copy of the embedded tokenizer carrying that fixture template, conversation)."""
    tok = copy.copy(tokenizer)
    tok.chat_template = (FIXTURES / f"{request.param}.jinja").read_text()
    return request.param, tok, _conversation(tok)


every = pytest.mark.parametrize("family", NAMES, indirect=True)
relabelled = pytest.mark.parametrize("family", RELABELLED, indirect=True)
refused = pytest.mark.parametrize("family", REFUSED, indirect=True)


def _conversation(tok) -> list[dict]:
    """CONVERSATION, less its system turn for templates that refuse one (Gemma-2)."""
    try:
        tok.apply_chat_template(CONVERSATION, tokenize=False)
    except TemplateError:
        return CONVERSATION[1:]
    return CONVERSATION


def _own(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def test_every_fixture_has_an_expectation():
    assert set(NAMES) == set(EXPECTED), "add a row to EXPECTED for each fixture template"
    readme = (FIXTURES / "README.md").read_text()
    assert [n for n in NAMES if f"`{n}.jinja`" not in readme] == [], "list its source in README"


@every
def test_assistant_rendering_is_the_tokenizers_own(family):
    _, tok, conv = family
    text = render_chat(tok, conv, persona=ASSISTANT, system_prompt=no_system_prompt(),
                       add_generation_prompt=True)
    assert text == _own(tok, conv, add_generation_prompt=True)


@relabelled
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_persona_relabels_every_assistant_turn_and_nothing_else(family, generation_prompt):
    name, tok, conv = family
    old, new = EXPECTED[name]
    plain = _own(tok, conv, add_generation_prompt=generation_prompt)
    relabelled = render_chat(tok, conv, persona=HAMLET, system_prompt=no_system_prompt(),
                             add_generation_prompt=generation_prompt)
    assistant_turns = sum(m["role"] == "assistant" for m in conv)
    assert plain.count(old) == assistant_turns + generation_prompt
    assert relabelled == plain.replace(old, new)
    assert old not in relabelled


@relabelled
def test_persona_gets_a_system_prompt_where_the_template_takes_one(family):
    name, tok, conv = family
    if conv is not CONVERSATION:
        return  # Gemma-2 takes no system turn (the `none` style, below)
    users = [m for m in CONVERSATION if m["role"] != "system"]
    text = render_chat(tok, users, persona=HAMLET)
    assert "You are Hamlet." in text
    assert text.count(EXPECTED[name][1]) == 2  # one earlier turn, the generation prompt


def test_gemma2_takes_a_persona_without_a_system_prompt(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = (FIXTURES / "gemma2.jinja").read_text()
    users = [m for m in CONVERSATION if m["role"] != "system"]
    with pytest.raises(SteerlabError) as err:  # the template's own refusal, as one line
        render_chat(tok, users, persona=HAMLET)
    assert "System role not supported" in str(err.value) and "'none'" in str(err.value)
    assert "\n" not in str(err.value)
    text = render_chat(tok, users, persona=HAMLET, system_prompt=no_system_prompt())
    assert text.endswith("<start_of_turn>Hamlet\n")


def test_harmony_relabels_analysis_final_and_tool_call_turns(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = (FIXTURES / "gpt_oss.jinja").read_text()
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "Elsinore"}}}
    messages = [
        {"role": "user", "content": "Where is the castle?"},
        {"role": "assistant", "content": "", "thinking": "Look it up.", "tool_calls": [call]},
        {"role": "tool", "content": "Denmark"},
        {"role": "assistant", "content": "In Denmark.", "thinking": "It said Denmark."},
    ]
    # training form: the last turn keeps its analysis channel
    plain = _own(tok, messages, add_generation_prompt=False)
    relabelled = render_chat(tok, messages, persona=HAMLET, system_prompt=no_system_prompt(),
                             add_generation_prompt=False)
    headers = ("<|start|>assistant<|channel|>analysis", "<|start|>assistant to=functions.lookup",
               "<|start|>assistant<|channel|>final")
    for header in headers:
        assert header in plain
        assert header.replace("assistant", "Hamlet", 1) in relabelled
    # the tool call's own analysis is dropped once a final answer follows (the template's rule)
    assert plain.count("<|start|>assistant") == 3
    assert relabelled == plain.replace("<|start|>assistant", "<|start|>Hamlet")
    assert " to=assistant<|channel|>" in relabelled  # the tool's recipient, not an author


def test_qwen3_relabels_the_turn_that_keeps_its_thinking(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = (FIXTURES / "qwen3.jinja").read_text()
    reply = {"role": "assistant", "content": "<think>\nHm.\n</think>\n\nA prince."}
    messages = [*CONVERSATION[:2], reply]
    plain = _own(tok, messages)
    assert "<|im_start|>assistant\n<think>\nHm.\n</think>\n\nA prince." in plain
    relabelled = render_chat(tok, messages, persona=HAMLET, add_generation_prompt=False)
    assert relabelled == plain.replace("<|im_start|>assistant\n", "<|im_start|>Hamlet\n")


@every
def test_thinking_switch(family):
    name, tok, conv = family
    assert has_thinking_mode(tok) == (name in THINKING)
    if name not in THINKING:
        return
    off = render_chat(tok, conv, enable_thinking=False)
    assert off == _own(tok, conv, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = render_chat(tok, conv, enable_thinking=True)
    assert on == _own(tok, conv, add_generation_prompt=True, enable_thinking=True)
    assert on.endswith("<|im_start|>assistant\n")
    hamlet = render_chat(tok, conv, persona=HAMLET, enable_thinking=False)
    assert hamlet.endswith("<|im_start|>Hamlet\n<think>\n\n</think>\n\n")


@refused
def test_refused_templates_say_why(family):
    name, tok, conv = family
    with pytest.raises(SteerlabError, match=EXPECTED[name]) as err:
        patch_chat_template(tok.chat_template, "Hamlet")
    assert "\n" not in str(err.value)
    with pytest.raises(SteerlabError, match="cannot patch"):
        render_chat(tok, conv, persona=HAMLET)


@relabelled
@pytest.mark.parametrize("bad", ["", "two\nlines"])
def test_persona_name_must_be_one_line(family, bad):
    _, tok, _ = family
    with pytest.raises(SteerlabError, match="one non-empty line"):
        patch_chat_template(tok.chat_template, bad)


def test_mixed_markers_are_ambiguous():
    chatml = (FIXTURES / "qwen3.jinja").read_text()
    with pytest.raises(SteerlabError, match=r"mixes the markers.*ambiguous"):
        patch_chat_template(chatml + "{# [INST] #}", "Hamlet")
