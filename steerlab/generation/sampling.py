"""Token choice of batched decoding: seeded per-row sampling by CDF inversion (a row draws the
same tokens whatever batch it is in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int

from steerlab.base.errors import SteerlabError

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors; products stay below 2**63."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def row_uniforms(seeds: Int[torch.Tensor, " batch"],
                 step: int | Int[torch.Tensor, " batch"]) -> Float[torch.Tensor, " batch"]:
    """One uniform in (0, 1) per row that depends only on (seed, step), from a counter hash.

    ``step`` is one step for all rows or each row's own step (rows that joined a running batch
    later count their own tokens); computed on the seeds' device without host reads.
    """
    seeds = seeds.to(torch.int64)
    step = torch.as_tensor(step, dtype=torch.int64, device=seeds.device)
    key = _mix32(_mix32(seeds) ^ _mix32(seeds >> 32) * 31 + step)
    hi = _mix32(key ^ (step * 0x9E3779B1))
    lo = _mix32(hi ^ 0x632BE5AB)
    bits = (hi >> 6) * (1 << 26) + (lo >> 6)  # 52 random bits
    return (bits.to(torch.float64) + 0.5) / float(1 << 52)


def sample(logits: Float[torch.Tensor, "batch vocab"],
           temperature: float | Float[torch.Tensor, " batch"],
           seeds: Int[torch.Tensor, " batch"],
           step: int | Int[torch.Tensor, " batch"]) -> Int[torch.Tensor, " batch"]:
    """A draw from ``softmax(logits / temperature)`` per row, by inverting its CDF.

    Row ``r`` uses one uniform that depends only on ``seeds[r]`` and its step, so it draws the
    same token whichever other rows share its batch (batch size, shards, order). The CDF is
    summed in float64, exact to ~1e-12 over a 150k vocabulary. ``temperature`` may be one per
    row (all > 0).
    """
    temp = torch.as_tensor(temperature, dtype=torch.float64, device=logits.device)
    if temp.ndim == 1:
        temp = temp[:, None]
    probs = torch.softmax(logits.double() / temp, dim=-1)
    cdf = probs.cumsum(-1)
    u = (row_uniforms(seeds, step).to(cdf.device) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def row_seeds(seed: int | Sequence[int] | None, batch: int, device: torch.device
              ) -> torch.Tensor:
    """Per-row seeds: a sequence as given, an int ``s`` as ``s, s+1, …``, None drawn from torch."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, int):
        return torch.arange(seed, seed + batch, device=device, dtype=torch.int64)
    values = [int(s) for s in seed]
    if len(values) != batch:
        raise SteerlabError(f"got {len(values)} seeds for {batch} prompts; expected one per "
                            "prompt", field="seed")
    return torch.tensor(values, device=device, dtype=torch.int64)
