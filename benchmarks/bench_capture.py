"""Capture throughput vs a bare HF forward and vs TransformerLens run_with_cache; peak RSS.

    python benchmarks/bench_capture.py [--pairs 32] [--batch 8] [--quick]

Prints tokens/s of (a) a bare HF forward over the same left-padded batches, (b)
steerlab.extraction.capture.capture_pairs at every layer (target >= 0.95 of a), (c) the bridge's
run_with_cache of everything, and the peak RSS of `extract` for 1x and 10x pairs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class P:
    id: str
    prompt: str
    chosen: str
    rejected: str


def make_pairs(n: int) -> list[P]:
    body = "Arr matey, the sea be wide and the wind be fair, so hoist the sails and away! " * 3
    plain = "The sea is wide and the wind is fair, so the boat can sail away quickly today. " * 3
    return [P(str(i), f"Tell me about the sea, number {i}.", body + str(i), plain + str(i))
            for i in range(n)]


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def rss_child(n: int) -> None:
    from steerlab.extraction import extract
    from steerlab.model import load_model

    model = load_model("embedded", device="cpu")
    with tempfile.TemporaryDirectory() as d:
        extract(model, make_pairs(n), f"{d}/a.h5", batch_size=8, flush_every=16, progress=False)
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)
    from steerlab.extraction import capture_pairs, tokenize_pair
    from steerlab.model import left_pad, load_model

    n = 8 if args.quick else args.pairs
    model = load_model("embedded", device="cpu")
    tok, hf = model.tokenizer, model.original_model
    pairs = make_pairs(n)
    layers = list(range(model.cfg.n_layers))
    batches = [pairs[i : i + args.batch] for i in range(0, n, args.batch)]
    padded = []
    for b in batches:
        t = [tokenize_pair(tok, p.prompt, p.chosen, p.rejected) for p in b]
        padded.append(left_pad([x.chosen for x in t] + [x.rejected for x in t], tok.pad_token_id))
    n_tokens = sum(int(m.sum()) for _, m in padded)

    def bare():
        with torch.inference_mode():
            for ids, mask in padded:
                hf(input_ids=ids, attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)

    def ours():
        for b in batches:
            capture_pairs(model, b, layers)

    def tl_all():
        with torch.inference_mode():
            for ids, mask in padded:
                model.run_with_cache(ids, attention_mask=mask)

    bare()  # warm-up
    t_bare, t_ours, t_tl = best_of(bare), best_of(ours), best_of(tl_all, 1 if args.quick else 2)
    print(f"pairs {n}, batch {args.batch}, {n_tokens} tokens per pass, all {len(layers)} layers")
    print(f"bare HF forward        {n_tokens / t_bare:9.0f} tok/s")
    print(f"steerlab capture       {n_tokens / t_ours:9.0f} tok/s   ratio {t_bare / t_ours:.3f} "
          "(target >= 0.95)")
    print(f"TL run_with_cache(all) {n_tokens / t_tl:9.0f} tok/s   ratio {t_bare / t_tl:.3f}")
    for k in (1, 10):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(n * k)],
                             capture_output=True, text=True, check=True)
        rss = json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]
        print(f"peak RSS extract {n * k:5d} pairs: {rss:8.0f} MB")


if __name__ == "__main__":
    main()
