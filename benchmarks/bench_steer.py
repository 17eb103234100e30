"""Steered vs unsteered generation time, one batch of 8 strengths vs 8 sequential runs, and
the operators beyond addition (ablate, cap) vs add, on both engines.

    python benchmarks/bench_steer.py [--tokens 48] [--quick]

Targets: steered / unsteered <= 1.05 on the fast path (steerlab.generation.generator.generate);
ablate and cap / add <= 1.05 (issue 28), on the eager and the static engine.
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from steerlab.generation import generate
    from steerlab.model import encode_chat, load_model
    from steerlab.steering import Steering, SteeringVector, steer

    tokens = 16 if args.quick else args.tokens
    model = load_model("embedded", device="cpu")
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector(torch.randn(1, model.cfg.d_model, generator=g), (10,))
    prompt = encode_chat(model.tokenizer, "Tell me about the sea.")
    stop = {-1}  # never stop early: equal work in every run
    batch = [prompt] * 4

    def plain():
        generate(model, batch, max_new_tokens=tokens, stop_ids=stop)

    def steered():
        with steer(model, vec, 2.0):
            generate(model, batch, max_new_tokens=tokens, stop_ids=stop)

    plain()
    t_plain, t_steer = timed(plain), timed(steered)
    print(f"batch 4 x {tokens} tokens: unsteered {t_plain:.2f}s, steered {t_steer:.2f}s, "
          f"ratio {t_steer / t_plain:.3f} (target <= 1.05)")
    alphas = [0.5 * i for i in range(8)]

    def one_batch():
        with steer(model, vec, torch.tensor(alphas)):
            generate(model, [prompt] * 8, max_new_tokens=tokens, stop_ids=stop)

    def sequential():
        for a in alphas:
            with steer(model, vec, a):
                generate(model, [prompt], max_new_tokens=tokens, stop_ids=stop)

    t_batch, t_seq = timed(one_batch, 2), timed(sequential, 1)
    print(f"8 strengths: one batch {t_batch:.2f}s, 8 sequential runs {t_seq:.2f}s, "
          f"speed-up {t_seq / t_batch:.2f}x")
    operators(model, vec, batch, tokens, stop, Steering, generate)


def operators(model, vec, batch, tokens, stop, Steering, generate) -> None:  # noqa: N803
    """ablate and cap against add at the same layers, per engine (the same batch and length;
    a static workspace is warmed up by the first call of each)."""
    made = {"add": Steering.create(model, vec, 0.1),
            "ablate": Steering.create(model, vec, op="ablate"),
            "cap": Steering.create(model, vec, op="cap", bounds=(None, 0.05))}
    for engine in ("eager", "static"):
        times = {}
        for name, s in made.items():
            def run(s=s, engine=engine):
                with s.apply(model):
                    generate(model, batch, max_new_tokens=tokens, stop_ids=stop, engine=engine)

            run()
            times[name] = timed(run)
        ratios = ", ".join(f"{n} / add {times[n] / times['add']:.3f}" for n in ("ablate", "cap"))
        print(f"{engine}: add {times['add']:.2f}s, ablate {times['ablate']:.2f}s, cap "
              f"{times['cap']:.2f}s; {ratios} (target <= 1.05)")


if __name__ == "__main__":
    main()
