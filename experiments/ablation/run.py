"""Ablating the fitted pirate direction under the pirate instruction (issue 28, validation).

Claim tested: ablating the difference-of-means pirate direction while the model is prompted
with the pirate instruction lowers the pirate score; ablating a random direction of equal
norm (``random_like``, seeded) does not.

Stages (each resumes from what ``--out`` holds):

1. pairs for the built-in ``pirate`` trait from its *training* questions only
   (``collect`` with ``--samples`` answers per side, ``judge`` with the trait's scorer,
   ``select_pairs``), as experiments/validation/run.py builds them;
2. activations at layers 6-18 (even) and the response-mean difference-of-means vector;
3. greedy 40-token answers to the *held-out* questions under each condition: ``prompted``
   (the trait's first positive instruction as system prompt), ``prompted`` with the pirate
   direction ablated (all captured layers; one band), ``prompted`` with a random direction of
   equal norm ablated (same layers, several seeds), both again "mean-ablated" (the
   projection set to the neutral answers' mean instead of 0), and ``unprompted`` (the
   floor). Rated as ``evaluate_steering`` rates answers (trait scorer; coherence: loop-free
   and not gibberish under the unsteered model, calibrated on the unprompted answers);
4. ``<out>/summary.md``: means per condition and paired bootstrap intervals (over questions)
   of each ablation minus ``prompted``.

Usage::

    .venv/bin/python experiments/ablation/run.py --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np

import steerlab as sl
from steerlab.evaluation import AnswerRater, EvalConfig, Setting
from steerlab.steering import random_like
from steerlab.traits import LocalResponder, save_pairs, scorer_judge, select_pairs

CAPTURED = (6, 8, 10, 12, 14, 16, 18)
BAND = (6, 8, 10)  # the pirate spread group with the best coherent steering in validation.md
N_BOOT = 2000


def pairs_for(model, trait, run: Path, samples: int, max_tokens: int, seed: int):
    """Stage 1: pairs from the training questions (never the held-out ones)."""
    pos = LocalResponder(model, trait.positive_instructions[0], max_tokens=max_tokens)
    neg = LocalResponder(model, trait.negative_instructions[0], max_tokens=max_tokens)
    sl.collect(trait.questions, pos, neg, run / "collected.jsonl", samples=samples, seed=seed,
               progress=False)
    sl.judge(run / "collected.jsonl", run / "judged.jsonl",
             scorer_judge(trait.build_scorer()), progress=False)
    sel = select_pairs(run / "collected.jsonl", run / "judged.jsonl", min_distinct=0.5)
    save_pairs(sel.pairs, run / "pairs.jsonl")
    return sel


def vector_for(model, pairs, run: Path) -> sl.SteeringVector:
    """Stage 2: activations at ``CAPTURED`` and the response-mean difference of means."""
    path = run / "pirate.safetensors"
    if path.exists():
        return sl.SteeringVector.load(path)
    h5 = sl.extract(model, list(pairs), run / "acts.h5", layers=CAPTURED, mean=True,
                    progress=False)
    vec = sl.fit_vector(h5, "mean-diff", mean=True)[0]
    vec.save(path)
    return vec


def answers(model, rows, steerings, config: EvalConfig):
    """Greedy answers (tokens, texts) to ``rows`` with ``steerings`` in force."""
    with ExitStack() as stack:
        for s in steerings:
            stack.enter_context(s.apply(model))
        tokens = sl.generate(model, rows, max_new_tokens=config.max_new_tokens,
                             engine=config.engine).tokens
    return tokens, [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def projections(h5: Path, vec: sl.SteeringVector) -> dict[str, np.ndarray]:
    """Mean projection ``[layer]`` of the pirate (chosen) and neutral (rejected) response
    means of the pairs on each layer's unit direction of ``vec``."""
    acts = sl.ActivationFile(h5)
    unit = vec.directions.float().numpy()
    unit = unit / np.linalg.norm(unit, axis=-1, keepdims=True)
    return {side: (acts.read(f"{name}_mean") * unit).sum(-1).mean(0)
            for side, name in (("pirate", "chosen"), ("neutral", "rejected"))}


def conditions(model, vec, seeds, h5: Path):
    """name -> (prompted?, interventions) for stage 3. ``ablate`` moves the projection to 0;
    ``mean-ablate`` (``set``, one per layer) to the neutral responses' mean projection."""
    def ablate(v, layers):
        return [sl.Steering.create(model, v, 1.0, layers=list(layers), op="ablate",
                                   units="raw")]

    def mean_ablate(v, layers):
        neutral = dict(zip(v.layers, projections(h5, v)["neutral"].tolist(), strict=True))
        return [sl.Steering.create(model, v, 1.0, layers=[x], op="set", target=neutral[x],
                                   units="raw") for x in layers]

    out = {"unprompted": (False, []), "prompted": (True, []),
           "prompted + ablate pirate 6-18": (True, ablate(vec, CAPTURED)),
           "prompted + ablate pirate 6+8+10": (True, ablate(vec, BAND))}
    for seed in seeds:
        rnd = random_like(vec, seed)
        out[f"prompted + ablate random(seed {seed}) 6-18"] = (True, ablate(rnd, CAPTURED))
        out[f"prompted + ablate random(seed {seed}) 6+8+10"] = (True, ablate(rnd, BAND))
    rnd = random_like(vec, seeds[0])
    for label, layers in (("6-18", CAPTURED), ("6+8+10", BAND)):
        out[f"prompted + mean-ablate pirate {label}"] = (True, mean_ablate(vec, layers))
        out[f"prompted + mean-ablate random(seed {seeds[0]}) {label}"] = (
            True, mean_ablate(rnd, layers))
    return out


def rate_all(model, trait, vec, run: Path, seeds, config: EvalConfig) -> dict[str, Setting]:
    """Stage 3: every condition on the held-out questions, one JSON file each (resumes)."""
    rater = AnswerRater.for_questions(model, trait.held_out_questions, trait.build_scorer(),
                                      trait.prompted_instruction,
                                      min_distinct=config.min_distinct,
                                      nll_margin=config.nll_margin)
    plain, prompted = rater.contexts
    cal = run / "reference_tokens.json"
    if not cal.exists():
        cal.write_text(json.dumps(answers(model, plain, [], config)[0]))
    rater = rater.calibrate(json.loads(cal.read_text()))
    out = {}
    todo = conditions(model, vec, seeds, run / "acts.h5")
    for i, (name, (is_prompted, steerings)) in enumerate(todo.items()):
        path = run / "conditions" / f"{i:02d}.json"
        if path.exists() and json.loads(path.read_text())["name"] == name:
            out[name] = Setting.from_dict(json.loads(path.read_text())["setting"])
            continue
        t0 = time.perf_counter()
        s = rater(*answers(model, prompted if is_prompted else plain, steerings, config))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": name, "setting": asdict(s)}, indent=1))
        logging.info("%s: trait %.1f, coherence %.2f (%.0f s)", name, s.trait, s.coherence,
                     time.perf_counter() - t0)
        out[name] = s
    return out


def paired_interval(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of mean(a - b) over the question resamples ``idx``."""
    lo, hi = np.percentile((a - b)[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def _diff(a: np.ndarray, b: np.ndarray, idx: np.ndarray, fmt: str) -> str:
    lo, hi = paired_interval(a, b, idx)
    return f"{a.mean() - b.mean():{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def projection_table(h5: Path, vec: sl.SteeringVector, seed: int) -> list[str]:
    """Where the pairs' response means sit on the pirate and on the random direction."""
    out = ["| layer | pirate dir.: pirate answers | pirate dir.: neutral answers | "
           "random dir.: pirate answers | random dir.: neutral answers |", "|---|---|---|---|---|"]
    p, r = projections(h5, vec), projections(h5, random_like(vec, seed))
    for i, x in enumerate(vec.layers):
        out.append(f"| {x} | {p['pirate'][i]:+.1f} | {p['neutral'][i]:+.1f} | "
                   f"{r['pirate'][i]:+.1f} | {r['neutral'][i]:+.1f} |")
    return out


def write_summary(path: Path, settings: dict[str, Setting], header: list[str],
                  seed: int, projection: list[str]) -> None:
    """Stage 4: the table and the paired differences against ``prompted``."""
    n = len(settings["prompted"].scores)
    idx = np.random.default_rng(seed).integers(0, n, size=(N_BOOT, n))
    raw = {k: np.array(s.scores, dtype=float) for k, s in settings.items()}
    coh = {k: np.array([x * c for x, c in zip(s.scores, s.coherent, strict=True)], dtype=float)
           for k, s in settings.items()}
    ok = {k: np.array(s.coherent, dtype=float) for k, s in settings.items()}
    out = [*header, "",
           "| condition | pirate score | coherent pirate score | coherence | "
           "score − prompted [95% CI] | coherent score − prompted [95% CI] | "
           "coherence − prompted [95% CI] |",
           "|---|---|---|---|---|---|---|"]
    for name, s in settings.items():
        cells = ["–"] * 3
        if name != "prompted":
            cells = [_diff(m[name], m["prompted"], idx, fmt)
                     for m, fmt in ((raw, "+.1f"), (coh, "+.1f"), (ok, "+.2f"))]
        out.append(f"| {name} | {s.trait:.1f} | {s.coherent_trait:.1f} | {s.coherence:.2f} | "
                   + " | ".join(cells) + " |")
    out += ["", "## Mean projection of the pairs' response means on the unit direction (raw)",
            "", *projection]
    out += ["", "## Answers (first 3 held-out questions)", ""]
    for name, s in settings.items():
        out += [f"### {name}", ""] + [f"- {a.strip()!r}" for a in s.answers[:3]] + [""]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--samples", type=int, default=2,
                    help="answers per question and side for the pairs (validation: 4)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--random-seeds", default="0,1,2")
    ap.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model = sl.load_model("embedded")
    trait = sl.load_trait("pirate")
    assert not set(trait.questions) & set(trait.held_out_questions)
    sel = pairs_for(model, trait, args.out, args.samples, args.max_tokens, args.seed)
    logging.info("pairs: %d of %d training questions kept (%s)", len(sel.pairs),
                 len(trait.questions), sel.reasons())
    vec = vector_for(model, sel.pairs, args.out)
    seeds = [int(s) for s in args.random_seeds.split(",") if s]
    settings = rate_all(model, trait, vec, args.out, seeds, EvalConfig())
    minutes = (time.perf_counter() - t0) / 60
    header = [
        "# Ablating the pirate direction under the pirate instruction", "",
        f"SmolLM2-135M-Instruct (embedded), CPU. Pairs: {len(sel.pairs)} of "
        f"{len(trait.questions)} training questions kept ({args.samples} samples per side; "
        f"dropped: {sel.reasons() or 'none'}). Vector: response-mean difference of means at "
        f"layers {', '.join(map(str, CAPTURED))}. Evaluation: {len(trait.held_out_questions)} "
        "held-out questions, greedy 40-token answers; ablation at every position, share 1. "
        f"Intervals: {N_BOOT} paired bootstrap resamples of the questions (seed {args.seed}). "
        f"This invocation took {minutes:.1f} min (stages already done are reused).",
    ]
    write_summary(args.out / "summary.md", settings, header, args.seed,
                  projection_table(args.out / "acts.h5", vec, seeds[0]))
    logging.info("done in %.1f min: %s", minutes, args.out / "summary.md")


if __name__ == "__main__":
    main()
