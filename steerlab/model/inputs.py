"""The model's inputs for a batch of prompts: left padding, position ids, and the end-of-turn
ids that stop a row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int

from steerlab.base.errors import SteerlabError


def position_ids(mask: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
    """Position ids of left-padded rows: 0 at each row's first real token (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SteerlabError("every prompt needs at least one token", field="prompts")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def stop_token_ids(tokenizer: Any, hf_model: Any = None) -> set[int]:
    """End-of-turn ids: the tokenizer's EOS plus the generation config's EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg = getattr(hf_model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids
