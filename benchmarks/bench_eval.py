"""Steering evaluation: every candidate of a round in one batch vs one candidate at a time.

    python benchmarks/bench_eval.py [--questions 12] [--tokens 24] [--quick]

``evaluate_steering`` rates a search round (one strength per layer group) as one batch of
generations, each group steering only its own rows. The baseline is the same evaluation with
``batch_size`` equal to the number of questions, which runs the candidates one after another.
Both produce the same settings (checked here too); the ratio is the speed-up of batching.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from steerlab.evaluation import EvalConfig, evaluate_steering
    from steerlab.model import load_model
    from steerlab.steering import SteeringVector
    from steerlab.traits import load_trait

    n, tokens = (4, 8) if args.quick else (args.questions, args.tokens)
    model = load_model("embedded", device="cpu")
    t = load_trait("pirate")
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector(torch.randn(6, model.cfg.d_model, generator=g), (8, 10, 12, 14, 16, 18))
    questions = list(t.held_out_questions[:n])
    groups = [(8,), (12,), (16,), (8, 10, 12), (14, 16, 18)]
    strengths = [0.05, 0.1]

    def run(batch_size: int):
        start = time.perf_counter()
        ev = evaluate_steering(model, vec, questions, t.build_scorer(),
                               trait_instruction=t.prompted_instruction, layers=groups,
                               strengths=strengths, progress=False,
                               config=EvalConfig(max_new_tokens=tokens, batch_size=batch_size))
        return ev, time.perf_counter() - start

    batched, t_batched = run(256)
    alone, t_alone = run(n)
    same = [s.answers for s in batched.sweep] == [s.answers for s in alone.sweep]
    print(f"{len(groups)} groups x {len(strengths)} strengths x {n} questions x {tokens} tokens: "
          f"one batch per round {t_batched:.1f}s, one candidate at a time {t_alone:.1f}s, "
          f"speed-up {t_alone / t_batched:.2f}x (same answers: {same})")


if __name__ == "__main__":
    main()
