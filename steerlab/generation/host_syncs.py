"""Counting the device-to-host reads of a block of code (a CUDA graph cannot hold any; the
tests and benchmarks assert the decode loop makes none between its host checks)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)


_HOST_READS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select",
               "unique_dim", "_unique2", "item"}


class _SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        to_host = name in ("_to_copy", "copy_") and _device_to_host(func, args, kwargs)
        if name in _HOST_READS or to_host:
            self.count += 1
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _device_to_host(func: Any, args: Any, kwargs: Any) -> bool:
    kwargs = kwargs or {}
    src = args[0] if args else None
    if func.__name__.startswith("copy_"):
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    dev = kwargs.get("device")
    return src is not None and src.device.type != "cpu" and dev is not None and \
        torch.device(dev).type == "cpu"


@dataclass
class SyncCount:
    """Host reads counted by :func:`count_host_syncs`: the total and per operation."""

    count: int = 0
    ops: dict[str, int] = field(default_factory=dict)


@contextmanager
def count_host_syncs() -> Iterator[SyncCount]:
    """Count the operations inside that make the host wait for device data.

    Counts ``.item()``/``bool()`` reads, data-dependent shapes (``nonzero``, ``masked_select``),
    device-to-host copies, and ``tolist()``/``numpy()`` calls (which on the CPU do not pass
    through torch's dispatcher). Each would be a synchronisation on a GPU and makes a CUDA graph
    capture fail.

    Examples:
        >>> ids = sl.encode_chat(model.tokenizer, "Hello!")
        >>> with count_host_syncs() as syncs:
        ...     out = sl.generate(model, [ids], max_new_tokens=8, engine="eager")
        >>> syncs.count > 0  # the eager engine checks on the host after every step
        True
    """
    result = SyncCount()
    mode = _SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counting(name: str) -> Callable[..., Any]:
        original = originals[name]

        def read(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            result.count += 1
            result.ops[name] = result.ops.get(name, 0) + 1
            return original(self, *a, **k)

        return read

    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    try:
        with mode:
            yield result
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        result.count += mode.count
        for name, n in mode.ops.items():
            result.ops[name] = result.ops.get(name, 0) + n
