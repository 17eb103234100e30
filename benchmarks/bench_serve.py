"""``steerlab serve``'s static engine against a direct ``generate`` on the CPU.

    python benchmarks/bench_serve.py [--tokens 48] [--repeats 3] [--concurrent 8]
        [--threads N] [--quick] [--json PATH]

A real server (``make_server``, static engine, ``max_batch`` 16, in-process on localhost) and
the embedded model (SmolLM2-135M) on the CPU, greedy, the same prompts and ``max_tokens``:

1. Lone request: one request's HTTP round trip against ``steerlab.generate`` of the same
   prompt (default engine, and ``engine="static"``). Best of ``--repeats``, interleaved.
2. Concurrent throughput: ``--concurrent`` requests at once (tokens per second of the whole
   burst) against the same requests one at a time through ``generate``.

Each is measured twice in the same run: with the step over the occupied slots' bucket (what
serve does), and with every step forced over all 16 rows (the engine before issue 27, item 8:
``SlotBatch.step_rows`` patched to the slot count), so the ratio needs no older checkout.

Target (issue 27, item 8): a lone request <= 1.1x a direct ``generate``, and the concurrent
throughput no lower than with the full step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

SLOTS = 16
MODEL = "steerlab-bench"  # the served model's name
QUESTIONS = ["Tell me a long story about a lighthouse keeper.",
             "Explain how a steam engine works, step by step.",
             "Describe a walk through a forest in autumn.",
             "Write a letter to a friend about your holidays.",
             "What should a beginner know about gardening?",
             "Give me advice on learning to play the piano.",
             "Describe the city of the future.",
             "How do bees make honey?"]


def post(url: str, question: str, tokens: int) -> int:
    """One chat completion (greedy); its completion tokens."""
    body = {"model": MODEL, "max_tokens": tokens, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return int(json.loads(resp.read())["usage"]["completion_tokens"])


def burst(url: str, questions: list[str], tokens: int) -> int:
    """All ``questions`` at once from one thread each; their completion tokens."""
    made = [0] * len(questions)
    start = threading.Barrier(len(questions))

    def client(i: int) -> None:
        start.wait()
        made[i] = post(url, questions[i], tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(made)


@contextlib.contextmanager
def full_step() -> Iterator[None]:
    """Every step over all the slots (the engine before the step followed occupancy)."""
    from steerlab.generation import SlotBatch

    saved = getattr(SlotBatch, "step_rows", None)
    if saved is None:  # an engine that always steps over every slot
        yield
        return
    SlotBatch.step_rows = property(lambda self: self.slots)  # type: ignore[method-assign]
    try:
        yield
    finally:
        SlotBatch.step_rows = saved  # type: ignore[method-assign]


def best(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds that alternate them."""
    out = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[name] = min(out[name], time.perf_counter() - t)
    return out


def patched(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with full_step():
            return fn()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens per request (48)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds, best counts")
    ap.add_argument("--concurrent", type=int, default=8, help="requests at once (8)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="8 tokens, 1 round: a smoke run")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    tokens, repeats = (8, 1) if args.quick else (args.tokens, args.repeats)
    if not 1 <= args.concurrent <= SLOTS or tokens < 2 or repeats < 1:
        ap.error(f"--concurrent 1..{SLOTS}, --tokens >= 2, --repeats >= 1")

    import logging

    import transformers

    from steerlab.generation import generate
    from steerlab.model import encode_chat, load_model, system_prompt_style
    from steerlab.serving import make_server

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("steerlab").setLevel(logging.WARNING)
    model = load_model("embedded", device="cpu")
    print(f"embedded model on the CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), serve: static engine, max_batch {SLOTS}, "
          f"{tokens} tokens per request")
    srv = make_server(model, port=0, model_name=MODEL, engine="static", max_batch=SLOTS,
                      max_context=512)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.concurrent)]
    plain = system_prompt_style("none")  # as serve encodes an assistant request
    ids = [encode_chat(model.tokenizer, q, system_prompt=plain) for q in questions]
    try:
        lone_made = post(url, questions[0], tokens)  # warm-up: workspace, step programs
        direct_made = len(generate(model, ids[:1], max_new_tokens=tokens).tokens[0])
        assert lone_made == direct_made, (lone_made, direct_made)
        with full_step():
            post(url, questions[0], tokens)
        lone = best({
            "serve": lambda: post(url, questions[0], tokens),
            "serve_full_step": patched(lambda: post(url, questions[0], tokens)),
            "generate": lambda: generate(model, ids[:1], max_new_tokens=tokens),
            "generate_static": lambda: generate(model, ids[:1], max_new_tokens=tokens,
                                                engine="static"),
        }, repeats)
        made = burst(url, questions, tokens)
        together = best({
            "serve": lambda: burst(url, questions, tokens),
            "serve_full_step": patched(lambda: burst(url, questions, tokens)),
            "generate_one_at_a_time": lambda: [generate(model, [p], max_new_tokens=tokens)
                                               for p in ids],
        }, repeats)
    finally:
        srv.shutdown()
        srv.server_close()

    print(f"\n1. lone request ({lone_made} tokens), best of {repeats}:")
    for name, s in lone.items():
        print(f"   {name:<18} {s * 1000:8.1f} ms  {s / lone['generate']:5.2f}x generate")
    ratio = lone["serve"] / lone["generate"]
    print(f"   serve / generate = {ratio:.2f} (target <= 1.1; full 16-row step: "
          f"{lone['serve_full_step'] / lone['generate']:.2f})")
    print(f"\n2. {args.concurrent} requests at once ({made} tokens), best of {repeats}:")
    for name, s in together.items():
        print(f"   {name:<22} {s * 1000:8.1f} ms  {made / s:7.1f} tok/s")
    kept = together["serve_full_step"] / together["serve"]
    print(f"   throughput vs the full 16-row step: {kept:.2f}x; vs one-at-a-time generate: "
          f"{together['generate_one_at_a_time'] / together['serve']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "tokens": tokens, "repeats": repeats, "concurrent": args.concurrent,
            "threads": torch.get_num_threads(), "lone_s": lone, "concurrent_s": together,
            "concurrent_tokens": made, "lone_ratio": ratio, "throughput_vs_full": kept},
            indent=2))


if __name__ == "__main__":
    main()
