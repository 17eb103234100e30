"""The static engine proves itself on a device before ``auto`` picks it there.

:func:`check_static` runs the static engine against the eager one on the model's device:
tokens and metrics of a left-padded batch, a steering strength changed between two calls (the
captured step replayed with new values), a persona changed between calls (other prompts, the
same step), and a finished row's slot refilled with a new prompt while another row decodes.
``steerlab doctor`` runs it on each CUDA device and :func:`record`\\ s a pass in the cache
folder, keyed by the device, the dtype and the versions of steerlab, torch, transformers and
TransformerLens; :meth:`steerlab.Engine.resolve` picks static on a GPU only once
:func:`steerlab.generation.engine.proven` finds that record. On the CPU the suite runs the
same check (the CPU path needs no record).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerlab.base.files import write_json_atomic
from steerlab.generation.decode import StepProgram
from steerlab.generation.engine import proof_key, proof_path
from steerlab.generation.generator import generate, generate_with_metrics
from steerlab.generation.slots import SlotBatch
from steerlab.model.personas import Persona
from steerlab.model.templates import encode_chat
from steerlab.steering.intervention import Steering
from steerlab.steering.vector import SteeringVector

log = logging.getLogger(__name__)

PROMPTS = ("What is the capital of France?", "Name three colours.",
           "Write one sentence about the sea and the sky at dusk.")
# Entropy and top-k mass of the two engines differ only by summation order (the static cache
# attends over a masked capacity): a few float32 ulps of values of order 1 in float32, more
# in half precision.
METRIC_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


@dataclass(frozen=True)
class StaticCheck:
    """The outcome of :func:`check_static`: each check's name, whether it passed, and what
    differed when it did not."""

    device: str
    dtype: str
    checks: tuple[tuple[str, bool, str], ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def summary(self) -> str:
        """One line: what passed, or the first failure."""
        failed = [(name, why) for name, ok, why in self.checks if not ok]
        names = ", ".join(name for name, _, _ in self.checks)
        if not failed:
            return f"static equals eager on {self.device} ({names})"
        name, why = failed[0]
        return f"static differs from eager on {self.device}: {name}: {why}"


def _same_tokens(a: list[list[int]], b: list[list[int]]) -> str:
    for row, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            at = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                      min(len(x), len(y)))
            return f"row {row} differs from token {at}"
    return ""


@torch.inference_mode()
def check_static(model: Any, *, max_new_tokens: int = 12) -> StaticCheck:
    """Run the static engine against the eager engine on ``model``'s device.

    Args:
        model: a bridge from :func:`steerlab.load_model` (on the device to check).
        max_new_tokens: tokens per reply.

    Returns:
        A :class:`StaticCheck`; ``ok`` when tokens are equal and metrics agree within
        :data:`METRIC_RTOL` in every check.

    Examples:
        >>> check_static(model, max_new_tokens=4).ok
        True
    """
    start = time.perf_counter()
    tok = model.tokenizer
    hf = model.original_model
    dtype = next(hf.parameters()).dtype
    prompts = [encode_chat(tok, p) for p in PROMPTS]
    checks: list[tuple[str, bool, str]] = []

    def both(fn: Any, **kw: Any) -> tuple[Any, Any]:
        return fn(model, engine="static", **kw), fn(model, engine="eager", **kw)

    got, want = both(generate_with_metrics, prompts=prompts,
                     max_new_tokens=max_new_tokens, k=5)
    why = _same_tokens([r.tokens for r in got], [r.tokens for r in want])
    if not why:
        rtol = METRIC_RTOL.get(dtype, 5e-2)
        for a, b in zip(got, want, strict=True):
            for field in ("entropy", "top_k_mass"):
                x, y = getattr(a, field), getattr(b, field)
                if not np.allclose(x, y, rtol=rtol, atol=rtol):
                    why = f"{field} differs by {np.abs(x - y).max():.2e} (rtol {rtol})"
    checks.append(("tokens and metrics", not why, why))

    g = torch.Generator().manual_seed(0)
    layer = model.cfg.n_layers // 2
    vec = SteeringVector(torch.randn(1, model.cfg.d_model, generator=g), (layer,))
    why = ""
    steering = Steering.create(model, vec, 0.3, units="norm")
    for alpha in (0.3, -0.3):  # the same captured step, replayed with a new strength
        with steering.with_alpha(alpha).apply(model):
            s, e = both(generate, prompts=prompts, max_new_tokens=max_new_tokens)
        why = why or _same_tokens(s.tokens, e.tokens)
    checks.append(("strength change", not why, why))

    why = ""
    for persona in (Persona("pirate"), Persona("a patient teacher")):
        rows = [encode_chat(tok, p, persona=persona) for p in PROMPTS]
        s, e = both(generate, prompts=rows, max_new_tokens=max_new_tokens)
        why = why or _same_tokens(s.tokens, e.tokens)
    checks.append(("persona change", not why, why))

    why = _refill(model, prompts, max_new_tokens)
    checks.append(("finished row refilled", not why, why))
    device = str(next(hf.parameters()).device)
    return StaticCheck(device, str(dtype).removeprefix("torch."), tuple(checks),
                       time.perf_counter() - start)


def _refill(model: Any, prompts: list[list[int]], max_new: int) -> str:
    """Slot 0 finishes early and takes a new prompt while slot 1 keeps decoding; each row's
    tokens must equal the eager engine's reply to its prompt alone."""
    settings = StepProgram.for_model(model, sampling=False)
    alone = [generate(model, [p], max_new_tokens=n, engine="eager").tokens[0]
             for p, n in ((prompts[0], 2), (prompts[1], max_new), (prompts[2], max_new))]
    width = max(map(len, prompts))
    batch = SlotBatch(model, 2, 1 << (2 * width + 2 * max_new - 1).bit_length(), settings)
    with batch.running():
        batch.admit([0, 1], [prompts[0], prompts[1]], limits=[2, max_new], temps=[0.0, 0.0],
                    seeds=[0, 0])
        while bool(batch.st.active[0]):
            batch.step()
        first = batch.st.tokens[0, : int(batch.st.n_out[0])].tolist()
        batch.admit([0], [prompts[2]], limits=[max_new], temps=[0.0], seeds=[0])
        while batch.any_active():
            batch.step()
        got = [first, *(batch.st.tokens[r, : int(batch.st.n_out[r])].tolist() for r in (1, 0))]
    return _same_tokens(got, alone)


def record(result: StaticCheck) -> Path | None:
    """Keep a passed check where :func:`steerlab.generation.engine.proven` looks for it; a
    failed one removes the record (``auto`` goes back to eager on that device)."""
    path = proof_path(result.device, result.dtype)
    if not result.ok:
        path.unlink(missing_ok=True)
        return None
    body = {**proof_key(result.device, result.dtype),
            "checks": [c[0] for c in result.checks], "seconds": round(result.seconds, 2)}
    return write_json_atomic(path, body, indent=2)
