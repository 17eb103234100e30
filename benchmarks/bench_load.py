"""Cold vs warm `load_model("embedded")`, against a bare HF `from_pretrained` of the same files.

Cold: the first load in a fresh cache (GGUF dequantisation + conversion).
Warm: later loads from the cached safetensors copy (target <= 2 s).
"""

from __future__ import annotations

import os
import tempfile
import time


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from steerlab.model import embedded_model_dir, load_model

    with tempfile.TemporaryDirectory() as cache:
        old = os.environ.get("STEERLAB_CACHE")
        os.environ["STEERLAB_CACHE"] = cache
        try:
            cold, _ = _timed(lambda: load_model("embedded", device="cpu"))
            warm = min(_timed(lambda: load_model("embedded", device="cpu"))[0] for _ in range(3))
            path = embedded_model_dir()
            bare = min(
                _timed(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))[0]
                for _ in range(3)
            )
        finally:
            if old is None:
                os.environ.pop("STEERLAB_CACHE")
            else:
                os.environ["STEERLAB_CACHE"] = old
    print(f"load_model('embedded') cold: {cold:.2f} s (conversion included)")
    print(f"load_model('embedded') warm: {warm:.2f} s (target <= 2 s)")
    print(f"bare HF from_pretrained:     {bare:.2f} s")
    print(f"ratio warm / bare HF:        {warm / bare:.2f}x")


if __name__ == "__main__":
    main()
