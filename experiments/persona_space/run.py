"""Persona space on held-out prompts: does the assistant axis generalise, and what does a cap do?

On the embedded model with the built-in personae (15, 5 categories) and prompts (24):

1. the prompts split (seeded) into train and held-out halves; one capturing inference run on
   each (``sl.run_inference`` with ``capture_layers``) into ``<out>/train`` and
   ``<out>/heldout``;
2. the assistant axis from the TRAIN run (``sl.persona_space``); on the HELD-OUT run each
   reply's mean projected on the train axis's unit direction per layer: the separation
   (assistant category − the others) with a paired bootstrap interval over held-out prompts,
   the per-category means, the train map's PC1/axis cosine and the held-out map's PC1 cosine
   with the train axis;
3. capping under role-play on the held-out prompts (``conversation_drift``, single turn):
   (a) role-play, (b) role-play + the axis capped from below at the assistant's 25th
   percentile, (c) role-play + a random direction of equal norm per layer capped at the 25th
   percentile of the assistant's own projections on it, (d) the plain assistant. Per
   condition: the projection on the axis, a lexicon persona score and coherence (as
   ``steerlab.evaluation`` rates it: distinct-2 ≥ 0.5 and a mean NLL under the unsteered
   model at most 1 nat above the plain assistant's), with paired bootstrap intervals over
   prompts for (b − a) and (c − a).

Writes ``<out>/summary.md`` (the tables of docs/validation.md) and ``<out>/summary.json``;
every stage resumes. Usage::

    .venv/bin/python experiments/persona_space/run.py --out runs/persona_space
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np
import torch

import steerlab as sl
from steerlab.chat import conversation_drift
from steerlab.inference import load_prompts
from steerlab.steering import with_reference

DATA = files("steerlab.builtin") / "data"
LAYERS = (10, 15, 20)
ASSISTANT_WORDS = ("assistant", " ai ", "ai,", "ai.", "language model", "chatbot", "help you",
                   "assist you", "i'm here to help", "i am here to help")
# extra words of each role besides its name (lower case, matched as whole words)
ROLE_WORDS = {
    "Hamlet": ["denmark", "prince", "ophelia", "elsinore", "thou", "thy"],
    "Sherlock Holmes": ["watson", "deduction", "detective", "baker", "elementary"],
    "pirate captain": ["arr", "matey", "ahoy", "ship", "sea", "treasure", "crew", "ye"],
    "Cleopatra": ["egypt", "queen", "pharaoh", "nile", "caesar"],
    "Albert Einstein": ["relativity", "physicist", "physics", "theory"],
    "Napoleon Bonaparte": ["emperor", "army", "waterloo", "empire"],
    "doctor": ["patient", "patients", "medical", "medicine", "clinic"],
    "lawyer": ["legal", "court", "client", "clients", "law"],
    "chef": ["kitchen", "recipe", "cook", "cooking", "dish"],
    "toaster": ["toast", "bread", "slot", "crumbs"],
    "rock": ["stone", "mineral", "boulder"],
    "teapot": ["tea", "spout", "brew", "pour"],
}


def split_prompts(out: Path, seed: int, n_train: int, n_held: int
                  ) -> tuple[list[str], list[str]]:
    with as_file(DATA / "prompts.json") as f:
        prompts = load_prompts(f)
    order = np.random.default_rng(seed).permutation(len(prompts))
    train = sorted(order[:n_train].tolist())
    held = sorted(order[n_train : n_train + n_held].tolist())
    (out / "split.json").write_text(json.dumps({"seed": seed, "train": train, "heldout": held}))
    return [prompts[i] for i in train], [prompts[i] for i in held]


def bootstrap(stat, groups: int, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of ``stat(weights)`` over resampled groups (weights: counts)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, groups, size=(n_boot, groups))
    vals = [stat(np.bincount(d, minlength=groups).astype(float)) for d in draws]
    lo, hi = np.nanpercentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def heldout_report(space, held: Path, n_boot: int, seed: int) -> dict:
    """Project the held-out replies on the train axis; separation and category means."""
    acts, rows = sl.read_activations(held), {r["id"]: r for r in sl.load_results(held)}
    rows = [rows[int(i)] for i in acts.record_id]
    cats = np.array([r.get("category", "assistant") for r in rows])
    prompt = np.array([int(r["prompt_index"]) for r in rows])
    _, prompt = np.unique(prompt, return_inverse=True)
    unit = space.axis / np.linalg.norm(space.axis, axis=-1, keepdims=True)
    proj = np.einsum("nld,ld->nl", acts.reply.astype(np.float64),
                     unit[[space.layers.index(x) for x in acts.layers]])
    ok = np.isfinite(proj).all(1)  # replies with no tokens are left out, as persona_space does
    cats, prompt, proj = cats[ok], prompt[ok], proj[ok]
    asst = cats == space.assistant
    held_space = sl.persona_space(held, seed=seed, n_boot=10)
    out = {"n_replies": int(ok.sum()), "n_empty": int((~ok).sum()), "layers": []}
    for i, layer in enumerate(acts.layers):
        p = proj[:, i]
        s_a = np.bincount(prompt[asst], p[asst]); c_a = np.bincount(prompt[asst])  # noqa: E702
        s_o = np.bincount(prompt[~asst], p[~asst]); c_o = np.bincount(prompt[~asst])  # noqa: E702

        def sep(w, s_a=s_a, c_a=c_a, s_o=s_o, c_o=c_o):
            return w @ s_a / (w @ c_a) - w @ s_o / (w @ c_o)

        j = held_space.layers.index(layer)
        cos = float(held_space.components[j, 0] @ unit[space.layers.index(layer)])
        h_unit = held_space.axis[j] / np.linalg.norm(held_space.axis[j])
        out["layers"].append({
            "layer": layer, "separation": float(sep(np.ones(prompt.max() + 1))),
            "interval": bootstrap(sep, prompt.max() + 1, n_boot, seed),
            "categories": {c: float(p[cats == c].mean()) for c in dict.fromkeys(cats)},
            "train_pc1_axis_cosine": float(space.pc1_cosine[space.layers.index(layer)]),
            "train_pc1_explained": float(space.explained[space.layers.index(layer), 0]),
            "heldout_pc1_train_axis_cosine": cos,
            "heldout_axis_train_axis_cosine": float(h_unit @ unit[space.layers.index(layer)])})
    return out


def random_control(axis, train: Path, assistant: str, seed: int):
    """A seeded random direction with the axis's norm per layer, carrying the percentiles of
    the train run's assistant replies projected on it (so it is capped the same way)."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(axis.directions.shape, generator=gen, dtype=torch.float32)
    r = r / r.norm(dim=-1, keepdim=True) * axis.norms().float()[:, None]
    vec = sl.SteeringVector(r, axis.layers)
    acts, rows = sl.read_activations(train), {r["id"]: r for r in sl.load_results(train)}
    asst = np.array([rows[int(i)].get("category") == assistant for i in acts.record_id])
    asst &= np.isfinite(acts.reply).all(axis=(1, 2))
    unit = (r / r.norm(dim=-1, keepdim=True)).double().numpy()
    ref = {layer: acts.reply[asst, acts.layers.index(layer)].astype(np.float64) @ unit[k]
           for k, layer in enumerate(axis.layers)}
    return with_reference(vec, ref, f"assistant replies of {train} on a random direction")


def run_condition(path: Path, model, prompts, axis, persona, interventions, tokens) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    drift = conversation_drift(model, [[p] for p in prompts], axis, persona=persona,
                               interventions=interventions, max_tokens=tokens,
                               batch_size=len(prompts), progress=False)
    rec = {"persona": persona.persona, "layer": drift.layer,
           "after": drift.projections[:, 0].tolist(), "before": drift.before[:, 0].tolist(),
           "replies": [r[0] for r in drift.replies]}
    path.write_text(json.dumps(rec, indent=1))
    return rec


@torch.inference_mode()
def nll(model, context: list[int], answer: list[int]) -> float:
    """Mean NLL per answer token under the unsteered model (as evaluation's ``answer_nll``)."""
    if not answer:
        return float("nan")
    hf = model.original_model
    ids = torch.tensor([context + answer], device=next(hf.parameters()).device)
    logp = torch.log_softmax(hf(input_ids=ids).logits[0].float(), -1)
    pos = torch.arange(len(context) - 1, len(context) + len(answer) - 1)
    return float(-logp[pos, torch.tensor(answer)].mean())


def distinct2(tokens: list[int]) -> float:
    grams = list(zip(tokens, tokens[1:], strict=False))
    return len(set(grams)) / len(grams) if grams else 0.0


def answer_nlls(path: Path, model, prompts, rec: dict, persona, bound: float) -> list[float]:
    """Per reply the better NLL of two contexts, the role-play question and the plain one;
    as in evaluation's rater the second is only tried when the first is above ``bound``."""
    if path.exists():
        return json.loads(path.read_text())
    tok = model.tokenizer
    out = []
    for q, a in zip(prompts, rec["replies"], strict=True):
        ans = tok(a, add_special_tokens=False)["input_ids"]
        x = nll(model, sl.encode_chat(tok, q, persona=persona), ans)
        if not persona.is_assistant and not x <= bound:
            x = min(x, nll(model, sl.encode_chat(tok, q), ans))
        out.append(x)
    path.write_text(json.dumps(out))
    return out


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def lexicon(persona: str, reply: str) -> tuple[float, float]:
    """(speaks as the role, describes itself as an assistant), each 0 or 1."""
    role = {w.lower() for w in persona.split() if len(w) > 2} | set(ROLE_WORDS[persona])
    low = f" {reply.lower()} "
    claim = re.search(rf"\bi(?: am|'m) (?:an? |the )?{re.escape(persona.lower())}", low)
    return float(bool(role & words(reply)) or bool(claim)), \
        float(any(w in low for w in ASSISTANT_WORDS))


def paired(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean of y − x over [persona, prompt] items (NaN, an empty reply's projection, left
    out), with a bootstrap interval over prompts."""
    d = y - x
    ok = np.isfinite(d)
    d = np.where(ok, d, 0.0)
    stat = lambda w: float((d * w).sum() / (ok * w).sum())  # noqa: E731
    return {"diff": stat(np.ones(d.shape[1])),
            "interval": bootstrap(stat, d.shape[1], n_boot, seed), "n": int(ok.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/persona_space"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=8)
    ap.add_argument("--n-heldout", type=int, default=8)
    ap.add_argument("--per-category", type=int, default=2,
                    help="personae of each category in the inference runs (file order)")
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    train_p, held_p = split_prompts(args.out, args.seed, args.n_train, args.n_heldout)
    with as_file(DATA / "personae.json") as f:
        everyone = sl.load_personae(f)
    cats = list(dict.fromkeys(p.category for p in everyone))
    personae = [p for c in cats for p in [q for q in everyone if q.category == c]
                [: args.per_category]]
    model = sl.load_model("embedded")
    config = sl.InferConfig(max_tokens=args.max_tokens, capture_layers=LAYERS,
                            batch_size=len(personae) * args.n_train, temperature=0.0,
                            seed=args.seed)
    for name, prompts in (("train", train_p), ("heldout", held_p)):
        sl.run_inference(model, prompts, personae, args.out / name, config, progress=False)
        logging.info("inference %s done (%.0f s)", name, time.perf_counter() - t0)
    space = sl.persona_space(args.out / "train", seed=args.seed, n_boot=args.n_boot)
    axis = space.axis_vector()
    held = heldout_report(space, args.out / "heldout", args.n_boot, args.seed)
    rand = random_control(axis, args.out / "train", space.assistant, args.seed)
    conds = {
        "a": [], "b": [sl.Steering.create(model, axis, op="cap", bounds=("25%", None))],
        "c": [sl.Steering.create(model, rand, op="cap", bounds=("25%", None))]}
    caps = {k: {layer: float(v[0].lo[i]) for i, layer in enumerate(v[0].layers)}
            for k, v in conds.items() if v}
    # capped role-play: the first persona of each other category (to fit the CPU time)
    roles = [next(p for p in personae if p.category == c) for c in cats
             if c != space.assistant]
    cap_dir = args.out / "cap"
    cap_dir.mkdir(exist_ok=True)
    recs = {k: [] for k in (*conds, "d")}
    d_rec = run_condition(cap_dir / "d.json", model, held_p, axis, sl.ASSISTANT, [],
                          args.max_tokens)
    d_nll = answer_nlls(cap_dir / "d.nll.json", model, held_p, d_rec, sl.ASSISTANT, 0.0)
    nll_ref = float(np.nanmean(d_nll))
    for k, interventions in conds.items():
        for i, p in enumerate(roles):
            rec = run_condition(cap_dir / f"{k}-{i:02d}.json", model, held_p, axis, p,
                                interventions, args.max_tokens)
            recs[k].append((p, rec, answer_nlls(cap_dir / f"{k}-{i:02d}.nll.json", model,
                                                held_p, rec, p, nll_ref + 1.0)))
        logging.info("condition %s done (%.0f s)", k, time.perf_counter() - t0)
    recs["d"] = [(p, d_rec, d_nll) for p in roles]  # the assistant's replies, each lexicon
    tok = model.tokenizer
    metrics = {}
    for k, items in recs.items():
        m = {"projection": [], "role": [], "assistant_words": [], "score": [], "coherent": []}
        for p, rec, nlls in items:
            lex = [lexicon(p.persona, r) for r in rec["replies"]]
            ok = [float(distinct2(tok(r, add_special_tokens=False)["input_ids"]) >= 0.5
                        and x <= nll_ref + 1.0) for r, x in zip(rec["replies"], nlls, strict=True)]
            m["projection"].append(rec["after"])
            m["role"].append([a for a, _ in lex])
            m["assistant_words"].append([b for _, b in lex])
            m["score"].append([a - b for a, b in lex])
            m["coherent"].append(ok)
        metrics[k] = {n: np.asarray(v, dtype=float) for n, v in m.items()}
    diffs = {f"{k}-a": {n: paired(metrics["a"][n], metrics[k][n], args.n_boot, args.seed)
                        for n in metrics["a"]} for k in ("b", "c")}
    empty = {name: {p.persona: sum(r["n_tokens"] == 0 and r["persona"] == p.persona
                                   for r in sl.load_results(args.out / name)) for p in personae}
             for name in ("train", "heldout")}
    empty["capping"] = {k: sum(not r for _, rec, _ in v for r in rec["replies"])
                        for k, v in recs.items() if k != "d"}
    empty["capping"]["d"] = sum(not r for r in d_rec["replies"])
    runs = args.out / "wall_s.json"  # seconds of each invocation, a resumed run adds one
    walls = [*(json.loads(runs.read_text()) if runs.exists() else []),
             time.perf_counter() - t0]
    runs.write_text(json.dumps(walls))
    summary = {"date": "2026-12-05", "empty_replies": empty, "wall_s": sum(walls),
               "invocations_s": walls, "args": {
        k: str(v) for k, v in vars(args).items()}, "layers": LAYERS,
        "personae": [p.persona for p in personae], "capped_personae": [p.persona for p in roles],
        "train_prompts": train_p,
        "heldout_prompts": held_p, "heldout": held, "cap_values_raw": caps, "nll_ref": nll_ref,
        "conditions": {k: {n: float(np.nanmean(v)) for n, v in m.items()}
                       for k, m in metrics.items()}, "differences": diffs,
        "examples": {k: [(p.persona, held_p[j], rec["replies"][j][:160])
                         for p, rec, _ in recs[k][:4] for j in (0,)] for k in recs}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(markdown(summary, len(roles)), encoding="utf-8")
    logging.info("done (%.0f s)\n%s", summary["wall_s"], markdown(summary, len(roles)))


def markdown(s: dict, n_roles: int) -> str:
    out = ["### Held-out separation on the train axis", "",
           "| layer | separation [95% CI] | " + " | ".join(
               s["heldout"]["layers"][0]["categories"]) + " | train PC1·axis (PC1 var) | "
           "held-out PC1·train axis | held-out axis·train axis |",
           "|---|---|" + "---|" * (len(s["heldout"]["layers"][0]["categories"]) + 3)]
    for r in s["heldout"]["layers"]:
        out.append(f"| {r['layer']} | {r['separation']:+.2f} [{r['interval'][0]:+.2f}, "
                   f"{r['interval'][1]:+.2f}] | " + " | ".join(
                       f"{v:+.2f}" for v in r["categories"].values())
                   + f" | {r['train_pc1_axis_cosine']:.2f} ({r['train_pc1_explained']:.0%}) | "
                   f"{r['heldout_pc1_train_axis_cosine']:+.2f} | "
                   f"{r['heldout_axis_train_axis_cosine']:+.2f} |")
    names = {"a": "(a) role-play", "b": "(b) role-play + axis cap 25%",
             "c": "(c) role-play + random cap 25%", "d": "(d) plain assistant"}
    out += ["", f"### Capping under role-play ({n_roles} personae × "
            f"{len(s['heldout_prompts'])} held-out prompts; projection at layer "
            f"{LAYERS[1]})", "", "| condition | projection | role words | assistant words | "
            "persona score | coherence |", "|---|---|---|---|---|---|"]
    for k, m in s["conditions"].items():
        out.append(f"| {names[k]} | {m['projection']:+.2f} | {m['role']:.0%} | "
                   f"{m['assistant_words']:.0%} | {m['score']:+.2f} | {m['coherent']:.0%} |")
    out += ["", "| difference | projection | role words | assistant words | persona score | "
            "coherence |", "|---|---|---|---|---|---|"]
    for k, d in s["differences"].items():
        cells = [f"{v['diff']:+.2f} [{v['interval'][0]:+.2f}, {v['interval'][1]:+.2f}]"
                 for v in d.values()]
        out.append(f"| ({k[0]}) − (a) | " + " | ".join(cells) + " |")
    out += ["", "Cap floors (raw, per layer): " + "; ".join(
        f"({k}) " + ", ".join(f"L{layer} {v:+.2f}" for layer, v in c.items())
        for k, c in s["cap_values_raw"].items()) + f". NLL reference {s['nll_ref']:.2f} nats; "
        f"wall time {s['wall_s'] / 60:.1f} min in {len(s['invocations_s'])} invocation(s).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
