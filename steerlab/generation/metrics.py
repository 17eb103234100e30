"""Certainty metrics on next-token logits: entropy, top-k mass, and the ``</think>`` split.

All metrics use the raw (temperature 1) next-token distribution ``softmax(logits)``, whatever
temperature was used for sampling, and are computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from steerlab.base.errors import SteerlabError
from steerlab.model.templates import think_end_index


def entropy(logits: Float[torch.Tensor, "... d_vocab"]) -> Float[torch.Tensor, "..."]:
    """Entropy in nats of ``softmax(logits)`` over the last axis.

    Examples:
        >>> entropy(torch.zeros(4))  # uniform over 4 tokens
        tensor(1.3863)
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def top_k_mass(logits: Float[torch.Tensor, "... d_vocab"], k: int) -> Float[torch.Tensor, "..."]:
    """Probability mass of the ``k`` most likely tokens of ``softmax(logits)``.

    Examples:
        >>> top_k_mass(torch.tensor([0.0, 0.0, 0.0, 0.0]), 2)
        tensor(0.5000)
    """
    if k < 1:
        raise SteerlabError(f"k is {k}; expected an integer >= 1", field="top_k_mass_k")
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.topk(min(k, logp.shape[-1]), dim=-1).values.exp().sum(-1)


def token_metrics(
    logits: Float[torch.Tensor, "... d_vocab"], k: int
) -> tuple[Float[torch.Tensor, "..."], Float[torch.Tensor, "..."]]:
    """``(entropy, top_k_mass)`` sharing one log-softmax (what generation records per step).

    Examples:
        >>> ent, mass = token_metrics(model_logits[:, -1], k=5)
    """
    if k < 1:
        raise SteerlabError(f"k is {k}; expected an integer >= 1", field="top_k_mass_k")
    ent, mass, _ = _from_log_probs(torch.log_softmax(logits.float(), dim=-1), k)
    return ent, mass


def chosen_metrics(
    logits: Float[torch.Tensor, "batch d_vocab"], k: int, chosen: Int[torch.Tensor, " batch"]
) -> tuple[Float[torch.Tensor, " batch"], Float[torch.Tensor, " batch"],
           Float[torch.Tensor, " batch"]]:
    """``(entropy, top_k_mass, log-prob of the chosen token)`` of one decode step."""
    return _from_log_probs(torch.log_softmax(logits.float(), dim=-1), k, chosen)


def _from_log_probs(logp: torch.Tensor, k: int, chosen: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    mass = p.topk(min(k, p.shape[-1]), dim=-1).values.sum(-1)
    picked = None if chosen is None else logp.gather(-1, chosen[..., None]).squeeze(-1)
    return ent, mass, picked


@dataclass(frozen=True)
class Sections:
    """Where a reply's thinking and output sections lie in its generated tokens.

    Thinking is ``[0, think_end_position)``; output starts after the ``</think>`` marker
    tokens. Without the marker ``think_end_position`` is ``None``, there is no thinking
    section and the whole reply is output.
    """

    n_tokens: int
    think_end_position: int | None
    marker_length: int

    @property
    def thinking(self) -> slice:
        return slice(0, self.think_end_position or 0)

    @property
    def output(self) -> slice:
        if self.think_end_position is None:
            return slice(0, self.n_tokens)
        return slice(self.think_end_position + self.marker_length, self.n_tokens)

    @property
    def n_thinking(self) -> int:
        return len(range(self.n_tokens)[self.thinking])

    @property
    def n_output(self) -> int:
        return len(range(self.n_tokens)[self.output])


def split_sections(tokens: Sequence[int], marker: Sequence[int]) -> Sections:
    """Split generated ``tokens`` at the first ``</think>`` (ids from
    :func:`steerlab.model.templates.think_end_marker`).

    Examples:
        >>> s = split_sections(reply_ids, think_end_marker(tokenizer))
        >>> reply_ids[s.thinking], reply_ids[s.output]
    """
    return Sections(len(tokens), think_end_index(tokens, marker), len(marker))


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if len(values) else None


def section_averages(
    values: Sequence[float], sections: Sections, name: str
) -> dict[str, float | None]:
    """Averages of a per-token metric over thinking, output and all tokens.

    Returns ``{f"avg_{name}_thinking", f"avg_{name}_output", f"avg_{name}"}``; an empty
    section averages to ``None``.

    Examples:
        >>> section_averages(ent.tolist(), split_sections(ids, marker), "entropy")
        {'avg_entropy_thinking': None, 'avg_entropy_output': 1.2, 'avg_entropy': 1.2}
    """
    values = list(values)
    if len(values) != sections.n_tokens:
        raise ValueError(f"{len(values)} values for {sections.n_tokens} tokens")
    return {
        f"avg_{name}_thinking": _mean(values[sections.thinking]),
        f"avg_{name}_output": _mean(values[sections.output]),
        f"avg_{name}": _mean(values),
    }
