"""Bad input across every command: one line, exit code 2, nothing loaded, nothing changed.

Each row of ``CLI_ROWS`` is a command line (``{name}`` placeholders name files of the shared
workspace below) and a fragment its one error line must contain. Every row runs the real
entry point in-process (``steerlab.cli.main``) with the workspace as working folder and the
model loader replaced by a tripwire, and checks: exit code 2, exactly one stderr line, it
starts with ``error:`` and holds the fragment, no traceback, the model never loaded, and every
file of the workspace byte-for-byte unchanged with nothing added (no partial output).
The served API's table is ``tests/test_bad_requests.py``; ``test_counts`` prints both sizes.
Concurrent writers and half-written runs are tested with real processes at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port

from steerlab.extraction.attributes import StoreMeta
from steerlab.extraction.store import Rows, write_rows_file
from steerlab.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    id: str
    args: tuple[str, ...]
    fragment: str


def row(id_: str, fragment: str, *args: str) -> Row:
    return Row(id_, args, fragment)


INFER = ("infer", "--prompts-json", "{prompts}", "--personae-json", "{personae}",
         "--output-dir", "{w}/new-run")
REPORT = ("report", "{run}")
EVAL = ("vectors", "eval", "{vec}", "--output", "{w}/new-eval")
COLLECT = ("traits", "collect", "pirate", "--run-dir", "{w}/new-collect")
GENERATE = ("traits", "generate", "pirate", "--base-url", "http://127.0.0.1:9/v1", "--model",
            "m", "--api-key-env", "", "--output", "{w}/new-trait.json", "--force",
            "--retries", "0")
CHAT = ("chat",)
FIT = ("vectors", "fit", "{acts}", "-o", "{w}/new-vec")
EXPORT = ("vectors", "export-gguf", "{vec}", "-o", "{w}/new.gguf")
FILTER = ("traits", "filter", "pirate", "--run-dir", "{trun}", "--output", "{w}/new-pairs.jsonl")
JUDGE = ("traits", "judge", "pirate", "--run-dir", "{trun}")
SERVE = ("serve", "--port", "0")

CLI_ROWS: list[Row] = [
    # infer: input files
    row("infer-prompts-missing", "no such file", *INFER[:2], "{w}/nope.json", *INFER[3:]),
    row("infer-prompts-folder", "is a folder", *INFER[:2], "{dir}", *INFER[3:]),
    row("infer-prompts-bytes", "not UTF-8", *INFER[:2], "{bytes}", *INFER[3:]),
    row("infer-prompts-bad-json", "not valid JSON", *INFER[:2], "{badjson}", *INFER[3:]),
    row("infer-prompts-empty", "non-empty", *INFER[:2], "{emptylist}", *INFER[3:]),
    row("infer-prompts-ints", "expected a string", *INFER[:2], "{ints}", *INFER[3:]),
    row("infer-personae-bytes", "not UTF-8", *INFER[:4], "{bytes}", *INFER[5:]),
    row("infer-personae-empty", "non-empty", *INFER[:4], "{emptylist}", *INFER[5:]),
    row("infer-personae-no-name", "persona", *INFER[:4], "{noname}", *INFER[5:]),
    row("infer-personae-folder", "is a folder", *INFER[:4], "{dir}", *INFER[5:]),
    # infer: numbers
    row("infer-temperature-nan", "finite", *INFER, "--temperature", "nan"),
    row("infer-temperature-inf", "finite", *INFER, "--temperature", "inf"),
    row("infer-temperature-negative", ">= 0", *INFER, "--temperature", "-1"),
    row("infer-max-tokens-0", ">= 1", *INFER, "--max-tokens", "0"),
    row("infer-max-tokens-negative", ">= 1", *INFER, "--max-tokens", "-5"),
    row("infer-max-tokens-text", "Invalid value for '--max-tokens'", *INFER, "--max-tokens",
        "many"),
    row("infer-batch-size-0", "batch_size", *INFER, "--batch-size", "0"),
    row("infer-n-reps-0", "n_reps", *INFER, "--n-reps", "0"),
    row("infer-top-k-huge", "vocabulary", *INFER, "--top-k-mass-k", "100000"),
    row("infer-top-k-0", "top_k_mass_k", *INFER, "--top-k-mass-k", "0"),
    row("infer-seed-huge", "seed", *INFER, "--seed", str(2**70)),
    row("infer-seed-negative", "seed", *INFER, "--seed", "-1"),
    row("infer-style-bad", "system_prompt_style", *INFER, "--system-prompt-style", "{{nope}}"),
    # infer: outputs, model flags, shards
    row("infer-output-is-file", "is a file", *INFER[:5], "--output-dir", "{file}"),
    row("infer-output-under-file", "a file", *INFER[:5], "--output-dir", "{file}/run"),
    row("infer-output-read-only", "cannot write", *INFER[:5], "--output-dir", "{ro}/run"),
    row("infer-output-corrupt-config", "not valid JSON", *INFER[:5], "--output-dir",
        "{corruptrun}"),
    row("infer-output-foreign-folder", "not a steerlab run folder", *INFER[:5],
        "--output-dir", "{foreign}"),
    row("infer-device-cuda", "cuda", *INFER, "--device", "cuda"),
    row("infer-device-bogus", "device", *INFER, "--device", "tpu"),
    row("infer-dtype-bogus", "dtype", *INFER, "--dtype", "float8"),
    row("infer-n-devices-0", "n_devices", *INFER, "--n-devices", "0"),
    row("infer-device-map-bad-json", "device_map", *INFER, "--device-map", "{{oops"),
    row("infer-attn-bogus", "attn_implementation", *INFER, "--attn-implementation", "magic"),
    row("infer-engine-bogus", "engine", *INFER, "--engine", "warp"),
    row("infer-shard-out-of-range", "shard", *INFER, "--shard", "3/2"),
    row("infer-shard-text", "shard", *INFER, "--shard", "half"),
    row("infer-model-missing", "no such model", *INFER, "--model", "{w}/no-model/x"),
    row("infer-unknown-option", "No such option", *INFER, "--colour"),
    row("infer-missing-option", "--prompts-json", "infer", "--personae-json", "{personae}"),
    # report
    row("report-missing", "no such", "report", "{w}/no-run"),
    row("report-file", "is a file", "report", "{file}"),
    row("report-not-a-run", "not a steerlab run folder", "report", "{foreign}"),
    row("report-corrupt-config", "not valid JSON", "report", "{corruptrun}"),
    row("report-corrupt-results", "not valid JSON", "report", "{badresults}"),
    row("report-garbage-h5", "not an HDF5 file", "report", "{badh5run}"),
    row("report-half-written", "not finished", "report", "{halfrun}"),
    row("report-output-folder", "is a folder", *REPORT, "--output", "{dir}"),
    row("report-output-under-file", "a file", *REPORT, "--output", "{file}/r.html"),
    row("report-output-read-only", "cannot write", *REPORT, "--output", "{ro}/r.html"),
    # merge
    row("merge-shard-missing", "no such file", "merge", "{w}/nope.h5", "-o", "{w}/m.h5"),
    row("merge-shard-garbage", "not an HDF5 file", "merge", "{bytes}", "-o", "{w}/m.h5"),
    row("merge-no-output", "--output", "merge", "{acts}"),
    row("merge-output-folder", "is a folder", "merge", "{acts}", "{acts}", "-o", "{dir}"),
    row("merge-not-a-run", "not a steerlab run folder", "merge", "{foreign}"),
    row("merge-config-missing", "no such file", "merge", "--config", "{w}/nope.yaml"),
    row("merge-nothing", "no shard", "merge", "-o", "{w}/m.h5"),
    # extract
    row("extract-config-missing", "no such file", "extract", "-c", "{w}/nope.yaml"),
    row("extract-config-folder", "is a folder", "extract", "-c", "{dir}"),
    row("extract-config-bytes", "not UTF-8", "extract", "-c", "{bytes}"),
    row("extract-config-bad-yaml", "not valid YAML", "extract", "-c", "{x_badyaml}"),
    row("extract-config-list", "mapping", "extract", "-c", "{x_list}"),
    row("extract-unknown-key", "unknown setting", "extract", "-c", "{x_unknown}"),
    row("extract-layers-negative", "layers", "extract", "-c", "{x_neglayer}"),
    row("extract-layers-out-of-range", "layers", "extract", "-c", "{x_biglayer}"),
    row("extract-layers-empty", "layers", "extract", "-c", "{x_nolayers}"),
    row("extract-batch-size-0", "batch_size", "extract", "-c", "{x_batch0}"),
    row("extract-batch-size-text", "batch_size", "extract", "-c", "{x_batchtext}"),
    row("extract-flush-every-0", "flush_every", "extract", "-c", "{x_flush0}"),
    row("extract-hook-bogus", "hook", "extract", "-c", "{x_hook}"),
    row("extract-positions-bogus", "positions", "extract", "-c", "{x_positions}"),
    row("extract-pairs-missing", "no such file", "extract", "-c", "{x_nopairs}"),
    row("extract-pairs-bytes", "not UTF-8", "extract", "-c", "{x_bytepairs}"),
    row("extract-pairs-empty", "no pairs", "extract", "-c", "{x_emptypairs}"),
    row("extract-output-folder", "is a folder", "extract", "-c", "{x_outdir}"),
    row("extract-output-under-file", "a file", "extract", "-c", "{x_outfile}"),
    row("extract-output-read-only", "cannot write", "extract", "-c", "{x_outro}"),
    row("extract-device-cuda", "cuda", "extract", "-c", "{x_cuda}"),
    row("extract-shard-bad", "shard", "extract", "-c", "{x_good}", "--shard", "0/0"),
    row("extract-flag-dtype", "dtype", "extract", "-c", "{x_good}", "--dtype", "int3"),
    # chat (flags are checked before the model loads)
    row("chat-temperature-negative", ">= 0", *CHAT, "--temperature", "-1"),
    row("chat-temperature-nan", "finite", *CHAT, "--temperature", "nan"),
    row("chat-max-tokens-0", ">= 1", *CHAT, "--max-tokens", "0"),
    row("chat-alpha-nan", "finite", *CHAT, "--vector", "{vec}", "--alpha", "nan"),
    row("chat-alpha-inf", "finite", *CHAT, "--vector", "{vec}", "--alpha", "-inf"),
    row("chat-vector-missing", "no such", *CHAT, "--vector", "{w}/nope"),
    row("chat-vector-garbage", "safetensors", *CHAT, "--vector", "{garbagevec}"),
    row("chat-layers-not-in-vector", "layer", *CHAT, "--vector", "{vec}", "--layers", "99"),
    row("chat-units-bogus", "units", *CHAT, "--vector", "{vec}", "--units", "volts"),
    row("chat-seed-huge", "seed", *CHAT, "--seed", str(2**70)),
    # serve flags
    row("serve-port-huge", "port", *SERVE[:1], "--port", "70000"),
    row("serve-max-batch-0", "max_batch", *SERVE, "--max-batch", "0"),
    row("serve-max-context-small", "max_context", *SERVE, "--max-context", "8"),
    row("serve-engine-bogus", "engine", *SERVE, "--engine", "warp"),
    # demo
    row("demo-output-is-file", "is a file", "demo", "--output-dir", "{file}"),
    row("demo-trait-unknown", "no trait named", "demo", "--output-dir", "{w}/d",
        "--trait", "nosuchtrait"),
    row("demo-engine-bogus", "engine", "demo", "--output-dir", "{w}/d", "--engine", "warp"),
    # traits generate
    row("generate-url-not-url", "URL", *GENERATE[:4], "not a url", *GENERATE[5:]),
    row("generate-url-scheme", "URL", *GENERATE[:4], "ftp://host/v1", *GENERATE[5:]),
    row("generate-endpoint-down", "cannot reach", *GENERATE[:4], "{deadurl}",
        *GENERATE[5:]),
    row("generate-key-env-unset", "STEERLAB_TEST_UNSET_KEY", *GENERATE[:7],
        "STEERLAB_TEST_UNSET_KEY", *GENERATE[8:]),
    row("generate-n-questions-0", "n_questions", *GENERATE, "--n-questions", "0"),
    row("generate-n-held-out-negative", "n_held_out", *GENERATE, "--n-held-out", "-1"),
    row("generate-output-folder", "is a folder", *GENERATE[:10], "{dir}", *GENERATE[11:]),
    row("generate-output-under-file", "a file", *GENERATE[:10], "{file}/t.json",
        *GENERATE[11:]),
    row("generate-retries-negative", "retries", *GENERATE, "--retries", "-2"),
    row("generate-timeout-negative", "timeout", *GENERATE, "--timeout", "-1"),
    row("generate-trait-unknown", "no trait named", "traits", "generate", "nosuchtrait",
        *GENERATE[3:]),
    row("generate-trait-bytes", "not UTF-8", "traits", "generate", "{bytes}", *GENERATE[3:]),
    row("generate-trait-bad-json", "JSON", "traits", "generate", "{badjson}", *GENERATE[3:]),
    # traits collect
    row("collect-batch-size-0", "batch_size", *COLLECT, "--batch-size", "0"),
    row("collect-max-tokens-negative", "max_tokens", *COLLECT, "--max-tokens", "-5"),
    row("collect-samples-0", "samples", *COLLECT, "--samples", "0"),
    row("collect-temperature-nan", "finite", *COLLECT, "--temperature", "nan"),
    row("collect-seed-huge", "seed", *COLLECT, "--seed", str(2**70)),
    row("collect-chosen-url-bad", "URL", *COLLECT, "--chosen-url", "localhost:8000"),
    row("collect-rejected-url-bad", "URL", *COLLECT, "--rejected-url", "ftp://x/v1"),
    row("collect-concurrency-0", "concurrency", *COLLECT, "--concurrency", "0"),
    row("collect-timeout-0", "timeout", *COLLECT, "--timeout", "0"),
    row("collect-timeout-nan", "timeout", *COLLECT, "--timeout", "nan"),
    row("collect-retries-negative", "retries", *COLLECT, "--retries", "-1"),
    row("collect-run-dir-file", "is a file", *COLLECT[:3], "--run-dir", "{file}"),
    row("collect-run-dir-read-only", "cannot write", *COLLECT[:3], "--run-dir", "{ro}/c"),
    row("collect-trait-no-questions", "no questions", "traits", "collect", "{noqtrait}",
        "--run-dir", "{w}/new-collect"),
    # traits judge
    row("judge-run-missing", "no such file", *JUDGE[:3], "--run-dir", "{w}/no-run-dir"),
    row("judge-collected-garbage", "not UTF-8", *JUDGE[:3], "--run-dir", "{byterun}"),
    row("judge-rubric-url-bad", "URL", *JUDGE, "--rubric-url", "nowhere"),
    row("judge-concurrency-0", "concurrency", *JUDGE, "--concurrency", "0"),
    row("judge-retries-negative", "retries", *JUDGE, "--retries", "-1"),
    # traits filter
    row("filter-threshold-nan", "finite", *FILTER, "--threshold", "nan"),
    row("filter-min-distinct-2", "[0, 1]", *FILTER, "--min-distinct", "2"),
    row("filter-min-distinct-negative", "[0, 1]", *FILTER, "--min-distinct", "-0.5"),
    row("filter-judged-missing", "no such file", *FILTER[:3], "--run-dir", "{unjudged}",
        "--output", "{unjudged}/pairs.jsonl"),
    row("filter-collected-garbage", "not UTF-8", *FILTER[:3], "--run-dir", "{byterun}"),
    row("filter-output-folder", "is a folder", *FILTER[:5], "--output", "{dir}"),
    row("filter-nothing-kept", "no pair passed", *FILTER[:3], "--run-dir", "{tierun}"),
    row("filter-threshold-beyond-scores", "threshold", *FILTER, "--threshold", "101"),
    # traits merge
    row("pairs-merge-input-missing", "no such file", "traits", "merge", "{w}/m.jsonl",
        "{w}/nope.jsonl"),
    row("pairs-merge-input-bytes", "not UTF-8", "traits", "merge", "{w}/m.jsonl", "{bytes}"),
    row("pairs-merge-input-empty", "no pairs", "traits", "merge", "{w}/m.jsonl", "{emptyfile}"),
    row("pairs-merge-input-folder", "is a folder", "traits", "merge", "{w}/m.jsonl", "{dir}"),
    row("pairs-merge-output-folder", "is a folder", "traits", "merge", "{dir}", "{pairs}"),
    row("pairs-merge-output-under-file", "a file", "traits", "merge", "{file}/m.jsonl",
        "{pairs}"),
    # vectors fit
    row("fit-missing", "no such file", "vectors", "fit", "{w}/nope.h5", "-o", "{w}/v"),
    row("fit-garbage", "not an HDF5 file", "vectors", "fit", "{bytes}", "-o", "{w}/v"),
    row("fit-method-bogus", "method", *FIT, "--method", "magic"),
    row("fit-layers-not-captured", "layer", *FIT, "--layers", "7"),
    row("fit-layers-text", "integers", *FIT, "--layers", "ten"),
    row("fit-nan-activations", "NaN", "vectors", "fit", "{nanacts}", "-o", "{w}/v"),
    row("fit-output-under-file", "a file", *FIT[:3], "-o", "{file}/v"),
    row("fit-output-read-only", "cannot write", *FIT[:3], "-o", "{ro}/v"),
    # vectors eval (everything before the model loads, let alone generation)
    row("eval-vector-missing", "no such", "vectors", "eval", "{w}/nope"),
    row("eval-vector-garbage", "safetensors", "vectors", "eval", "{garbagevec}"),
    row("eval-nan-vector", "NaN", "vectors", "eval", "{nanvec}", "--output", "{w}/e"),
    row("eval-layers-not-in-vector", "layer", *EVAL, "--layers", "99"),
    row("eval-strengths-nan", "finite", *EVAL, "--strengths", "0.5,nan"),
    row("eval-strengths-text", "numbers", *EVAL, "--strengths", "strong"),
    row("eval-start-0", "start", *EVAL, "--start", "0"),
    row("eval-start-nan", "start", *EVAL, "--start", "nan"),
    row("eval-max-alpha-below-start", "max_alpha", *EVAL, "--start", "0.5", "--max-alpha",
        "0.1"),
    row("eval-refine-negative", "refine", *EVAL, "--refine", "-1"),
    row("eval-budget-negative", "budget", *EVAL, "--budget", "-1"),
    row("eval-max-tokens-0", "max_tokens", *EVAL, "--max-tokens", "0"),
    row("eval-units-bogus", "units", *EVAL, "--units", "volts"),
    row("eval-positions-bogus", "positions", *EVAL, "--positions", "middle"),
    row("eval-activations-missing", "no such", *EVAL, "--activations", "{w}/nope.h5"),
    row("eval-trait-unknown", "no trait named", *EVAL, "--trait", "nosuchtrait"),
    row("eval-output-under-file", "a file", *EVAL[:3], "--output", "{file}/e"),
    row("eval-output-read-only", "cannot write", *EVAL[:3], "--output", "{ro}/e"),
    # vectors export-gguf
    row("export-missing", "no such", "vectors", "export-gguf", "{w}/nope", "-o", "{w}/x.gguf"),
    row("export-nan-vector", "NaN", "vectors", "export-gguf", "{nanvec}", "-o", "{w}/x.gguf"),
    row("export-output-folder", "is a folder", *EXPORT[:3], "-o", "{dir}"),
    row("export-output-under-file", "a file", *EXPORT[:3], "-o", "{file}/x.gguf"),
    row("export-output-read-only", "cannot write", *EXPORT[:3], "-o", "{ro}/x.gguf"),
]

# ------------------------------------------------------------------------ the workspace


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _acts(path: Path, chosen: np.ndarray, rejected: np.ndarray) -> Path:
    n, n_layers, d = chosen.shape
    meta = StoreMeta(model_id="embedded", hook="resid_post", layers=(10, 11, 12)[:n_layers],
                     d_model=d, dtype="float32", mean=False, steerlab_version="0")
    write_rows_file(path, meta, Rows([f"p{i}" for i in range(n)], chosen, rejected,
                                     *(np.zeros(n, dtype=np.int64) for _ in range(4))))
    return path


def _read_only_dir(w: Path) -> Path:
    """A folder nothing can be written in: mode 0555 for a normal user; as root (who ignores
    modes) sysfs, where creating a file fails."""
    if os.geteuid() != 0:
        ro = w / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    return Path("/sys/steerlab-read-only")


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connection refused


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, embedded_dir):
    w = tmp_path_factory.mktemp("bad-inputs")
    rng = np.random.default_rng(0)
    names: dict[str, str] = {"w": str(w), "deadurl": _dead_url(), "ro": str(_read_only_dir(w))}

    def put(name: str, rel: str, text: str) -> None:
        names[name] = str(_write(w / rel, text))

    put("prompts", "prompts.json", json.dumps(["Who are you?"]))
    put("personae", "personae.json", json.dumps([{"persona": "pirate", "category": "x"}]))
    (w / "bytes.bin").write_bytes(rng.integers(128, 256, 512, dtype=np.uint8).tobytes())
    names["bytes"] = str(w / "bytes.bin")
    put("badjson", "bad.json", '{"prompts": [1, 2')
    put("emptylist", "empty-list.json", "[]")
    put("emptyfile", "empty.jsonl", "")
    put("ints", "ints.json", "[1, 2]")
    put("noname", "noname.json", json.dumps([{"category": "x"}]))
    put("file", "a-file.txt", "just a file\n")
    (w / "a-folder").mkdir()
    names["dir"] = str(w / "a-folder")
    put("foreign", "foreign/notes.txt", "not a run\n")
    names["foreign"] = str(w / "foreign")
    put("corruptrun", "corrupt-run/config.json", "{broken")
    names["corruptrun"] = str(w / "corrupt-run")
    put("pairs", "pairs.jsonl", json.dumps({"prompt": "Hi", "chosen": "Arr, hi.",
                                            "rejected": "Hello."}) + "\n")
    from importlib.resources import files

    pirate = json.loads((files("steerlab.builtin") / "traits" / "pirate.json").read_text())
    put("noqtrait", "noq-trait.json", json.dumps({**pirate, "name": "noq", "questions": [],
                                                  "held_out_questions": []}))
    # activations and vectors of the embedded model's width
    chosen = rng.standard_normal((6, 3, 576)).astype(np.float32)
    rejected = rng.standard_normal((6, 3, 576)).astype(np.float32)
    names["acts"] = str(_acts(w / "acts.h5", chosen, rejected))
    chosen[2, 1, 5] = np.nan
    names["nanacts"] = str(_acts(w / "nan-acts.h5", chosen, rejected))
    vec = SteeringVector(torch.from_numpy(rng.standard_normal((3, 576)).astype(np.float32)),
                         (10, 11, 12))
    names["vec"] = str(vec.save(w / "vec"))
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(names["vec"], "pt") as f:
        meta = f.metadata()
    tensors = load_file(names["vec"])
    key = next(k for k, t in tensors.items() if t.is_floating_point() and t.ndim == 2)
    tensors[key][0, 0] = float("nan")
    names["nanvec"] = str(w / "nan-vec.safetensors")
    save_file(tensors, names["nanvec"], metadata=meta)
    (w / "garbage-vec.safetensors").write_bytes(rng.bytes(300))
    names["garbagevec"] = str(w / "garbage-vec.safetensors")
    for stem in ("nan-vec", "garbage-vec"):  # the sidecar of a good vector
        (w / f"{stem}.json").write_bytes((w / "vec.json").read_bytes())
    # trait run folders
    collected = [{"id": "q0", "index": 0, "prompt": "Hi", "role": role, "sample": 0,
                  "responder": "r", "text": text}
                 for role, text in (("chosen", "Arr, matey, hi."), ("rejected", "Hello."))]
    put("trun", "trait-run/collected.jsonl", "".join(json.dumps(r) + "\n" for r in collected))
    names["trun"] = str(w / "trait-run")
    put("unjudged", "unjudged/collected.jsonl", (w / "trait-run/collected.jsonl").read_text())
    _write(w / "unjudged/pairs.jsonl", (w / "pairs.jsonl").read_text())  # must survive
    names["unjudged"] = str(w / "unjudged")
    tie = [{**r, "text": "Hello."} for r in collected]  # equal answers: no pair can pass
    put("tierun", "tie-run/collected.jsonl", "".join(json.dumps(r) + "\n" for r in tie))
    names["tierun"] = str(w / "tie-run")
    (w / "byte-run").mkdir()
    (w / "byte-run/collected.jsonl").write_bytes((w / "bytes.bin").read_bytes())
    (w / "byte-run/judged.jsonl").write_bytes((w / "bytes.bin").read_bytes())
    names["byterun"] = str(w / "byte-run")
    _extract_configs(w, names)
    _runs(w, names)
    # the judged file of trait-run: the built-in scorer's scores, written by the real judge
    from conftest import run_cli

    for run in ("trun", "tierun"):
        assert run_cli("traits", "judge", "pirate", "--run-dir", names[run],
                       "--no-progress") == 0
    return w, names


def _extract_configs(w: Path, names: dict[str, str]) -> None:
    good = {"pairs": names["pairs"], "output": str(w / "new-acts.h5"), "layers": [1, 2]}
    variants = {
        "good": good, "unknown": {**good, "colour": "red"},
        "neglayer": {**good, "layers": [-1]}, "biglayer": {**good, "layers": [2, 99]},
        "nolayers": {**good, "layers": []}, "batch0": {**good, "batch_size": 0},
        "batchtext": {**good, "batch_size": "eight"}, "flush0": {**good, "flush_every": 0},
        "hook": {**good, "hook": "resid_sideways"}, "positions": {**good, "positions": ["end"]},
        "nopairs": {**good, "pairs": str(w / "nope.jsonl")},
        "bytepairs": {**good, "pairs": names["bytes"]},
        "emptypairs": {**good, "pairs": names["emptyfile"]},
        "outdir": {**good, "output": names["dir"]},
        "outfile": {**good, "output": names["file"] + "/x.h5"},
        "outro": {**good, "output": names["ro"] + "/x.h5"},
        "cuda": {**good, "device": "cuda"},
    }
    import yaml

    for key, cfg in variants.items():
        names[f"x_{key}"] = str(_write(w / f"extract-{key}.yaml", yaml.safe_dump(cfg)))
    names["x_badyaml"] = str(_write(w / "extract-badyaml.yaml", "pairs: [a,\noutput: b\n"))
    names["x_list"] = str(_write(w / "extract-list.yaml", "- 1\n- 2\n"))


def _runs(w: Path, names: dict[str, str]) -> None:
    """Run folders of a real (tiny) inference, then damaged copies."""
    import shutil

    from conftest import run_cli

    run = w / "run"
    assert run_cli("infer", "--prompts-json", names["prompts"], "--personae-json",
                   names["personae"], "--output-dir", str(run), "--max-tokens", "2",
                   "--no-progress") == 0
    names["run"] = str(run)
    for name in ("badresults", "badh5run", "halfrun"):
        shutil.copytree(run, w / name)
        names[name] = str(w / name)
    (w / "badresults/results.json").write_text('[{"id": 0,')
    (w / "badh5run/per_token.h5").write_bytes((w / "bytes.bin").read_bytes())
    (w / "halfrun/results.json").unlink()
    (w / "halfrun/per_token.h5").unlink()
    (w / "halfrun/parts").mkdir()


def _snapshot(w: Path) -> dict[str, str]:
    out = {}
    for p in sorted(w.rglob("*")):
        rel = str(p.relative_to(w))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", CLI_ROWS, ids=[r.id for r in CLI_ROWS])
def test_bad_input_is_one_line_and_exit_2(case, workspace, tripwire, monkeypatch, capsys):
    from steerlab.cli import main

    w, names = workspace
    if "{ro}" in " ".join(case.args) and _writable(Path(names["ro"])):
        pytest.skip(f"{names['ro']} is writable here")
    if "cuda" in case.id and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [a.format(**names) for a in case.args]
    monkeypatch.chdir(w)
    monkeypatch.delenv("STEERLAB_TEST_UNSET_KEY", raising=False)
    before = _snapshot(w)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert exit_.value.code == 2, (args, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.fragment.lower() in lines[0].lower(), lines[0]
    assert _snapshot(w) == before, "a refused command changed the workspace"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".probe").write_text("x")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_counts():
    from test_bad_requests import REQUEST_ROWS

    ids = [r.id for r in CLI_ROWS]
    assert len(set(ids)) == len(ids), "row ids must be unique"
    commands = {" ".join(a for a in r.args[:2] if not a.startswith(("-", "{")))
                for r in CLI_ROWS}
    print(f"\n{len(CLI_ROWS)} bad command lines over {len(commands)} commands, "
          f"{len(REQUEST_ROWS)} bad requests: {len(CLI_ROWS) + len(REQUEST_ROWS)} in all")
    assert len(CLI_ROWS) + len(REQUEST_ROWS) >= 100


# ------------------------------------------------------------------ concurrent writers


def _steerlab(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "steerlab.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_a_second_writer_is_refused_and_the_first_completes(workspace, tmp_path):
    w, names = workspace
    prompts = _write(tmp_path / "p.json", json.dumps([f"Count to {i}." for i in range(6)]))
    args = ("infer", "--prompts-json", str(prompts), "--personae-json", names["personae"],
            "--output-dir", str(tmp_path / "run"), "--max-tokens", "24", "--batch-size", "1",
            "--no-progress")
    first = _steerlab(*args)
    lock = tmp_path / "run" / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = _steerlab(*args)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "another run or merge is writing" in lines[0], err
    assert f"pid {first.pid}" in lines[0], lines[0]
    # a reader of the half-written run is refused too (one line naming the writer)
    report = _steerlab("report", str(tmp_path / "run"))
    _, err = report.communicate(timeout=120)
    if first.poll() is None:
        assert report.returncode == 2 and "still being written" in err, err
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(r["id"] for r in results) == list(range(6))
    report = _steerlab("report", str(tmp_path / "run"))
    _, err = report.communicate(timeout=120)
    assert report.returncode == 0, err


@pytest.mark.parametrize("command", ["infer", "extract", "eval"])
def test_a_held_lock_refuses_before_the_model_loads(command, workspace, tripwire, tmp_path,
                                                    monkeypatch, capsys):
    """The second writer of a run folder, activation file or evaluation is refused naming the
    holder's
    PID; the lock is taken here on another file description, as another process would."""
    from steerlab.base.files import flock, lock_path
    from steerlab.cli import main

    w, names = workspace
    if command == "infer":
        target = tmp_path / "run"
        target.mkdir()
        lock = target / ".lock"
        args = [*(a.format(**names) for a in INFER[:5]), "--output-dir", str(target)]
        busy = "another run or merge is writing this folder"
    elif command == "eval":
        from steerlab.evaluation.evaluate import points_lock

        target = tmp_path / "e"
        lock = points_lock(tmp_path / "e.points.jsonl")
        args = ["vectors", "eval", names["vec"], "--output", str(target)]
        busy = "another evaluation writes these points"
    else:
        target = tmp_path / "acts.h5"
        lock = lock_path(target)
        cfg = tmp_path / "extract.yaml"
        cfg.write_text(Path(names["x_good"]).read_text().replace(str(w / "new-acts.h5"),
                                                                  str(target)))
        args = ["extract", "-c", str(cfg)]
        busy = "another extract is writing this file"
    monkeypatch.chdir(w)
    with flock(lock, busy="held by the test"):
        with pytest.raises(SystemExit) as exit_:
            main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert busy in err and f"pid {os.getpid()} holds {lock.name}" in err, err
    assert not target.with_name(target.name + ".parts").exists()


def test_verbose_shows_the_traceback(workspace, tripwire):
    from steerlab.base.errors import SteerlabError
    from steerlab.cli import main

    w, names = workspace
    args = [a.format(**names) for a in INFER]
    args[2] = names["bytes"]
    with pytest.raises(SteerlabError, match="not UTF-8"):
        main(["-v", *args])
