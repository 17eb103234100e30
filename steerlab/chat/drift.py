"""Drift over a conversation: each reply's projection on an axis, turn by turn, for scripted
multi-turn conversations run in batches (Lu et al. 2026 follow the assistant axis over
emotional and philosophical conversations; capping it keeps the model near the assistant).

A conversation is a list of user turns; every conversation's turn ``t`` is generated in one
batch once their turn ``t - 1`` replies are in the history, exactly as a
:class:`steerlab.chat.session.ChatSession` would run it turn by turn.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np

from steerlab.base.checks import integer, text
from steerlab.base.errors import SteerlabError
from steerlab.base.files import read_json_list
from steerlab.base.progress import progress_bar
from steerlab.chat.session import ChatSession
from steerlab.generation.generator import generate
from steerlab.model.personas import ASSISTANT, Persona
from steerlab.model.templates import MAX_MESSAGE_CHARS
from steerlab.steering.intervention import Steering
from steerlab.steering.monitoring import monitor
from steerlab.steering.vector import SteeringVector

log = logging.getLogger(__name__)

MAX_TURNS = 1000  # a scripted conversation longer than this is a mistake, not a study


@dataclass(frozen=True)
class Drift:
    """Per conversation and turn: the reply's mean projection on the unit axis at ``layer``
    after the interventions in force (``projections``) and before them (``before``), ``[conv,
    turn]`` with NaN past a conversation's last turn or for an empty reply, and the replies."""

    layer: int
    projections: np.ndarray
    before: np.ndarray
    replies: tuple[tuple[str, ...], ...]

    def per_turn(self) -> np.ndarray:
        """``[turn]`` the mean over conversations (NaN-aware): the drift curve."""
        with np.errstate(invalid="ignore"):
            counts = np.isfinite(self.projections).sum(0)
            sums = np.nansum(self.projections, axis=0)
        return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)

    def to_dict(self, conversations: Sequence[Sequence[str]]) -> dict[str, Any]:
        """A strict-JSON record (NaN as null) with the turns asked."""
        def floats(row: np.ndarray, n: int) -> list[float | None]:
            return [float(x) if math.isfinite(x) else None for x in row[:n]]

        return {"layer": self.layer, "per_turn": floats(self.per_turn(), len(self.per_turn())),
                "conversations": [
                    {"turns": list(turns), "replies": list(self.replies[i]),
                     "projection": floats(self.projections[i], len(turns)),
                     "before": floats(self.before[i], len(turns))}
                    for i, turns in enumerate(conversations)]}


def load_conversations(path: str | os.PathLike) -> list[list[str]]:
    """A conversations file: a non-empty JSON list whose items are lists of user turns (each
    non-blank text of at most :data:`MAX_MESSAGE_CHARS` characters), or ``{"turns": [...]}``;
    an error names the entry (``conversations[2].turns[0]``)."""
    out = []
    for i, item in enumerate(read_json_list(path)):
        where = f"conversations[{i}]"
        if isinstance(item, dict):
            item, where = item.get("turns"), f"{where}.turns"
        out.append(check_turns(item, where, str(path)))
    return out


def check_turns(turns: Any, where: str = "turns", source: str | None = None) -> list[str]:
    """One conversation's user turns: a non-empty list of texts (at most :data:`MAX_TURNS`)."""
    if not isinstance(turns, list) or not turns or len(turns) > MAX_TURNS:
        raise SteerlabError(f"got {turns!r:.60}; expected a list of 1 to {MAX_TURNS} user "
                            "turns (strings)", source=source, field=where)
    return [text(t, f"{where}[{j}]", max_chars=MAX_MESSAGE_CHARS, empty=False, source=source)
            for j, t in enumerate(turns)]


def conversation_drift(
    model: Any,
    conversations: Sequence[Sequence[str]],
    axis: SteeringVector,
    *,
    layer: int | None = None,
    persona: Persona = ASSISTANT,
    system: str | None = None,
    interventions: Sequence[Steering] = (),
    max_tokens: int = 64,
    batch_size: int = 16,
    engine: str = "auto",
    progress: bool = True,
) -> Drift:
    """Run scripted conversations turn by turn and record each reply's projection on ``axis``.

    Args:
        model: a bridge from :func:`steerlab.load_model`.
        conversations: each a list of user turns (see :func:`load_conversations`).
        axis: the direction to follow (e.g. ``sl.persona_space(run).axis_vector()``).
        layer: where to read it (default: the axis's middle layer).
        persona, system: who answers and the system prompt (as in ``ChatSession``).
        interventions: steerings in force for every reply, e.g. a cap on the axis:
            ``Steering.create(model, axis, op="cap", bounds=("25%", None))``.
        max_tokens: new tokens per reply (greedy).
        batch_size: conversations generated together.

    Examples:
        >>> drift = conversation_drift(model, [["Hi!", "Who are you really?"]], vec,
        ...                            max_tokens=8, progress=False)  # vec: layers 10, 12
        >>> drift.layer, drift.projections.shape  # [conversation, turn]
        (12, (1, 2))
    """
    convs = [check_turns(list(c), f"conversations[{i}]") for i, c in enumerate(conversations)]
    if not convs:
        raise SteerlabError("no conversations; expected at least one", field="conversations")
    integer(batch_size, "batch_size", lo=1)
    sessions = [ChatSession(model, persona=persona, system=system, max_tokens=max_tokens,
                            engine=engine) for _ in convs]
    watched = int(sessions[0].watch(axis, layer))  # checks the axis against the model
    n_turns = max(len(c) for c in convs)
    after = np.full((len(convs), n_turns), math.nan)
    before = np.full((len(convs), n_turns), math.nan)
    replies: list[list[str]] = [[] for _ in convs]
    tok = model.tokenizer
    steps = sum(math.ceil(sum(len(c) > t for c in convs) / batch_size) for t in range(n_turns))
    with progress_bar(steps, "conversations", enabled=progress) as bar:
        for t in range(n_turns):
            live = [i for i, c in enumerate(convs) if len(c) > t]
            for k in range(0, len(live), batch_size):
                rows = live[k : k + batch_size]
                ids = [sessions[i].prompt_ids(convs[i][t]) for i in rows]
                with ExitStack() as stack:
                    for s in interventions:
                        stack.enter_context(s.apply(model))
                    mon = stack.enter_context(monitor(model, axis, layers=[watched]))
                    gen = generate(model, ids, max_new_tokens=max_tokens, engine=engine)
                for j, i in enumerate(rows):
                    n = len(gen.tokens[j])
                    if n:
                        after[i, t] = float(mon.trace(watched)[j, :n].mean())
                        before[i, t] = float(mon.trace(watched, before=True)[j, :n].mean())
                    answer = tok.decode(gen.tokens[j], skip_special_tokens=True)
                    replies[i].append(answer)
                    sessions[i].history += [{"role": "user", "content": convs[i][t]},
                                            {"role": "assistant", "content": answer}]
                bar.update()
    log.info("%d conversations, %d turns at most, axis layer %d", len(convs), n_turns, watched)
    return Drift(watched, after, before, tuple(tuple(r) for r in replies))
