"""Generated tokens/s of `steerlab infer`-style generation (metrics on) vs plain HF `generate`.

    python benchmarks/bench_infer.py [--batch-size 8] [--tokens 32] [--quick] [--device cuda]

Same prompts, batch size and number of new tokens (no early stop) for every path. Prints
  metrics / HF ratio (target >= 0.9), the extra cost of --lens, HF generate with
  attn_implementation "sdpa" vs "eager" on the bridge's HF model, and the time of a whole
  `run_inference` (files included) with --capture-layers vs without (target <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib.resources import files

import torch


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--capture-layers", default="8,12,16")
    ap.add_argument("--quick", action="store_true", help="4 x 12 tokens, one repeat")
    args = ap.parse_args()
    from steerlab.generation import generate_with_metrics
    from steerlab.model import encode_chat, left_pad, load_model, load_personae

    batch, tokens, repeat = (4, 12, 1) if args.quick else (args.batch_size, args.tokens,
                                                           args.repeat)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    hf, tok = model.original_model, model.tokenizer
    device = next(hf.parameters()).device
    data = files("steerlab.builtin") / "data"  # the built-in prompts and personae
    prompts = json.loads((data / "prompts.json").read_text(encoding="utf-8"))
    personae = load_personae(data / "personae.json")
    ids = [encode_chat(tok, prompts[i % len(prompts)], persona=personae[i % len(personae)])
           for i in range(batch)]
    input_ids, mask = left_pad(ids, tok.pad_token_id, device)
    never = {-1}  # no early stop: every path generates batch x tokens

    def hf_generate():
        hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens,
                    min_new_tokens=tokens, do_sample=False, use_cache=True,
                    pad_token_id=tok.pad_token_id)

    def ours(lens: bool):
        return lambda: generate_with_metrics(model, ids, max_new_tokens=tokens, lens=lens,
                                             stop_ids=never)

    hf_generate()  # warm-up
    n = batch * tokens
    t_hf = timed(hf_generate, repeat)
    t_ours = timed(ours(False), repeat)
    t_lens = timed(ours(True), repeat)
    old = hf.config._attn_implementation
    try:
        hf.config._attn_implementation = "sdpa"
        t_sdpa = timed(hf_generate, repeat)
    finally:
        hf.config._attn_implementation = old
    print(f"{args.model} on {device}, batch {batch} x {tokens} new tokens, {n} tokens per run")
    print(f"HF generate (KV cache, {old}): {n / t_hf:8.1f} tok/s")
    print(f"infer-style, metrics on      : {n / t_ours:8.1f} tok/s   ratio {t_hf / t_ours:.3f} "
          "(target >= 0.9)")
    print(f"infer-style, metrics + lens  : {n / t_lens:8.1f} tok/s   lens costs "
          f"{t_lens / t_ours:.2f}x ({model.cfg.n_layers} layers x {model.cfg.d_vocab} vocab)")
    print(f"HF generate, attn sdpa       : {n / t_sdpa:8.1f} tok/s   sdpa/eager time "
          f"{t_sdpa / t_hf:.3f} (the bridge computes attention itself)")
    layers = tuple(int(x) for x in args.capture_layers.split(","))
    t_run, t_cap = (timed(run(model, prompts, personae, batch, tokens, c), repeat)
                    for c in ((), layers))
    print(f"run_inference, no capture    : {t_run:8.3f} s   with --capture-layers "
          f"{args.capture_layers}: {t_cap:.3f} s   ratio {t_cap / t_run:.3f} (target <= 1.1)")


def run(model, prompts, personae, batch: int, tokens: int, layers: tuple[int, ...]):
    """A whole greedy run of ``batch`` tasks (one batch) into a fresh folder, files included."""
    from steerlab import InferConfig, run_inference

    config = InferConfig(model="bench", max_tokens=tokens, batch_size=batch,
                         capture_layers=layers, engine="eager")
    n_prompts = -(-batch // len(personae[:2]))

    def once():
        with tempfile.TemporaryDirectory() as tmp:
            run_inference(model, prompts[:n_prompts], personae[:2], f"{tmp}/run", config,
                          progress=False)

    return once


if __name__ == "__main__":
    main()
