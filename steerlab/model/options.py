"""Where a model's weights go: model options, device checks, HF device maps.

:class:`ModelOptions` is the one set of model settings every command takes (CLI flags and YAML
keys alike). :meth:`ModelOptions.validate` checks them without loading anything, so a device
that does not exist (``cuda`` on a CPU-only torch, ``cuda:3`` on a one-GPU node) is an error
before any model loads, never a silent fallback. :func:`hf_placement` turns them into the
``device_map`` HF ``from_pretrained`` loads with, so weights go straight to their device(s) in
their final dtype; :func:`check_placement` verifies afterwards that every parameter is where it
was asked to be (:mod:`steerlab.model.provenance` records where it ran).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from steerlab.base.errors import SteerlabError
from steerlab.model.attention import AUTO, KERNELS

log = logging.getLogger(__name__)

DEVICES = "auto, cpu, cuda, cuda:N, mps or meta"
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
ATTN_IMPLEMENTATIONS = KERNELS
DTYPES = ("float32", "bfloat16", "float16")


def default_device() -> str:
    """The best device here: ``cuda``, then ``mps``, then ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"no CUDA device is visible (torch {torch.__version__}, CUDA {torch.version.cuda})"


def resolve_device(device: str | torch.device | None, *, source: str | None = None
                   ) -> torch.device:
    """The device ``device`` names, checked to exist here (``None`` and ``"auto"``: the best).

    Raises:
        SteerlabError: unknown device names, and devices this machine does not have.

    Examples:
        >>> resolve_device("auto")
        device(type='cpu')
    """
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SteerlabError(f"got {name!r}; expected {DEVICES}", source=source,
                            field="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SteerlabError(f"got {name!r} but {_no_cuda_reason()}; expected auto or cpu "
                                "(or install a CUDA build of torch)", source=source,
                                field="device")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise SteerlabError(f"got {name!r} but this node has {count} CUDA device(s), "
                                f"cuda:0 to cuda:{count - 1}", source=source, field="device")
        return torch.device("cuda", index)
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise SteerlabError(f"got {name!r} but MPS is not available here; expected auto "
                                "or cpu", source=source, field="device")
        return dev
    if dev.type not in ("cpu", "meta"):
        raise SteerlabError(f"got {name!r}; expected {DEVICES}", source=source, field="device")
    return torch.device(dev.type)


def parse_device_map(value: str | Mapping[str, Any] | None, *, source: str | None = None
                     ) -> str | dict[str, Any] | None:
    """``auto``/``balanced``/``balanced_low_0``/``sequential``, a mapping, or a JSON object."""
    if value is None or isinstance(value, Mapping):
        return None if value is None else dict(value)
    text = str(value).strip()
    if text in DEVICE_MAPS:
        return text
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise SteerlabError(f"got {text!r}, not valid JSON ({err.msg})", source=source,
                                field="device_map") from None
        if isinstance(parsed, dict) and parsed:
            return parsed
    raise SteerlabError(f"got {text!r}; expected one of {', '.join(DEVICE_MAPS)} or a JSON "
                        "object of module name -> device", source=source, field="device_map")


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and where: the flags of every command that loads one.

    Attributes:
        model: ``"embedded"``, a hub id or a local ``save_pretrained`` directory.
        device: ``auto`` (cuda, else mps, else cpu), ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or
            ``meta`` (shapes only; the placement check uses it on CPU machines).
        dtype: weights dtype: ``float32``, ``bfloat16`` or ``float16``.
        device_map: split over GPUs with an HF device map: ``auto``, ``balanced``,
            ``balanced_low_0``, ``sequential``, or a dict / JSON object of module -> device.
        n_devices: split evenly over the first N GPUs (``balanced``); 1 means no split.
        attn_implementation: attention kernel: ``auto`` (default: what HF picks for the
            architecture, sdpa where supported), ``sdpa``, a flash kernel, or ``eager`` for the
            bridge's attention hooks (``hook_pattern``).
    """

    model: str = "embedded"
    device: str = "auto"
    dtype: str = "float32"
    device_map: str | dict[str, Any] | None = None
    n_devices: int = 1
    attn_implementation: str = AUTO

    @property
    def split(self) -> bool:
        """Whether the weights are spread over several devices."""
        return self.device_map is not None or self.n_devices > 1

    def validate(self, *, source: str | None = None) -> ModelOptions:
        """Check every field (devices against this machine) without loading; normalised copy."""
        dtype = str(self.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise SteerlabError(f"got {self.dtype!r}; expected one of {', '.join(DTYPES)}",
                                source=source, field="dtype")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise SteerlabError(f"got {self.attn_implementation!r}; expected one of "
                                f"{', '.join(ATTN_IMPLEMENTATIONS)}", source=source,
                                field="attn_implementation")
        if isinstance(self.n_devices, bool) or not isinstance(self.n_devices, int) \
                or self.n_devices < 1:
            raise SteerlabError(f"got {self.n_devices!r}; expected an integer >= 1",
                                source=source, field="n_devices")
        device_map = parse_device_map(self.device_map, source=source)
        if device_map is not None and self.n_devices > 1:
            raise SteerlabError("give device_map or n_devices, not both", source=source,
                                field="n_devices")
        if self.n_devices > 1 or isinstance(device_map, str):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            want = self.n_devices if self.n_devices > 1 else 1
            if count < want:
                what = f"n_devices {self.n_devices}" if self.n_devices > 1 else \
                    f"device_map {device_map!r}"
                have = _no_cuda_reason() if count == 0 else f"this node has {count} GPU(s)"
                raise SteerlabError(f"{what} splits over GPUs but {have}", source=source,
                                    field="n_devices" if self.n_devices > 1 else "device_map")
            device = "cuda"
        elif isinstance(device_map, dict):
            for target in set(device_map.values()):
                if str(target) != "disk":
                    resolve_device(f"cuda:{target}" if isinstance(target, int) else target,
                                   source=source)
            device = "cuda" if any(_is_cuda(t) for t in device_map.values()) else "cpu"
        else:
            device = str(resolve_device(self.device, source=source))
        return replace(self, dtype=dtype, device_map=device_map, device=device)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, source: str | None = None
                     ) -> ModelOptions:
        """The model keys of a YAML config (``model``, ``device``, ``dtype``, …), validated."""
        values: dict[str, Any] = {}
        for name, kind in (("model", str), ("device", str), ("dtype", str),
                           ("device_map", (str, dict)), ("n_devices", int),
                           ("attn_implementation", str)):
            value = raw.get(name)
            if value is None:
                continue
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SteerlabError(f"got {value!r}; expected "
                                    f"{'integer' if kind is int else 'string'}",
                                    source=source, field=name)
            values[name] = value
        return cls(**values).validate(source=source)

    def local_files(self) -> list[Path]:
        """What a local model folder holds (``model`` a directory): inputs no output may
        alias (a run's ``config.json`` written over the model's). Empty for a hub id or the
        embedded model.

        Examples:
            >>> sl.ModelOptions().local_files()  # the embedded model
            []
            >>> from steerlab.model import embedded_model_dir
            >>> folder = sl.ModelOptions(str(embedded_model_dir())).local_files()
            >>> "config.json" in [p.name for p in folder]
            True
        """
        folder = Path(self.model)
        return sorted(folder.iterdir()) if self.model != "embedded" and folder.is_dir() else []

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def _is_cuda(target: Any) -> bool:
    return isinstance(target, int) or str(target).startswith("cuda")


def hf_placement(opts: ModelOptions, max_memory: Mapping[Any, Any] | None = None
                 ) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that put the weights on their device(s) directly.

    One device becomes ``device_map={"": device}`` (also ``cpu`` and ``meta``: one code path);
    ``n_devices=N`` becomes a ``balanced`` map over GPUs 0..N-1 with no CPU or disk offload.
    """
    if opts.n_devices > 1:
        # each GPU's free memory, and no CPU or disk entry: nothing may be offloaded
        budget = dict(max_memory) if max_memory else {
            i: torch.cuda.mem_get_info(i)[0] for i in range(opts.n_devices)}
        return {"device_map": "balanced", "max_memory": budget}
    if opts.device_map is not None:
        out: dict[str, Any] = {"device_map": opts.device_map}
        if max_memory:
            out["max_memory"] = dict(max_memory)
        return out
    return {"device_map": {"": opts.device}}


def _expected(opts: ModelOptions) -> set[torch.device] | None:
    """Allowed parameter devices; None where any GPU of the map will do."""
    if opts.n_devices > 1:
        return {torch.device("cuda", i) for i in range(opts.n_devices)}
    if isinstance(opts.device_map, dict):
        return {torch.device(f"cuda:{t}" if isinstance(t, int) else str(t))
                for t in opts.device_map.values()}
    if opts.device_map is not None:
        return None
    return {torch.device(opts.device)}


def check_placement(hf_model: Any, opts: ModelOptions) -> None:
    """Fail loudly unless every parameter and buffer sits on a device ``opts`` asked for.

    Raises:
        SteerlabError: naming how many tensors are elsewhere, one example and the devices.
    """
    allowed = _expected(opts)
    tensors = [*hf_model.named_parameters(), *hf_model.named_buffers()]
    wrong = [(name, t.device) for name, t in tensors
             if (t.device not in allowed if allowed is not None else t.device.type != "cuda")]
    if wrong:
        name, dev = wrong[0]
        want = "a GPU" if allowed is None else " or ".join(sorted(map(str, allowed)))
        found = sorted({str(d) for _, d in wrong})
        raise SteerlabError(f"{len(wrong)} of {len(tensors)} weights are on "
                            f"{', '.join(found)}, not on {want} (e.g. {name}); the model "
                            "may not fit: lower max_memory use, or split over more GPUs",
                            field="device")
