"""The static generation engine vs the eager one (and plain HF generate) on the CPU.

    python benchmarks/bench_engine.py [--tokens 64] [--repeats 3] [--quick] [--json PATH]
        [--trace PATH]

The embedded model (SmolLM2-135M, sdpa attention) on the CPU, at batch 1 and batch 8, with
stop ids that never fire, so every run generates batch x tokens:

1. Decode-step time. Each path runs at ``--tokens`` new tokens and at 1 (prefill only). The
   decode step is ``(t(tokens) - t(1)) / (tokens - 1)``; ms/token is the whole call divided by
   the tokens. Paths: steerlab eager and static engines (``generate``), HF
   ``model.original_model.generate`` (dynamic cache, and ``cache_implementation="static"``),
   and ``generate_with_metrics(k=5)`` on both engines. Best of ``--repeats``, interleaved
   (the rounds alternate the paths), after a warm-up call of each.
2. Host syncs: ``count_host_syncs`` over a whole ``generate`` call of each engine (per decode
   step from the difference of two lengths), and over bare ``SlotBatch.step()`` calls.
3. A profiler summary (``torch.profiler``, CPU activity): per decode step, the ops that read
   the device from the host (``aten::item``, ``aten::_local_scalar_dense``,
   ``aten::is_nonzero``, ``aten::nonzero``, copies) and the number of aten ops launched (the
   dispatch overhead). ``--trace PATH`` writes a chrome trace per engine and batch
   (``PATH`` with ``-eager-b1`` etc. before the suffix).

Targets (issue 14): the static engine's decode step no slower than the eager one at batch 1
(static/eager <= 1.0), and 0 host syncs between checks (bare ``SlotBatch.step()`` calls read
nothing from the device; a whole static ``generate`` reads once per ``sync_every`` = 8 steps,
the eager one once a step). On the CPU no CUDA graph is captured (the step runs as is), so the
times here are the step's Python and dispatch cost next to a compute-bound forward, not a
graph's gain; ``benchmarks/bench_gpu.py`` (section ``engine``) measures that on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

NEVER = {-1}  # stop ids no row emits: equal work in every run
HOST_READ_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero",
                 "aten::nonzero")
COPY_OPS = ("aten::_to_copy", "aten::copy_")


def prompts_for(tok: Any, n: int) -> list[list[int]]:
    """``n`` chat prompts of different lengths (built-in prompts and personae)."""
    from steerlab.model import encode_chat, load_personae

    data = files("steerlab.builtin") / "data"
    prompts = json.loads((data / "prompts.json").read_text(encoding="utf-8"))
    personae = load_personae(data / "personae.json")
    return [encode_chat(tok, prompts[i % len(prompts)], persona=personae[i % len(personae)])
            for i in range(n)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds that alternate them."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def paths(model: Any, ids: list[list[int]]) -> tuple[dict[str, Callable[[int], Any]], dict]:
    """The generation paths, each a function of the number of new tokens; and notes on the
    paths that could not run (HF static cache on this device)."""
    from steerlab.generation import generate, generate_with_metrics
    from steerlab.model import left_pad

    hf, tok = model.original_model, model.tokenizer
    dev = next(hf.parameters()).device
    input_ids, mask = left_pad(ids, tok.pad_token_id, dev)

    def hf_generate(n: int, **kw: Any) -> Any:
        return hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, use_cache=True,
                           pad_token_id=tok.pad_token_id, **kw)

    out: dict[str, Callable[[int], Any]] = {
        "eager": lambda n: generate(model, ids, max_new_tokens=n, stop_ids=NEVER,
                                    engine="eager"),
        "static": lambda n: generate(model, ids, max_new_tokens=n, stop_ids=NEVER,
                                     engine="static"),
        "hf": hf_generate,
        "hf_static": lambda n: hf_generate(n, cache_implementation="static",
                                           disable_compile=True),
        "eager_metrics": lambda n: generate_with_metrics(model, ids, max_new_tokens=n, k=5,
                                                         stop_ids=NEVER, engine="eager"),
        "static_metrics": lambda n: generate_with_metrics(model, ids, max_new_tokens=n, k=5,
                                                          stop_ids=NEVER, engine="static"),
    }
    notes = {}
    try:
        got = out["hf_static"](4)
        if got.shape[1] != input_ids.shape[1] + 4:
            raise RuntimeError(f"generated {got.shape[1] - input_ids.shape[1]} tokens, not 4")
    except Exception as err:  # noqa: BLE001 - reported in the output instead
        notes["hf_static"] = f"HF static cache does not run here: {type(err).__name__}: {err}"
        del out["hf_static"]
    return out, notes


LABELS = {"eager": "steerlab eager", "static": "steerlab static",
          "hf": "HF generate (dynamic cache)", "hf_static": "HF generate (static cache)",
          "eager_metrics": "steerlab eager + metrics (k=5)",
          "static_metrics": "steerlab static + metrics (k=5)"}


def bench_times(model: Any, ids: list[list[int]], tokens: int, repeats: int) -> dict:
    fns, notes = paths(model, ids)
    calls = {}
    for name, fn in fns.items():
        fn(tokens)  # warm-up (allocator, workspace, step program)
        calls[f"{name}@{tokens}"] = lambda fn=fn: fn(tokens)
        calls[f"{name}@1"] = lambda fn=fn: fn(1)
    best = interleaved(calls, repeats)
    out = {}
    for name in fns:
        whole, prefill = best[f"{name}@{tokens}"], best[f"{name}@1"]
        out[name] = {"whole_s": whole, "prefill_s": prefill,
                     "ms_per_token": 1000 * whole / tokens,
                     "ms_per_step": 1000 * max(whole - prefill, 0.0) / (tokens - 1)}
    return {"paths": out, "notes": notes}


def bench_syncs(model: Any, ids: list[list[int]], tokens: int, steps: int) -> dict:
    """Host syncs over whole ``generate`` calls (per decode step from two lengths) and over
    ``steps`` bare ``SlotBatch.step()`` calls."""
    from steerlab.generation import (
        SlotBatch,
        StepProgram,
        bucket_batch,
        bucket_capacity,
        count_host_syncs,
        generate,
    )

    out: dict[str, Any] = {}
    for engine in ("eager", "static"):
        counts = {}
        for n in (1, tokens):
            with count_host_syncs() as syncs:
                generate(model, ids, max_new_tokens=n, stop_ids=NEVER, engine=engine)
            counts[n] = syncs
        out[engine] = {"whole_call": counts[tokens].count, "ops": counts[tokens].ops,
                       "prefill_only_call": counts[1].count,
                       "per_decode_step": (counts[tokens].count - counts[1].count)
                       / (tokens - 1)}
    tok = model.tokenizer
    for k in (0, 5):
        settings = StepProgram(k, False, False, (), tuple(NEVER), int(tok.pad_token_id))
        width = max(len(p) for p in ids)
        batch = SlotBatch(model, bucket_batch(len(ids)), bucket_capacity(width + steps + 2),
                          settings)
        with batch.running():
            batch.admit(range(len(ids)), ids, limits=[steps + 2] * len(ids),
                        temps=[0.0] * len(ids), seeds=[0] * len(ids))
            batch.step()
            with count_host_syncs() as syncs:
                for _ in range(steps):
                    batch.step()
        out[f"bare_step{'_metrics' if k else ''}"] = {"steps": steps, "count": syncs.count,
                                                      "ops": syncs.ops,
                                                      "per_step": syncs.count / steps}
    return out


def op_counts(prof: Any) -> dict[str, int]:
    """aten op counts of a profile: every dispatcher call, the top-level ones (launched from
    Python), and the host-read and copy ops by name."""
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    counts = {"aten_ops": len(events), "top_level_ops": 0}
    for e in events:
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        counts["top_level_ops"] += parent is None
        if e.name in HOST_READ_OPS or e.name in COPY_OPS:
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def bench_profile(model: Any, ids: list[list[int]], steps: int, trace: Path | None,
                  batch: int) -> dict:
    """Per decode step op counts of each engine: a ``generate`` of ``2 + steps`` tokens minus
    one of 2, over ``steps`` decode steps (a multiple of the static engine's check interval,
    so its checks are counted at their average rate)."""
    from torch.profiler import ProfilerActivity, profile

    from steerlab.generation import generate

    out = {}
    for engine in ("eager", "static"):
        counts = {}
        for n in (2, 2 + steps):  # the earlier sections warmed both engines up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                generate(model, ids, max_new_tokens=n, stop_ids=NEVER, engine=engine)
            counts[n] = op_counts(prof)
        if trace is not None:
            path = trace.with_name(f"{trace.stem}-{engine}-b{batch}{trace.suffix or '.json'}")
            path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(path))
            out.setdefault("traces", {})[engine] = str(path)
        big, small = counts[2 + steps], counts[2]
        names = sorted(set(big) | set(small), key=lambda k: (k not in ("aten_ops",
                                                                       "top_level_ops"), k))
        out[engine] = {name: (big.get(name, 0) - small.get(name, 0)) / steps for name in names}
    return out


def print_times(batch: int, tokens: int, repeats: int, res: dict) -> None:
    p = res["paths"]
    print(f"\nbatch {batch}, {tokens} new tokens (best of {repeats}, interleaved; "
          f"decode step = (t({tokens}) - t(1)) / {tokens - 1})")
    print(f"  {'path':34} {'ms/token':>9} {'ms/step':>9} {'static/this':>12}")
    for name, r in p.items():
        ref = p["static_metrics" if name.endswith("metrics") else "static"]["ms_per_step"]
        ratio = ref / r["ms_per_step"] if r["ms_per_step"] > 0 else float("nan")
        print(f"  {LABELS[name]:34} {r['ms_per_token']:9.1f} {r['ms_per_step']:9.1f} "
              f"{ratio:12.3f}")
    if any(r["ms_per_step"] <= 0 for r in p.values()):
        print("  (a decode step of 0 ms: the prefill-only run was slower than the whole one;"
              " noise, use more --repeats)")
    for note in res["notes"].values():
        print(f"  note: {note}")
    line = f"  static/eager step {ratios(p)['static/eager']:.3f}"
    line += " (target <= 1.0 at batch 1)" if batch == 1 else ""
    print(line + f"; static/HF {ratios(p)['static/hf']:.3f}"
          + (f"; static/HF static cache {ratios(p)['static/hf_static']:.3f}"
             if "hf_static" in p else "")
          + f"; with metrics static/eager {ratios(p)['static_metrics/eager_metrics']:.3f}")


def ratios(p: dict) -> dict[str, float]:
    def r(a: str, b: str) -> float:
        ok = b in p and p[a]["ms_per_step"] > 0 and p[b]["ms_per_step"] > 0
        return p[a]["ms_per_step"] / p[b]["ms_per_step"] if ok else float("nan")

    return {"static/eager": r("static", "eager"), "static/hf": r("static", "hf"),
            "static/hf_static": r("static", "hf_static"),
            "static_metrics/eager_metrics": r("static_metrics", "eager_metrics")}


def print_syncs(batch: int, res: dict) -> None:
    print(f"\nhost syncs, batch {batch} (count_host_syncs)")
    for engine in ("eager", "static"):
        r = res[engine]
        print(f"  {engine:7} whole generate: {r['whole_call']:4d} ({r['ops']}); "
              f"{r['per_decode_step']:.3f} per decode step")
    for key in ("bare_step", "bare_step_metrics"):
        r = res[key]
        label = "SlotBatch.step()" + (" with metrics" if key.endswith("metrics") else "")
        print(f"  {label:29} {r['count']} syncs over {r['steps']} steps = "
              f"{r['per_step']:.3f}/step (target 0)")


def print_profile(batch: int, steps: int, res: dict) -> None:
    print(f"\nprofiler, batch {batch}: per decode step over {steps} steps "
          "(CPU activity; on the CPU copies are host-to-host, not host reads)")
    names = list(dict.fromkeys([*res["eager"], *res["static"]]))
    print(f"  {'op':28} {'eager':>9} {'static':>9}")
    for name in names:
        print(f"  {name:28} {res['eager'].get(name, 0):9.2f} {res['static'].get(name, 0):9.2f}")
    for engine, path in res.get("traces", {}).items():
        print(f"  chrome trace ({engine}): {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per row (64)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds, best counts")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma list (1,8)")
    ap.add_argument("--profile-steps", type=int, default=8,
                    help="decode steps profiled (a multiple of the static check interval, 8)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (torch's default; 1 is steadier on a busy machine)")
    ap.add_argument("--quick", action="store_true", help="8 tokens, 1 round: a smoke run")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--trace", type=Path, default=None,
                    help="export chrome traces (PATH-eager-b1.json, PATH-static-b1.json, ...)")
    args = ap.parse_args()
    tokens, repeats = (8, 1) if args.quick else (args.tokens, args.repeats)
    if tokens < 2 or repeats < 1 or args.profile_steps < 1:
        ap.error("--tokens >= 2, --repeats >= 1 and --profile-steps >= 1")
    batches = [int(x) for x in args.batches.split(",") if x.strip()]

    import logging

    import transformers

    from steerlab.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("steerlab").setLevel(logging.WARNING)
    model = load_model("embedded", device="cpu")
    hf = model.original_model
    print(f"embedded model on the CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), attention {hf.config._attn_implementation}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    result: dict[str, Any] = {
        "meta": {"date": datetime.date.today().isoformat(), "device": "cpu",
                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "tokens": tokens,
                 "repeats": repeats, "batches": batches, "quick": args.quick,
                 "attention": hf.config._attn_implementation},
        "batches": {}}
    for batch in batches:
        ids = prompts_for(model.tokenizer, batch)
        walls = {}
        t = time.perf_counter()
        times = bench_times(model, ids, tokens, repeats)
        walls["times"] = time.perf_counter() - t
        print_times(batch, tokens, repeats, times)
        t = time.perf_counter()
        syncs = bench_syncs(model, ids, tokens, steps=8 if args.quick else 16)
        walls["host_syncs"] = time.perf_counter() - t
        print_syncs(batch, syncs)
        t = time.perf_counter()
        prof = bench_profile(model, ids, args.profile_steps, args.trace, batch)
        walls["profile"] = time.perf_counter() - t
        print_profile(batch, args.profile_steps, prof)
        print("  (wall s: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()) + ")")
        result["batches"][str(batch)] = {"times": times, "ratios": ratios(times["paths"]),
                                         "host_syncs": syncs, "profile": prof,
                                         "wall_s": walls}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
