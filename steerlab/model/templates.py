"""Chat formatting: persona-relabelled templates, system prompts, thinking mode, token ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerlab.base.errors import SteerlabError
from steerlab.model.personas import ASSISTANT, Persona, SystemPrompt, no_system_prompt, you_are_a

Message = dict[str, str]

# One message (a prompt, a question, a response) read from a file: far more than any context
# window holds (~4 characters a token), only a bound on what a reader keeps and tokenises;
# the context length is checked once tokenised (steerlab.generation.budget.check_context).
MAX_MESSAGE_CHARS = 1_000_000


@dataclass(frozen=True)
class TemplateFamily:
    """How one family of chat templates writes the assistant header."""

    name: str
    marker: str  # a literal that identifies the family in the template source
    header: str  # the rendered assistant header
    persona_header: str  # the same with "{persona}" in place of the role


FAMILIES = (
    TemplateFamily("chatml", "<|im_start|>", "<|im_start|>assistant\n", "<|im_start|>{persona}\n"),
    TemplateFamily(
        "llama3",
        "<|start_header_id|>",
        "<|start_header_id|>assistant<|end_header_id|>",
        "<|start_header_id|>{persona}<|end_header_id|>",
    ),
    TemplateFamily(
        "gemma", "<start_of_turn>", "<start_of_turn>model\n", "<start_of_turn>{persona}\n"
    ),
    # GPT-OSS (harmony): the author follows <|start|>, then <|channel|>, " to=" or the reply
    TemplateFamily("harmony", "<|start|>", "<|start|>assistant", "<|start|>{persona}"),
)

# Formats with no role name in the text to relabel: marker -> why.
UNRELABELLED = {
    "[INST]": "it writes no assistant role to relabel (the [INST] format of Mistral and "
              "Llama-2: the reply simply follows [/INST])",
    "<|assistant|>": "its assistant role is a special token of its own, not a name to relabel "
                     "(the Phi-3 format: <|assistant|>)",
}

THINK_END = "</think>"


def template_family(template: str) -> TemplateFamily:
    """The family of a chat template (ChatML, Llama-3, Gemma or harmony), or a clear error.

    A template of a format that writes no assistant role name, or one that carries the
    markers of two formats, is refused with the reason.
    """
    found = [f for f in FAMILIES if f.marker in template]
    refused = [marker for marker in UNRELABELLED if marker in template]
    if len(found) + len(refused) > 1:
        markers = ", ".join([f.marker for f in found] + refused)
        raise SteerlabError(
            f"cannot patch this chat template for personas: it mixes the markers of several "
            f"formats ({markers}), so where the assistant role stands is ambiguous",
            field="chat_template",
        )
    if refused:
        raise SteerlabError(
            f"cannot patch this chat template for personas: {UNRELABELLED[refused[0]]}",
            field="chat_template",
        )
    if not found:
        raise SteerlabError(
            "cannot patch this chat template for personas: it is not ChatML (<|im_start|>), "
            "Llama-3 (<|start_header_id|>), Gemma (<start_of_turn>) or harmony (<|start|>)",
            field="chat_template",
        )
    return found[0]


def patch_chat_template(template: str, persona: str) -> str:
    """Return a chat template that relabels every assistant turn with ``persona``.

    The patched template renders the original one unchanged and then rewrites the assistant
    header, so every assistant turn and the generation prompt carry the persona name and the
    rest of the text is byte-identical. ChatML (Qwen, SmolLM2), Llama-3, Gemma and harmony
    (GPT-OSS) templates relabel; the [INST] format (Mistral) writes no assistant role and Phi-3
    writes it as a special token, so those are refused with the reason (``SteerlabError``).

    Args:
        template: the tokenizer's Jinja chat template.
        persona: the role name to show instead of the assistant's, e.g. ``"Hamlet"``.

    Examples:
        >>> t = sl.patch_chat_template(model.tokenizer.chat_template, "Hamlet")
        >>> msgs = [{"role": "user", "content": "Who are you?"}]
        >>> text = model.tokenizer.apply_chat_template(msgs, chat_template=t, tokenize=False,
        ...                                           add_generation_prompt=True)
        >>> text.endswith("<|im_start|>Hamlet\\n")  # ChatML, the embedded model's template
        True
    """
    family = template_family(template)
    if not persona or "\n" in persona:
        raise SteerlabError(f"persona name {persona!r} must be one non-empty line", field="persona")
    old = json.dumps(family.header, ensure_ascii=False)
    new = json.dumps(family.persona_header.format(persona=persona), ensure_ascii=False)
    return (
        "{%- set __steerlab_out -%}" + template + "{%- endset -%}"
        "{{- __steerlab_out | replace(" + old + ", " + new + ") -}}"
    )


def build_messages(
    messages: str | Sequence[Message],
    persona: Persona = ASSISTANT,
    system_prompt: SystemPrompt | None = None,
) -> list[Message]:
    """The message list for a persona: a system message from ``system_prompt`` (unless the
    conversation already has one) followed by the conversation (a string is one user turn)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    out = [dict(m) for m in messages]
    for i, m in enumerate(out):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise SteerlabError(
                f"message {i} is {m!r}; expected {{'role': str, 'content': str}}",
                field="messages",
            )
    system_prompt = system_prompt or you_are_a()
    text = system_prompt(persona)
    if text is not None and not (out and out[0]["role"] == "system"):
        out.insert(0, {"role": "system", "content": text})
    return out


def render_chat(
    tokenizer: Any,
    messages: str | Sequence[Message],
    *,
    persona: Persona = ASSISTANT,
    system_prompt: SystemPrompt | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
) -> str:
    """Render a conversation as text with the persona's system prompt and relabelled turns.

    Args:
        tokenizer: an HF tokenizer with a chat template.
        messages: a user prompt, or a list of ``{"role", "content"}`` messages.
        persona: the persona; the plain assistant leaves the template as it is.
        system_prompt: a style from :mod:`steerlab.model.personas` (default ``you-are-a``).
        add_generation_prompt: end with the (relabelled) assistant header.
        enable_thinking: passed to templates that take it (Qwen3); ``None`` leaves the default.

    Raises:
        SteerlabError: the template refused the conversation (its own ``raise_exception``,
            e.g. Gemma-2 takes no system turn), or there is no template.
    """
    template = tokenizer.chat_template
    if not template:
        raise SteerlabError("the tokenizer has no chat template", field="chat_template")
    if not persona.is_assistant:
        template = patch_chat_template(template, persona.persona)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    try:
        return tokenizer.apply_chat_template(
            build_messages(messages, persona, system_prompt),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except Exception as err:
        # a template's own raise_exception (Gemma-2 refuses a system turn): bad input, one line
        if not type(err).__module__.startswith("jinja2"):
            raise
        hint = "; try the system prompt style 'none'" if "system" in str(err).lower() else ""
        raise SteerlabError(f"the chat template refused this conversation: {err}{hint}",
                            field="chat_template") from None


def has_thinking_mode(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template reacts to ``enable_thinking`` (Qwen3 does; a
    template that renders the same either way has no thinking mode to switch).

    Examples:
        >>> has_thinking_mode(model.tokenizer)
        False
    """
    probe = [{"role": "user", "content": "Hi"}]
    try:
        on, off = (render_chat(tokenizer, probe, enable_thinking=flag) for flag in (True, False))
        return on != off
    except Exception:  # noqa: BLE001 - a template that fails on the flag has no such mode
        return False


def encode_chat(tokenizer: Any, messages: str | Sequence[Message], **kwargs: Any) -> list[int]:
    """Token ids of :func:`render_chat`'s text, with exactly one BOS where the model uses one."""
    return encode_text(tokenizer, render_chat(tokenizer, messages, **kwargs))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Tokenise already-rendered chat text without doubling the BOS token."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def _adds_bos(tokenizer: Any) -> bool:
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def think_end_marker(tokenizer: Any) -> list[int]:
    """The token ids of ``</think>`` for this tokenizer (one id for thinking models)."""
    return list(tokenizer(THINK_END, add_special_tokens=False)["input_ids"])


def think_end_index(ids: Sequence[int], marker: Sequence[int]) -> int | None:
    """Where ``marker`` (from :func:`think_end_marker`) first starts in ``ids``, or ``None``.

    That index is the number of thinking tokens; the output starts after the marker.
    """
    ids, marker = list(ids), list(marker)
    n = len(marker)
    if n == 0:
        return None
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == marker:
            return i
    return None


def encode_messages(tokenizer: Any, messages: Sequence[dict], persona: Persona = ASSISTANT
                    ) -> list[int]:
    """Prompt ids for a conversation as given; a persona without a system message gets
    "You are <persona>." (shared by :class:`steerlab.traits.responders.LocalResponder` and
    ``steerlab serve``)."""
    style = no_system_prompt() if persona.is_assistant else you_are_a()
    return encode_chat(tokenizer, messages, persona=persona, system_prompt=style)
