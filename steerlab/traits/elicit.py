"""The ``generate`` stage: an LLM writes a trait's elicitation instructions, questions and a
0..100 rubric, through structured output (JSON schema)."""

from __future__ import annotations

import logging

from steerlab.base.errors import SteerlabError
from steerlab.traits.client import EndpointClient
from steerlab.traits.trait import Trait

__all__ = ["elicit_trait", "artefact_schema"]

log = logging.getLogger(__name__)

_PROMPT = """You are designing a dataset to study a behavioural trait of AI assistants.

Trait "{name}": {instruction}

Write:
- "positive_instructions": {n_inst} different system prompts that make an assistant strongly \
express the trait;
- "negative_instructions": {n_inst} system prompts that make it answer normally, without the trait;
- "questions": {n_q} varied, everyday user questions where the trait can show (no two alike);
- "held_out_questions": {n_h} more such questions, different from the others;
- "evaluation_prompt": a rubric for a judge that contains the placeholders {{question}} and \
{{answer}} and asks for a score from 0 (trait absent) to 100 (trait strongly present).

Reply with a JSON object with exactly these fields."""


def artefact_schema(n_instructions: int, n_questions: int, n_held_out: int) -> dict:
    """JSON schema of the generated artefacts (the subset of :class:`Trait` an LLM writes)."""
    strings = {"type": "array", "items": {"type": "string"}}
    return {
        "type": "object",
        "properties": {
            "positive_instructions": {**strings, "minItems": n_instructions},
            "negative_instructions": {**strings, "minItems": n_instructions},
            "questions": {**strings, "minItems": n_questions},
            "held_out_questions": {**strings, "minItems": n_held_out},
            "evaluation_prompt": {"type": "string"},
        },
        "required": ["positive_instructions", "negative_instructions", "questions",
                     "held_out_questions", "evaluation_prompt"],
    }


def elicit_trait(
    client: EndpointClient,
    trait: Trait,
    *,
    n_instructions: int = 5,
    n_questions: int = 40,
    n_held_out: int = 10,
) -> Trait:
    """The trait with LLM-written instructions, questions and rubric (its scorer is kept).

    Args:
        client: a capable model's endpoint (structured output preferred, not required).
        trait: at least ``name`` and ``trait_instruction``.
        n_instructions: positive and negative system prompts each.
        n_questions: questions for pairs.
        n_held_out: questions kept for evaluating steering.

    Examples:
        >>> client = sl.EndpointClient(sl.Endpoint("http://127.0.0.1:8000/v1", "big", None))
        >>> playful = sl.Trait("playful", "The assistant is playful ...")
        >>> t = sl.elicit_trait(client, playful)  # doctest: +SKIP
        >>> t.save("traits/playful.json")  # doctest: +SKIP
    """
    prompt = _PROMPT.format(name=trait.name, instruction=trait.trait_instruction,
                            n_inst=n_instructions, n_q=n_questions, n_h=n_held_out)
    schema = artefact_schema(n_instructions, n_questions, n_held_out)
    art = client.chat_json([{"role": "user", "content": prompt}], schema, name="trait",
                           max_tokens=4096, temperature=0.7)
    questions = list(dict.fromkeys(q.strip() for q in art["questions"] if q.strip()))
    held = [q for q in dict.fromkeys(q.strip() for q in art["held_out_questions"])
            if q and q not in questions]
    if "{answer}" not in art["evaluation_prompt"]:
        raise SteerlabError("the generated rubric lacks an {answer} placeholder",
                            source=client.endpoint.model, field="evaluation_prompt")
    return trait.replace(
        positive_instructions=[s for s in art["positive_instructions"] if s.strip()],
        negative_instructions=[s for s in art["negative_instructions"] if s.strip()],
        questions=questions, held_out_questions=held,
        evaluation_prompt=art["evaluation_prompt"],
    )
