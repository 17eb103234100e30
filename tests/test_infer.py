"""Batch persona inference: batched == single, lens consistency, CLI bad input, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli

from steerlab.generation.generator import generate_with_metrics
from steerlab.inference.infer import InferConfig, load_prompts, run_inference
from steerlab.inference.results import load_results, read_per_token
from steerlab.model.personas import Persona
from steerlab.model.templates import encode_chat, think_end_marker

DATA = files("steerlab.builtin") / "data"  # the built-in prompts and personae
PROMPTS_JSON, PERSONAE_JSON = str(DATA / "prompts.json"), str(DATA / "personae.json")
PERSONAE = [Persona("assistant", "assistant", "an"), Persona("Hamlet", "fictional-character")]
PROMPTS = ["Who are you?", "Name a colour.", "Count to three."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """The tiny random Llama saved as a local model directory (for the CLI)."""
    from conftest import make_tiny_hf

    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_hf(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _ids(tokenizer, persona=PERSONAE[1]):
    return [encode_chat(tokenizer, p, persona=persona) for p in PROMPTS]


def _varied_ids(tokenizer):
    """Prompts of different lengths (so rows are left-padded) under different personae."""
    texts = ["Hi", "Name a colour.", "Tell me, in a few careful words, what you think of the sea."]
    ids = [encode_chat(tokenizer, t, persona=p) for t, p in zip(texts, PERSONAE * 2, strict=False)]
    assert len({len(i) for i in ids}) == len(ids)
    return ids


def test_batched_equals_one_at_a_time_with_lens(tiny_model, tokenizer):
    ids = _varied_ids(tokenizer)
    batched = generate_with_metrics(tiny_model, ids, max_new_tokens=6, lens=True)
    for prompt, row in zip(ids, batched, strict=True):
        (single,) = generate_with_metrics(tiny_model, [prompt], max_new_tokens=6, lens=True)
        assert single.tokens == row.tokens
        # padding reorders float32 sums: metrics of a ~49k vocabulary agree to ~1e-6
        # relative; 1e-5 relative (plus 1e-4 for masses near 0) is far above that
        for name in ("entropy", "top_k_mass", "lens_entropy", "lens_top_k_mass"):
            np.testing.assert_allclose(getattr(row, name), getattr(single, name), rtol=1e-5,
                                       atol=1e-4)
    for row in batched:  # the lens at the last layer is the model's own distribution
        assert row.lens_entropy.shape == (len(row.tokens), tiny_model.cfg.n_layers)
        # the same final norm and unembedding by two module paths: float32 rounding only
        np.testing.assert_allclose(row.lens_entropy[:, -1], row.entropy, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(row.lens_top_k_mass[:, -1], row.top_k_mass, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.slow
def test_batched_equals_one_at_a_time_greedy_on_the_embedded_model(embedded_model):
    """Greedy, left-padded batch with a row that stops early == each prompt alone."""
    from steerlab.model.inputs import stop_token_ids

    tok = embedded_model.tokenizer
    ids = _varied_ids(tok)
    alone = generate_with_metrics(embedded_model, ids[:1], max_new_tokens=8)[0].tokens
    stop = next(t for i, t in enumerate(alone) if i >= 2 and t not in alone[:i])
    stops = stop_token_ids(tok, embedded_model.original_model) | {stop}
    run = lambda p: generate_with_metrics(embedded_model, p, max_new_tokens=8,  # noqa: E731
                                          stop_ids=stops)
    batched = run(ids)
    assert batched[0].stopped and batched[0].tokens == alone[: alone.index(stop)]
    assert max(len(r.tokens) for r in batched) > len(batched[0].tokens)  # others go on
    for prompt, row in zip(ids, batched, strict=True):
        (single,) = run([prompt])
        assert single.tokens == row.tokens and single.stopped == row.stopped
        # padded batch vs alone: float32 reordering, ~1e-6 relative on these metrics
        np.testing.assert_allclose(row.entropy, single.entropy, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(row.top_k_mass, single.top_k_mass, rtol=1e-5, atol=1e-4)


def test_metrics_are_those_of_the_model_logits(tiny_model, tokenizer):
    prompt = _ids(tokenizer)[0]
    (row,) = generate_with_metrics(tiny_model, [prompt], max_new_tokens=4, k=3)
    with torch.inference_mode():
        logits = tiny_model.original_model(input_ids=torch.tensor([prompt + row.tokens])).logits
    ref = torch.distributions.Categorical(logits=logits[0, len(prompt) - 1 : -1].float())
    # cached decode steps vs one full forward: float32 reordering, ~1e-6 relative
    np.testing.assert_allclose(row.entropy, ref.entropy().numpy(), rtol=1e-5, atol=1e-5)
    top3 = ref.probs.topk(3, -1).values.sum(-1).numpy()
    np.testing.assert_allclose(row.top_k_mass, top3, rtol=1e-5, atol=1e-5)


def test_attention_implementation_switch_changes_nothing(tiny_model, tokenizer):
    """The bridge computes attention itself, so HF's sdpa setting is not a faster path."""
    hf = tiny_model.original_model
    ids = _ids(tokenizer)
    ref = generate_with_metrics(tiny_model, ids, max_new_tokens=4)
    old = hf.config._attn_implementation
    try:
        hf.config._attn_implementation = "sdpa"
        got = generate_with_metrics(tiny_model, ids, max_new_tokens=4)
    finally:
        hf.config._attn_implementation = old
    for a, b in zip(ref, got, strict=True):
        assert a.tokens == b.tokens and np.array_equal(a.entropy, b.entropy)


def test_run_writes_records_and_per_token_file(tiny_model, tokenizer, tmp_path):
    cfg = InferConfig(max_tokens=5, batch_size=4, n_reps=2, lens=True)
    out = run_inference(tiny_model, PROMPTS, PERSONAE, tmp_path / "run", cfg, progress=False)
    rows = load_results(out)
    assert [r["id"] for r in rows] == list(range(12))
    assert [r["persona"] for r in rows] == ["assistant"] * 6 + ["Hamlet"] * 6  # grouped
    r = rows[0]
    for key in ("persona", "category", "prompt", "rep", "response", "thinking",
                "avg_entropy_thinking", "avg_entropy_output", "avg_entropy",
                "avg_top_k_mass_thinking", "avg_top_k_mass_output", "avg_top_k_mass",
                "think_end_position", "n_tokens", "n_thinking_tokens", "n_output_tokens"):
        assert key in r
    arrays = read_per_token(out, r["id"])
    assert len(arrays["tokens"]) == r["n_tokens"]
    # the record's mean is taken in float64 over the same float32 values: equal to 1e-12
    assert r["avg_entropy"] == pytest.approx(float(arrays["entropy"].astype(np.float64).mean()),
                                             rel=1e-12)
    assert arrays["lens_entropy"].shape == (r["n_tokens"], tiny_model.cfg.n_layers)
    assert json.loads((out / "config.json").read_text())["n_reps"] == 2
    assert (out / "infer.log").stat().st_size > 0 and not (out / "parts").exists()
    with h5py.File(out / "per_token.h5") as f:
        assert list(f["record_id"][:]) == list(range(12))
    marker = think_end_marker(tokenizer)
    assert all(r["think_end_position"] is None or r["n_thinking_tokens"] > 0 for r in rows)
    assert marker  # the split itself is tested in test_metrics




BAD = {
    "not-json.json": ("{oops", None, "not valid JSON"),
    "dict.json": ('{"prompt": "hi"}', None, "non-empty JSON list"),
    "empty.json": ("[]", None, "non-empty JSON list"),
    "int-item.json": ("[\"ok\", 3]", "prompts[1]", "expected a string"),
    "nul.json": ('["ok", {"prompt": "a\\u0000b"}]', "prompts[1].prompt", "NUL"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_prompts_file_is_exit_2_and_writes_nothing(name, tmp_path, capsys):
    text, field, expect = BAD[name]
    bad = tmp_path / name
    bad.write_text(text)
    out = tmp_path / "out"
    code = run_cli("infer", "--prompts-json", str(bad), "--personae-json", PERSONAE_JSON,
                "--output-dir", str(out), "--model", str(tmp_path / "never-loaded"))
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and expect in err
    assert field is None or f"field '{field}'" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("text, field, expect", [
    ('[{"persona": "A"', None, "not valid JSON"),
    ('[{"category": "x"}]', "personae[0].persona", "expected a string"),
    ('[{"persona": "", "category": "x"}]', "personae[0].persona", "is empty"),
    ('[{"persona": "A", "category": 3}]', "personae[0].category", "expected a string"),
    ('["Hamlet"]', None, "expected an object"),
    ('{"persona": "Hamlet"}', None, "non-empty JSON list"),
    ("[]", None, "non-empty JSON list"),
])
def test_bad_personae_file_is_exit_2_and_writes_nothing(text, field, expect, tmp_path, capsys):
    bad = tmp_path / "personae.json"
    bad.write_text(text)
    out = tmp_path / "out"
    code = run_cli("infer", "--prompts-json", PROMPTS_JSON, "--personae-json", str(bad),
                "--output-dir", str(out), "--model", str(tmp_path / "never-loaded"))
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and expect in err
    assert field is None or f"field '{field}'" in err
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback
    assert not out.exists()


def test_infer_options_and_defaults_are_those_of_the_spec():
    import typer

    from steerlab.cli import app

    cmd = typer.main.get_command(app).commands["infer"]
    params = {p.name: p for p in cmd.params}
    spec = {"model": "embedded", "temperature": 0.0, "max_tokens": 1024, "batch_size": 256,
            "n_reps": 1, "top_k_mass_k": 5, "thinking_mode": True,
            "system_prompt_style": "you-are-a", "output_dir": None, "lens": False}
    assert {name: params[name].default for name in spec} == spec
    assert params["prompts_json"].required and params["personae_json"].required
    assert "seed" in params
    assert params["thinking_mode"].secondary_opts == ["--no-thinking-mode"]
    assert params["lens"].secondary_opts == ["--no-lens"]
    defaults = InferConfig()  # the library defaults are the CLI's
    assert all(getattr(defaults, k) == v for k, v in spec.items() if hasattr(defaults, k))


def test_bad_option_value_is_exit_2(tmp_path, capsys):
    code = run_cli("infer", "--prompts-json", PROMPTS_JSON, "--personae-json",
                PERSONAE_JSON, "--batch-size", "0", "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "batch_size" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_shipped_data_files_are_valid():
    from steerlab.model.personas import load_personae

    assert len(load_prompts(PROMPTS_JSON)) >= 20
    personae = load_personae(PERSONAE_JSON)
    assert len(personae) >= 12 and len({p.category for p in personae}) >= 4


def test_resume_after_kill_gives_the_uninterrupted_results(tiny_dir, tmp_path, capsys):
    prompts, personae = tmp_path / "p.json", tmp_path / "q.json"
    prompts.write_text(json.dumps([{"prompt": p} for p in PROMPTS]))
    personae.write_text(json.dumps([p.to_dict() for p in PERSONAE]))
    args = ["infer", "--prompts-json", str(prompts), "--personae-json", str(personae),
            "--model", str(tiny_dir), "--max-tokens", "12", "--batch-size", "1",
            "--temperature", "1.0", "--seed", "7", "--no-progress", "--lens"]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "steerlab.cli", *args, "--output-dir",
                             str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it once some (not all) batches are committed
        deadline = time.time() + 120
        while time.time() < deadline and len(list((run / "parts").glob("*.h5"))) < 1:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    committed = len(list((run / "parts").glob("*.h5")))
    assert 1 <= committed < 6, committed
    assert run_cli(*args, "--output-dir", str(run)) == 0
    assert run_cli(*args, "--output-dir", str(tmp_path / "whole")) == 0
    resumed, whole = load_results(run), load_results(tmp_path / "whole")
    assert [r["id"] for r in resumed] == list(range(6))  # no duplicates, nothing missing
    assert resumed == whole  # sampled, yet identical: task t uses seed + t
    for r in resumed:
        a, b = read_per_token(run, r["id"]), read_per_token(tmp_path / "whole", r["id"])
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert run_cli(*args, "--output-dir", str(run)) == 0  # finished: nothing to do
    assert load_results(run) == whole
    capsys.readouterr()
    assert run_cli(*args[:-1], "--output-dir", str(run)) == 2  # different settings: refused
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1  # one line naming the field and both values
    assert "field 'lens': the folder holds true, this run is false" in errors[0]


def test_engines_give_the_same_run_and_a_resume_may_switch(tokenizer, tmp_path, caplog):
    from conftest import make_tiny_model

    from steerlab.model.attention import use_hf_mixers

    model = make_tiny_model(tokenizer, seed=2)
    use_hf_mixers(model.original_model, "sdpa")  # the static engine needs HF attention
    cfg = InferConfig(max_tokens=6, batch_size=2, lens=True, engine="static")
    out = run_inference(model, PROMPTS, PERSONAE, tmp_path / "static", cfg, progress=False)
    ref = run_inference(model, PROMPTS, PERSONAE, tmp_path / "eager",
                        InferConfig(max_tokens=6, batch_size=2, lens=True, engine="eager"),
                        progress=False)
    for a, b in zip(load_results(out), load_results(ref), strict=True):
        assert a["response"] == b["response"]
        assert a["avg_entropy"] == pytest.approx(b["avg_entropy"], abs=1e-4)  # issue bound
        ta, tb = read_per_token(out, a["id"]), read_per_token(ref, b["id"])
        np.testing.assert_allclose(ta["lens_entropy"], tb["lens_entropy"], atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["engines"] == ["static"] and config["engine"] == "static"
    # the engine is how, not what: resuming the eager folder with static is allowed, recorded
    (ref / "results.json").unlink()
    run_inference(model, PROMPTS, PERSONAE, ref, cfg, progress=False)
    assert json.loads((ref / "config.json").read_text())["provenance"]["engines"] == \
        ["eager", "static"]


def test_bad_engine_is_exit_2_before_anything(tmp_path, capsys):
    code = run_cli("infer", "--prompts-json", PROMPTS_JSON, "--personae-json",
                   PERSONAE_JSON, "--engine", "turbo", "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "engine" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
