"""Validation of steering on several traits, and a comparison of the coherence remedies.

For every trait: pairs from several samples per question (``collect(samples=4)``, the
best-separated loop-free pair per question), activations at layers 6-18, vectors fitted three
ways, then ``evaluate_steering`` with the automatic strength search under each variant:

* ``mean``       response-mean difference of means, one layer at a time (the default);
* ``divergence`` difference of means at the first divergent token;
* ``probe``      logistic-probe direction on response means;
* ``spread``     the mean vector on three adjacent layers at once, a smaller alpha each;
* ``generated``  steering generated tokens only (not the prompt);
* ``preserve``   norm-preserving addition;
* ``shared-out`` the mean vector with the direction shared by all traits' vectors removed.

Writes ``<out>/<trait>/<variant>.json|.html`` and ``<out>/summary.md`` (the tables of
docs/validation.md). Every stage resumes. Usage::

    .venv/bin/python experiments/validation/run.py --out runs/validation
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import steerlab as sl
from steerlab.evaluation import EvalConfig, write_validation
from steerlab.extraction import shuffled_control
from steerlab.traits import select_pairs

HERE = Path(__file__).parent
TRAITS = ["pirate", "emoji", "formatting", str(HERE / "traits" / "cowboy.json")]
CAPTURED = (6, 8, 10, 12, 14, 16, 18)
SINGLES = [8, 12, 16]
SPREAD = [(6, 8, 10), (10, 12, 14), (14, 16, 18)]
VARIANTS = ["mean", "divergence", "probe", "spread", "generated", "preserve", "shared-out"]


def pairs_for(model, trait, run: Path, samples: int, max_tokens: int):
    pos = sl.LocalResponder(model, trait.positive_instructions[0], max_tokens=max_tokens)
    neg = sl.LocalResponder(model, trait.negative_instructions[0], max_tokens=max_tokens)
    sl.collect(trait.questions, pos, neg, run / "collected.jsonl", samples=samples,
               progress=False)
    sl.judge(run / "collected.jsonl", run / "judged.jsonl",
             sl.scorer_judge(trait.build_scorer()), progress=False)
    sel = select_pairs(run / "collected.jsonl", run / "judged.jsonl", min_distinct=0.5)
    sl.save_pairs(sel.pairs, run / "pairs.jsonl")
    greedy = select_pairs(run / "collected.jsonl", run / "judged.jsonl", min_distinct=0.5,
                          samples=1)
    return sel, len(greedy.pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/validation"))
    ap.add_argument("--traits", default=",".join(TRAITS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--compare", default="pirate,cowboy",
                    help="traits that run every variant (the others: mean only)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = sl.load_model("embedded")
    traits = [sl.load_trait(t) for t in args.traits.split(",")]
    compare = set(args.compare.split(","))
    vectors, files, rows = {}, {}, {}
    for t in traits:
        run = args.out / t.name
        run.mkdir(parents=True, exist_ok=True)
        sel, greedy_kept = pairs_for(model, t, run, args.samples, args.max_tokens)
        rows[t.name] = {"questions": len(t.questions), "kept": len(sel.pairs),
                        "kept_greedy_only": greedy_kept, "dropped": sel.reasons()}
        logging.info("%s: %d of %d questions kept (%d with one greedy sample)", t.name,
                     len(sel.pairs), len(t.questions), greedy_kept)
        if len(sel.pairs) < 4:
            continue
        h5 = sl.extract(model, list(sel.pairs), run / "acts.h5", layers=CAPTURED, mean=True,
                        progress=False)
        files[t.name] = h5
        vectors[t.name] = {"mean": sl.fit_vector(h5, "mean-diff", mean=True)[0],
                           "divergence": sl.fit_vector(h5, "mean-diff")[0],
                           "probe": sl.fit_vector(h5, "probe", mean=True)[0]}
    shared = None
    for v in vectors.values():
        unit = v["mean"].normalise()
        shared = unit if shared is None else shared + unit
    results = {}
    for t in traits:
        if t.name not in vectors:
            continue
        run = args.out / t.name
        for variant in args.variants.split(","):
            if variant != "mean" and t.name not in compare:
                continue
            kind = variant if variant in ("divergence", "probe") else "mean"
            vec = vectors[t.name][kind]
            if variant == "shared-out":
                vec = vec.without(shared)
            config = EvalConfig(
                positions="generated" if variant == "generated" else "all",
                preserve_norm=variant == "preserve")
            t0 = time.perf_counter()
            ev = sl.evaluate_steering(
                model, vec, t.held_out_questions, t.build_scorer(),
                trait_instruction=t.prompted_instruction,
                layers=SPREAD if variant == "spread" else SINGLES, config=config,
                shuffled=shuffled_control(vec, files[t.name]) if variant != "shared-out"
                else shuffled_control(vectors[t.name]["mean"], files[t.name]).without(shared),
                resume=run / f"{variant}.points.jsonl", progress=False)
            rep = write_validation(run / variant, ev, trait=t.name)
            results[(t.name, variant)] = (ev, rep)
            logging.info("%s/%s (%.0f s)\n%s", t.name, variant, time.perf_counter() - t0,
                         "\n".join(rep.lines()))
    write_summary(args.out / "summary.md", rows, results)


def write_summary(path: Path, rows: dict, results: dict[tuple[str, str], tuple]) -> None:
    out = ["## Pairs", "", "| trait | questions | kept (4 samples) | kept (greedy only) | "
           "dropped |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        why = ", ".join(f"{n} {k}" for k, n in r["dropped"].items()) or "–"
        out.append(f"| {name} | {r['questions']} | {r['kept']} | {r['kept_greedy_only']} | "
                   f"{why} |")
    out += ["", "## Remedies", "", "| trait | variant | best layers | α | coherent trait | "
            "coherence | gap closed [95% CI] | effect [95% CI] | random | shuffled | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, variant), (ev, rep) in results.items():
        s, r = rep.row("steered"), rep.row("random")
        sh = rep.row("shuffled") if ev.shuffled else None
        out.append(f"| {name} | {variant} | {s.layers} | {s.alpha:.3g} | "
                   f"{s.coherent_trait:.1f} | {s.coherence:.2f} | {s.gap_closed:.0%} "
                   f"[{s.gap_low:.0%}, {s.gap_high:.0%}] | "
                   f"[{s.effect_low:+.1f}, {s.effect_high:+.1f}] | {r.gap_closed:.0%} | "
                   f"{'–' if sh is None else f'{sh.gap_closed:.0%}'} | "
                   f"{'pass' if rep.passed else 'fail'} |")
    out += ["", "## Reports", ""]
    for (name, variant), (_, rep) in results.items():
        out += [f"### {name} / {variant}", "", rep.markdown(), "",
                ("**Pass**: " if rep.passed else "**Fail**: ") + "; ".join(rep.reasons), ""]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    json.dump({f"{k[0]}/{k[1]}": [r.__dict__ for r in v[1].rows]
               for k, v in results.items()}, path.with_suffix(".json").open("w"), indent=1)


if __name__ == "__main__":
    main()
