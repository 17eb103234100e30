"""steerlab vs plain HF on one GPU, side by side in one process, on a random-weight model.

    python benchmarks/bench_gpu.py [--shape 8b|1b|70b-slice|tiny] [--batches 64,256]
        [--new-tokens 128] [--skip lens,cli] [--json PATH]
    python benchmarks/bench_gpu.py --device cpu --shape tiny --batches 2 --new-tokens 4  # smoke

A random-weight Llama of a real geometry (Llama-3-8B by default) with the embedded model's
tokenizer is built on the device and saved to a temp dir (no download); then every section
runs against its baseline: load, generation (eager and sdpa), the generation engines (static
vs eager vs HF static-cache compiled generate, lens and steering costs on the static engine,
CUDA graphs captured), lens cost, steering, a batch of strengths, capture, and the
`extract` / `infer` CLI end to end. Prints one table and writes
the figures as JSON (peak GPU memory per row, device, versions, date). Without a CUDA device
(and no explicit --device cpu) it prints one `skip:` line and exits 0. docs/performance.md
lists the targets.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "steerlab" / "builtin" / "data"  # the built-in prompts and personae
VOCAB = 49152  # the embedded SmolLM2 tokenizer's vocabulary
SHAPES: dict[str, dict[str, int]] = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    "70b-slice": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=8,
                      num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
SECTIONS = ("load", "generation", "engine", "lens", "steer", "strengths", "capture", "cli")
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template*")
NEVER = {-1}  # stop ids no row ever emits: every run generates batch x new_tokens
# issue 14's GPU targets for the static engine: tok/s with metrics at batch 64 and 256,
# 128 new tokens, 8b shape, bf16
ENGINE_TOKS = {64: 5000.0, 256: 12000.0}
LENS_MAX, STEER_MAX = 1.3, 1.03  # lens / plain metrics time; steered / unsteered time


@dataclass(frozen=True)
class Run:
    """Best wall time of a measurement and the peak GPU memory while it ran (None on CPU)."""

    s: float
    peak_mb: float | None = None


@dataclass
class Bench:
    """What every section needs."""

    args: argparse.Namespace
    dev: torch.device
    dtype: torch.dtype
    path: Path
    work: Path
    model: Any = None  # the steerlab bridge (sdpa) shared by sections 3-6, loaded on demand

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    def steerlab_model(self) -> Any:
        if self.model is None:
            self.model = load_steerlab(self, "sdpa")
        return self.model


def sync(b: Bench) -> None:
    if b.cuda:
        torch.cuda.synchronize(b.dev)


def reset_peak(b: Bench) -> None:
    if b.cuda:
        torch.cuda.reset_peak_memory_stats(b.dev)


def peak_mb(b: Bench) -> float | None:
    return torch.cuda.max_memory_allocated(b.dev) / 2**20 if b.cuda else None


def free(b: Bench) -> None:
    gc.collect()
    if b.cuda:
        torch.cuda.empty_cache()


def timed(b: Bench, fn: Callable[[], Any], repeats: int,
          warmup: Callable[[], Any] | None = None) -> Run:
    """Warm up, then the best of ``repeats`` synchronised runs, with the peak memory."""
    (warmup or fn)()
    sync(b)
    reset_peak(b)
    best = math.inf
    for _ in range(repeats):
        sync(b)
        t = time.perf_counter()
        fn()
        sync(b)
        best = min(best, time.perf_counter() - t)
    return Run(best, peak_mb(b))


def row(name: str, ours: Run, base: Run, target: str, work: int | None = None) -> dict:
    """A table row: tok/s (ratio steerlab/baseline throughput) when ``work`` tokens are given,
    otherwise seconds (ratio steerlab/baseline time)."""
    a, c, unit = (work / ours.s, work / base.s, "tok/s") if work else (ours.s, base.s, "s")
    return {"measurement": name, "unit": unit, "steerlab": a, "baseline": c, "ratio": a / c,
            "target": target, "steerlab_s": ours.s, "baseline_s": base.s,
            "peak_gpu_mb": {"steerlab": ours.peak_mb, "baseline": base.peak_mb}}


# -- the model -------------------------------------------------------------------------------

def build_model(shape: dict[str, int], dev: torch.device, dtype: torch.dtype, out: Path) -> int:
    """Save a random-weight Llama of ``shape`` with the embedded tokenizer; returns #params."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from steerlab.model import embedded_model_dir

    src = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **shape,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(dev):
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    n = sum(p.numel() for p in hf.parameters())
    hf.save_pretrained(out)
    del hf
    for pattern in TOKENIZER_FILES:
        for f in src.glob(pattern):
            shutil.copy(f, out / f.name)
    return n


def load_steerlab(b: Bench, attn: str | None = None) -> Any:
    import steerlab

    kwargs = {} if attn is None else {"attn_implementation": attn}
    return steerlab.load_model(b.path, device=str(b.dev), dtype=b.dtype, **kwargs)


def load_hf(b: Bench, attn: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs = {} if attn is None else {"attn_implementation": attn}
    return AutoModelForCausalLM.from_pretrained(b.path, dtype=b.dtype, device_map={"": str(b.dev)},
                                                **kwargs).eval()


def off_device(b: Bench, model: Any) -> tuple[int, int]:
    """(parameters, buffers) of the bridge and its HF model that are not on ``b.dev``."""
    def here(t: torch.Tensor) -> bool:
        return t.device.type == b.dev.type and (b.dev.index is None or
                                                (t.device.index or 0) == b.dev.index)

    mods = [m for m in (model, getattr(model, "original_model", None)) if m is not None]
    params = {id(p): p for m in mods for p in m.parameters()}
    buffers = {id(t): t for m in mods for t in m.buffers()}
    return (sum(not here(p) for p in params.values()),
            sum(not here(t) for t in buffers.values()))


def chat_prompts(tok: Any, n: int) -> list[list[int]]:
    from steerlab.model import encode_chat, load_personae

    prompts = json.loads((DATA / "prompts.json").read_text())
    personae = load_personae(DATA / "personae.json")
    return [encode_chat(tok, prompts[i % len(prompts)], persona=personae[i % len(personae)])
            for i in range(n)]


def random_pairs(n: int, seed: int = 0) -> list[Any]:
    from steerlab.traits import Pair

    rng = random.Random(seed)
    words = ("sea wind sail ship storm gold map island crew anchor harbour rope deck "
             "captain parrot wave tide star night dawn").split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k)) + "."

    return [Pair(str(i), f"Question {i}: {text(8)}", f"Arr, {text(40)}", f"Well, {text(40)}")
            for i in range(n)]


# -- sections --------------------------------------------------------------------------------

def bench_load(b: Bench) -> dict:
    reps = max(1, b.args.repeats)
    times: dict[str, list[Run]] = {"steerlab": [], "hf": []}
    placement = (0, 0)
    free(b)
    for i in range(reps + 1):  # the first round warms the page cache and allocator
        for name, load in (("hf", load_hf), ("steerlab", load_steerlab)):
            free(b)
            reset_peak(b)
            sync(b)
            t = time.perf_counter()
            m = load(b)
            sync(b)
            run = Run(time.perf_counter() - t, peak_mb(b))
            if name == "steerlab":
                placement = off_device(b, m)
            del m
            if i:
                times[name].append(run)
    free(b)
    ours, base = (min(times[k], key=lambda r: r.s) for k in ("steerlab", "hf"))
    return {"rows": [row("load_model vs HF from_pretrained", ours, base, "<= 1.2")],
            "params_off_device": placement[0], "buffers_off_device": placement[1]}


def bench_generation(b: Bench) -> dict:
    rows = []
    for attn in ("eager", "sdpa"):
        model = load_steerlab(b, attn)
        rows += generation_rows(b, model, load_hf(b, attn), attn)
        if attn == "sdpa" and b.model is None:
            b.model = model  # sections 3-6 reuse it
        del model
        free(b)
    return {"rows": rows}


def generation_rows(b: Bench, model: Any, hf: Any, attn: str) -> list[dict]:
    """steerlab generate (with and without metrics) vs HF generate, same attention."""
    import steerlab
    from steerlab.generation import generate_with_metrics
    from steerlab.model import left_pad

    rows, n, tok = [], b.args.new_tokens, model.tokenizer
    for batch in b.args.batches:
        ids = chat_prompts(tok, batch)
        input_ids, mask = left_pad(ids, tok.pad_token_id, b.dev)
        paths = {
            "hf": lambda k, i=input_ids, m=mask: hf.generate(
                input_ids=i, attention_mask=m, max_new_tokens=k, min_new_tokens=k,
                do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id),
            "metrics": lambda k, i=ids: generate_with_metrics(model, i, max_new_tokens=k,
                                                              stop_ids=NEVER),
            "plain": lambda k, i=ids: steerlab.generation.generate(model, i, max_new_tokens=k,
                                                        stop_ids=NEVER),
        }
        runs = {name: timed(b, lambda f=f: f(n), b.args.repeats, lambda f=f: f(min(n, 4)))
                for name, f in paths.items()}
        rows.append(row(f"generate + metrics, batch {batch}, {attn}", runs["metrics"],
                        runs["hf"], ">= 0.9", batch * n))
        rows.append(row(f"generate, batch {batch}, {attn}", runs["plain"], runs["hf"],
                        ">= 0.9", batch * n))
    return rows


def interleaved(b: Bench, fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Run]:
    """Best synchronised wall time of each (warmed-up) function over ``repeats`` rounds that
    alternate them, so a slow spell of the machine hits every path; with each peak memory."""
    best = dict.fromkeys(fns, math.inf)
    peaks: dict[str, float | None] = dict.fromkeys(fns)
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(b)
            reset_peak(b)
            t = time.perf_counter()
            fn()
            sync(b)
            best[name] = min(best[name], time.perf_counter() - t)
            p = peak_mb(b)
            peaks[name] = p if peaks[name] is None else max(peaks[name] or 0.0, p or 0.0)
    return {name: Run(best[name], peaks[name]) for name in fns}


def hf_static_generate(b: Bench, hf: Any, pad_id: int, input_ids: torch.Tensor,
                       mask: torch.Tensor, compiled: bool) -> Callable[[int], Any]:
    """HF ``generate`` with ``cache_implementation="static"``; with ``compiled`` the decode
    forward is ``torch.compile(mode="reduce-overhead")``-ed by generate itself (its
    ``compile_config``: HF's way of compiling ``model.__call__`` for static-cache decoding;
    the prefill runs uncompiled), else ``disable_compile``."""
    from transformers import CompileConfig

    extra: dict[str, Any] = (
        {"compile_config": CompileConfig(mode="reduce-overhead", fullgraph=False,
                                         dynamic=False)}
        if compiled else {"disable_compile": True})

    def call(k: int) -> Any:
        return hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, use_cache=True,
                           pad_token_id=pad_id, cache_implementation="static", **extra)

    return call


def graphs_captured(model: Any) -> int:
    """Decode steps of ``model``'s static-engine workspaces that replay a CUDA graph."""
    from steerlab.generation import workspaces

    kept = workspaces(model)
    return sum(step.graph is not None for ws in kept.values() for step in ws.steps.values())


def bench_engine(b: Bench) -> dict:
    """The static engine vs the eager one and vs HF's static-cache compiled generate, with
    metrics; the lens and steering costs on the static engine; the graphs captured.

    Every path is warmed up at the full ``--new-tokens`` (the static engine's buckets, hence
    its captured graphs, and HF's compiled shapes depend on the length), then the timed runs
    alternate the paths."""
    import steerlab
    from steerlab.generation import captures, generate_with_metrics, release_workspaces
    from steerlab.model import left_pad

    model, n = b.steerlab_model(), b.args.new_tokens
    tok = model.tokenizer
    hf = load_hf(b, "sdpa")  # the anchor: its own model, compiled by HF's generate on CUDA
    vec = random_vector(model)
    compiled, notes = b.cuda, []
    if not b.cuda:
        notes.append("HF baseline: static-cache generate, not compiled (torch.compile is "
                     "skipped on the CPU: inductor's C++ build would dominate a smoke run)")
    rows, timed_captures, per_batch = [], 0, {}
    for batch in b.args.batches:
        ids = chat_prompts(tok, batch)
        input_ids, mask = left_pad(ids, tok.pad_token_id, b.dev)

        def metrics(engine: str, lens: bool = False, i: list = ids) -> Any:
            return generate_with_metrics(model, i, max_new_tokens=n, lens=lens,
                                         stop_ids=NEVER, engine=engine)

        def plain(steered: bool, i: list = ids) -> Any:
            if not steered:
                return steerlab.generation.generate(model, i, max_new_tokens=n, stop_ids=NEVER,
                                         engine="static")
            with steerlab.steer(model, vec, 4.0):
                return steerlab.generation.generate(model, i, max_new_tokens=n, stop_ids=NEVER,
                                         engine="static")

        anchor = hf_static_generate(b, hf, tok.pad_token_id, input_ids, mask, compiled)
        if compiled:
            try:
                sync(b)
                t = time.perf_counter()
                anchor(n)  # compiles this batch's decode shapes, records its graphs
                sync(b)
                if getattr(hf, "_compiled_call", None) is None:
                    raise RuntimeError("generate did not compile the forward")
                per_batch.setdefault(batch, {})["hf_compile_warmup_s"] = \
                    time.perf_counter() - t
            except Exception as err:  # noqa: BLE001 - the baseline falls back, noted
                import torch._dynamo

                traceback.print_exc()
                compiled = False
                torch._dynamo.reset()
                notes.append(f"HF baseline: torch.compile failed at batch {batch} "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                             "from there on plain static-cache generate")
                anchor = hf_static_generate(b, hf, tok.pad_token_id, input_ids, mask, False)
        fns = {"eager": lambda: metrics("eager"), "static": lambda: metrics("static"),
               "hf": lambda a=anchor: a(n), "lens": lambda: metrics("static", lens=True),
               "unsteered": lambda: plain(False), "steered": lambda: plain(True)}
        for fn in fns.values():
            fn()  # warm-up at the full length
        before = captures(model)
        runs = interleaved(b, fns, b.args.repeats)
        timed_captures += captures(model) - before
        work = batch * n
        anchor_name = "HF static cache" + (" + compile" if compiled else "")
        toks = ENGINE_TOKS.get(batch)
        rows += [
            row(f"engine: static + metrics vs {anchor_name}, batch {batch}", runs["static"],
                runs["hf"], ">= 1.0", work),
            row(f"engine: static + metrics vs eager + metrics, batch {batch}",
                runs["static"], runs["eager"],
                f">= {toks:,.0f} tok/s (8b)" if toks else "(info)", work),
            row(f"engine: static, metrics + lens (all layers) vs metrics, batch {batch}",
                runs["lens"], runs["static"], f"<= {LENS_MAX}"),
            row(f"engine: static, steered (all layers) vs unsteered, batch {batch}",
                runs["steered"], runs["unsteered"], f"<= {STEER_MAX}"),
        ]
        per_batch.setdefault(batch, {})["baseline"] = anchor_name
    result = {"rows": rows, "targets": engine_targets(b, rows),
              "captures": captures(model), "graphs_captured": graphs_captured(model),
              "captures_during_timed_runs": timed_captures, "baseline_compiled": compiled,
              "notes": notes, "per_batch": {str(k): v for k, v in per_batch.items()}}
    release_workspaces(model)  # the static caches and graphs: later sections need the memory
    del hf
    if b.cuda:
        import torch._dynamo

        torch._dynamo.reset()  # HF's compiled graphs and their CUDA graph pools
    free(b)
    return result


def engine_targets(b: Bench, rows: list[dict]) -> list[dict]:
    """Issue 14's GPU targets with the figures measured here; ``applies`` is False where
    this run is not the setting a target is stated for (``setting``)."""
    full = (b.cuda and b.args.shape == "8b" and b.dtype == torch.bfloat16
            and b.args.new_tokens == 128)
    out = []

    def target(text: str, measured: float, met: bool, applies: bool, setting: str) -> None:
        out.append({"target": text, "measured": measured, "met": met, "applies": applies,
                    "setting": setting})

    for r in rows:
        name, batch = r["measurement"], int(r["measurement"].rsplit(" ", 1)[-1])
        if "vs eager" in name and batch in ENGINE_TOKS:
            target(f"static + metrics >= {ENGINE_TOKS[batch]:,.0f} tok/s, batch {batch}",
                   r["steerlab"], r["steerlab"] >= ENGINE_TOKS[batch], full,
                   "a GPU, 8b shape, bf16, 128 new tokens")
        elif "vs HF" in name:
            target(f"static + metrics >= HF static-cache compiled generate, batch {batch}",
                   r["ratio"], r["ratio"] >= 1.0, b.cuda and "+ compile" in name,
                   "a GPU, HF's generate compiled")
        elif "lens" in name:
            target(f"lens <= {LENS_MAX}x plain metrics, batch {batch}", r["ratio"],
                   r["ratio"] <= LENS_MAX, b.cuda, "a GPU")
        elif "steered" in name:
            target(f"steered <= {STEER_MAX}x unsteered, batch {batch}", r["ratio"],
                   r["ratio"] <= STEER_MAX, b.cuda, "a GPU")
    return out

def bench_lens(b: Bench) -> dict:
    from steerlab.generation import generate_with_metrics

    model, batch, n = b.steerlab_model(), b.args.batches[0], b.args.new_tokens
    ids = chat_prompts(model.tokenizer, batch)

    def run(lens: bool, k: int = n) -> Any:
        return generate_with_metrics(model, ids, max_new_tokens=k, lens=lens, stop_ids=NEVER)

    on = timed(b, lambda: run(True), b.args.repeats, lambda: run(True, min(n, 4)))
    off = timed(b, lambda: run(False), b.args.repeats, lambda: run(False, min(n, 4)))
    return {"rows": [row(f"metrics with lens vs without, batch {batch}", on, off, "(cost)")]}


def random_vector(model: Any) -> Any:
    from steerlab.steering import SteeringVector

    g = torch.Generator().manual_seed(0)
    d = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=g)
    return SteeringVector(d / d.norm(dim=-1, keepdim=True), tuple(range(model.cfg.n_layers)))


def bench_steer(b: Bench) -> dict:
    import steerlab

    model, batch, n = b.steerlab_model(), b.args.batches[0], b.args.new_tokens
    ids, vec = chat_prompts(model.tokenizer, batch), random_vector(model)

    def plain(k: int = n) -> Any:
        return steerlab.generation.generate(model, ids, max_new_tokens=k, stop_ids=NEVER)

    def steered(k: int = n) -> Any:
        with steerlab.steer(model, vec, 4.0):
            return plain(k)

    off = timed(b, plain, b.args.repeats, lambda: plain(min(n, 4)))
    on = timed(b, steered, b.args.repeats, lambda: steered(min(n, 4)))
    return {"rows": [row(f"steered vs unsteered generate, batch {batch}, all layers", on, off,
                         "<= 1.05")]}


def bench_strengths(b: Bench) -> dict:
    import steerlab

    model, n = b.steerlab_model(), b.args.new_tokens
    prompt, vec = chat_prompts(model.tokenizer, 1)[0], random_vector(model)
    alphas = [0.5 * (i + 1) for i in range(8)]

    def one_batch() -> None:
        with steerlab.steer(model, vec, torch.tensor(alphas)):
            steerlab.generation.generate(model, [prompt] * 8, max_new_tokens=n, stop_ids=NEVER)

    def sequential() -> None:
        for a in alphas:
            with steerlab.steer(model, vec, a):
                steerlab.generation.generate(model, [prompt], max_new_tokens=n, stop_ids=NEVER)

    ours = timed(b, one_batch, b.args.repeats)
    base = timed(b, sequential, 1, warmup=lambda: None)  # one_batch warmed up the same path
    return {"rows": [row("8 strengths in one batch vs 8 sequential runs", ours, base,
                         "(lower is better)")]}


def bench_capture(b: Bench) -> dict:
    import steerlab
    from steerlab.extraction import tokenize_pair
    from steerlab.model import left_pad

    model, tiny = b.steerlab_model(), b.args.shape == "tiny"
    tok, hf = model.tokenizer, model.original_model
    n, size = (8, 4) if tiny else (256, 32)
    pairs = random_pairs(n)
    batches = [pairs[i : i + size] for i in range(0, n, size)]
    layers = list(range(model.cfg.n_layers))
    padded = []
    for batch in batches:
        t = [tokenize_pair(tok, p.prompt, p.chosen, p.rejected) for p in batch]
        padded.append(left_pad([x.chosen for x in t] + [x.rejected for x in t],
                               tok.pad_token_id, b.dev))
    n_tokens = sum(int(m.sum()) for _, m in padded)

    def bare() -> None:
        with torch.inference_mode():
            for ids, mask in padded:
                hf(input_ids=ids, attention_mask=mask, logits_to_keep=1,  # capture needs none
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)

    def ours() -> None:
        for batch in batches:
            steerlab.capture_pairs(model, batch, layers)

    base, mine = timed(b, bare, b.args.repeats), timed(b, ours, b.args.repeats)
    name = f"capture_pairs (all layers) vs bare HF forward, {n} pairs"
    return {"rows": [row(name, mine, base, ">= 0.95", n_tokens)], "pairs": n,
            "tokens": n_tokens}


def run_cli(b: Bench, commands: list[list[str]]) -> tuple[list[dict], float]:
    """Run ``steerlab CMD`` for each command, one after another in one child process.

    Returns per command ``wall_s``, ``peak_gpu_mb`` (None on CPU), ``rss_mb`` and the child's
    start-up time (interpreter, imports, CUDA context), paid once instead of per command.
    """
    report, todo = b.work / "cli-report.json", b.work / "cli-commands.json"
    todo.write_text(json.dumps(commands))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--cli-child", str(todo), str(report)],
                         capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(f"steerlab CLI child failed ({out.returncode}):\n"
                           f"{out.stderr[-3000:]}")
    runs = json.loads(report.read_text())
    return runs, wall - sum(r["wall_s"] for r in runs)


def cli_child(todo: str, report: str) -> None:
    """Hidden mode: run each ``steerlab ARGV`` of ``todo`` here, timing each and recording
    its peak memory (the CUDA peak is reset and the previous model freed in between)."""
    import transformer_lens.model_bridge  # noqa: F401  imports are start-up, not command time

    from steerlab.cli import main

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
    runs = []
    for argv in json.loads(Path(todo).read_text()):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**20 if cuda else None
        sys.argv = ["steerlab", *argv]
        t = time.perf_counter()
        try:
            main()
        except SystemExit as err:
            if err.code not in (0, None):
                raise
        runs.append({"argv": argv, "wall_s": time.perf_counter() - t,
                     "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                     "resident_before_mb": resident,
                     "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    Path(report).write_text(json.dumps(runs))


def bench_cli(b: Bench) -> dict:
    import yaml

    from steerlab.traits import save_pairs

    b.model = None
    free(b)  # the child needs the GPU memory
    tiny = b.args.shape == "tiny"
    counts, size = ((4, 16), 4) if tiny else ((64, 256), 16)
    dtype = str(b.dtype).removeprefix("torch.")
    commands = []
    for i, n in enumerate((counts[0], *counts)):  # the first run warms up the child
        d = b.work / f"extract-{i}-{n}"
        d.mkdir()
        save_pairs(random_pairs(n), d / "pairs.jsonl")
        cfg = {"model": str(b.path), "pairs": str(d / "pairs.jsonl"), "output": str(d / "a.h5"),
               "dtype": dtype, "device": str(b.dev), "layers": "all", "batch_size": size,
               "flush_every": 64, "log_file": str(d / "extract.log")}
        (d / "extract.yaml").write_text(yaml.safe_dump(cfg))
        commands.append(["extract", "--config", str(d / "extract.yaml"), "--no-progress"])
    batch, n = b.args.batches[0], b.args.new_tokens
    d = b.work / "infer"
    d.mkdir()
    prompts = json.loads((DATA / "prompts.json").read_text())
    (d / "prompts.json").write_text(json.dumps(
        [f"{prompts[i % len(prompts)]} ({i})" for i in range(batch)]))
    (d / "personae.json").write_text(json.dumps(
        [{"persona": "assistant", "category": "assistant", "article": "an"}]))
    commands.append(["infer", "--prompts-json", str(d / "prompts.json"),
                     "--personae-json", str(d / "personae.json"), "--model", str(b.path),
                     "--max-tokens", str(n), "--batch-size", str(batch), "--dtype", dtype,
                     "--device", str(b.dev), "--output-dir", str(d / "run"), "--no-progress"])
    (warm, small, large, infer), startup = run_cli(b, commands)

    def run(r: dict) -> Run:
        return Run(r["wall_s"], r["peak_gpu_mb"])

    rows = [row(f"extract CLI wall time, {counts[1]} vs {counts[0]} pairs", run(large),
                run(small), "(scales with pairs)")]
    key, unit = ("peak_gpu_mb", "MB GPU") if b.cuda else ("rss_mb", "MB RSS")
    rows.append({**row(f"extract CLI peak memory, {counts[1]} vs {counts[0]} pairs",
                       run(large), run(small), "~1.0 (flat)"),
                 "unit": unit, "steerlab": large[key], "baseline": small[key],
                 "ratio": large[key] / small[key]})

    def hf_job() -> None:  # the same job as a plain in-process HF script: load + generate
        from transformers import AutoTokenizer

        from steerlab.model import left_pad

        hf, tok = load_hf(b), AutoTokenizer.from_pretrained(b.path)
        ids, mask = left_pad(chat_prompts(tok, batch), tok.pad_token_id or 0, b.dev)
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=tok.pad_token_id)

    base = timed(b, hf_job, 1, warmup=lambda: None)
    free(b)
    rows.append(row(f"infer CLI vs in-process HF load + generate, batch {batch}", run(infer),
                    base, "(info)"))
    return {"rows": rows, "extract_pairs": list(counts), "child_startup_s": startup,
            "commands": [warm, small, large, infer]}


BENCHES: dict[str, Callable[[Bench], dict]] = {
    "load": bench_load, "generation": bench_generation, "engine": bench_engine,
    "lens": bench_lens,
    "steer": bench_steer, "strengths": bench_strengths, "capture": bench_capture,
    "cli": bench_cli,
}


# -- output ----------------------------------------------------------------------------------

def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if unit != "s" else f"{value:.3f}"


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    meta = result["meta"]
    table = Table(title=f"bench_gpu: {meta['shape']} on {meta['device_name']} ({meta['dtype']})")
    for col in ("measurement", "unit", "steerlab", "baseline", "ratio", "target",
                "peak GPU GB (ours/base)"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for section in result["sections"].values():
        for r in section["rows"]:
            peak = r["peak_gpu_mb"]
            gb = ("-" if peak["steerlab"] is None else
                  f"{peak['steerlab'] / 1024:.1f}/{(peak['baseline'] or 0) / 1024:.1f}")
            table.add_row(r["measurement"], r["unit"], fmt(r["steerlab"], r["unit"]),
                          fmt(r["baseline"], r["unit"]), f"{r['ratio']:.3f}", r["target"], gb)
    console = Console(width=max(Console().width, 130))
    console.print(table)
    for name, section in result["sections"].items():
        if "error" in section:
            console.print(f"{name} failed: {section['error']}", markup=False, highlight=False)
    engine = result["sections"].get("engine")
    if engine and "error" not in engine:
        print_engine(console, engine)
    load = result["sections"].get("load")
    if load and "error" not in load:
        console.print(f"parameters not on {meta['device']}: {load['params_off_device']} "
                      f"(buffers: {load['buffers_off_device']}; target 0)")


def print_engine(console: Any, engine: dict) -> None:
    """The engine section's targets (met or not, and whether this run is their setting), its
    captures and its notes."""
    for t in engine["targets"]:
        verdict = ("met" if t["met"] else "MISSED") if t["applies"] else \
            f"not checked (stated for {t['setting']})"
        console.print(f"engine target: {t['target']}: measured {t['measured']:,.3f}, {verdict}",
                      markup=False, highlight=False)
    console.print(f"engine: {engine['captures']} step programs built, "
                  f"{engine['graphs_captured']} replaying a CUDA graph; "
                  f"{engine['captures_during_timed_runs']} built during the timed runs "
                  "(target 0)", markup=False, highlight=False)
    for note in engine["notes"]:
        console.print(f"engine note: {note}", markup=False, highlight=False)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("steerlab", "torch", "transformers", "transformer-lens"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default), cuda:N or cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPUs, float32 on CPU")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the shape's; 8 for 70b-slice)")
    ap.add_argument("--batches", default="64,256", help="generation batch sizes, comma list")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per row, the best counts (default 2; 1 for tiny)")
    ap.add_argument("--skip", default="", help=f"sections to skip, comma list of {SECTIONS}")
    ap.add_argument("--json", type=Path, default=None,
                    help="result file (default: bench_gpu-<date>.json in the temp dir)")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.shape == "tiny" else 2
    try:
        args.batches = [int(x) for x in args.batches.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--batches {args.batches!r}: expected a comma list of integers like 64,256")
    if not args.batches or min(args.batches) < 1 or args.new_tokens < 1 or args.repeats < 1:
        ap.error("--batches, --new-tokens and --repeats need values >= 1")
    args.skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    if args.skip - set(SECTIONS):
        ap.error(f"--skip {sorted(args.skip - set(SECTIONS))}: expected some of {SECTIONS}")
    return args


def main() -> None:
    if sys.argv[1:2] == ["--cli-child"]:
        return cli_child(sys.argv[2], sys.argv[3])
    args = parse_args()
    dev = torch.device(args.device or "cuda")
    if dev.type != "cpu" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None else
               f"no CUDA device is visible (CUDA {torch.version.cuda})")
        print(f"skip: no CUDA device: {why}, torch {torch.__version__}; run on a GPU node, "
              "or pass --device cpu --shape tiny for a smoke test")
        return
    import logging

    import transformers

    from steerlab.model import parse_dtype

    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("steerlab").setLevel(logging.WARNING)
    if dev.type == "cpu" and args.shape == "tiny":
        # Smoke test: matmuls this small gain nothing from threads, and a test shares its cores.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the CLI child too
    dtype = parse_dtype(args.dtype or ("float32" if dev.type == "cpu" else "bfloat16"))
    shape = dict(SHAPES[args.shape])
    if args.layers or args.shape == "70b-slice":
        shape["num_hidden_layers"] = args.layers or 8
    today = datetime.date.today().isoformat()
    out = args.json or Path(tempfile.gettempdir()) / f"bench_gpu-{today}.json"
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        n_params = build_model(shape, dev, dtype, work / "model")
        built = time.perf_counter() - t
        b = Bench(args, dev, dtype, work / "model", work)
        meta = {"date": today, "device": str(dev),
                "device_name": torch.cuda.get_device_name(dev) if b.cuda else
                platform.processor() or platform.machine(),
                "cuda": torch.version.cuda, "python": platform.python_version(),
                **versions(), "shape": args.shape, "config": shape, "vocab_size": VOCAB,
                "params": n_params, "weights_mb": n_params * dtype.itemsize / 2**20,
                "dtype": str(dtype).removeprefix("torch."), "batches": args.batches,
                "new_tokens": args.new_tokens, "repeats": args.repeats,
                "build_and_save_s": built, "argv": sys.argv[1:]}
        result: dict[str, Any] = {"meta": meta, "sections": {}}
        for name in (s for s in SECTIONS if s not in args.skip):
            t = time.perf_counter()
            try:
                section = BENCHES[name](b)
            except Exception as err:  # keep the other sections' figures (GPU time is scarce)
                traceback.print_exc()
                section = {"rows": [], "error": f"{type(err).__name__}: {err}"[-4000:]}
                b.model = None
                free(b)
            result["sections"][name] = {**section, "wall_s": time.perf_counter() - t}
            write_json(out, result)  # after every section: a killed run keeps what it measured
        b.model = None
    print_table(result)
    print(f"wrote {out}")
    failed = [k for k, v in result["sections"].items() if "error" in v]
    if failed:
        sys.exit(f"failed sections: {', '.join(failed)} (errors in the JSON and above)")


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
