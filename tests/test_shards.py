"""Sharded inference: n shards + merge == one process, per-task seeds, locks, named refusals."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_same_run, assert_same_tokens, run_cli

from steerlab.base.errors import SteerlabError
from steerlab.base.shards import parse_shard
from steerlab.extraction.extractor import extract, merge_shards
from steerlab.inference.infer import InferConfig, run_identity, run_inference
from steerlab.inference.runs import merge_run, open_run
from steerlab.model.personas import Persona
from steerlab.model.provenance import provenance

PERSONAE = [Persona("assistant", "assistant", "an"), Persona("Hamlet", "fictional-character")]
PROMPTS = ["Who are you?", "Name a colour.", "Count to three."]
# 6 tasks in 3 batches of 2: with 3 shards, shard k owns batch k; with 2, [0] and [1, 2].
CFG = InferConfig(max_tokens=6, batch_size=2)
STEERLAB = Path(sys.executable).with_name("steerlab")


@pytest.fixture(scope="module")
def single(embedded_model, tmp_path_factory):
    return run_inference(embedded_model, PROMPTS, PERSONAE, tmp_path_factory.mktemp("s") / "run",
                         CFG, progress=False)


@pytest.fixture(scope="module")
def sharded(embedded_model, tmp_path_factory):
    """Shards 0 and 1 of 3 finished, shard 2 not run (merged by the tests that need it)."""
    run = tmp_path_factory.mktemp("sh") / "run"
    for i in range(2):
        run_inference(embedded_model, PROMPTS, PERSONAE, run, CFG, shard=(i, 3), progress=False)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


@pytest.mark.slow
def test_three_shards_then_merge_equal_one_process(embedded_model, single, sharded, tmp_path,
                                                   capsys):
    run = _copy(sharded, tmp_path)
    assert not (run / "results.json").exists() and not (run / "per_token.h5").exists()
    marker = json.loads((run / "shards" / "shard-0001-of-0003.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert (marker["shard"], marker["n_shards"], marker["batch_start"], marker["batch_stop"]) \
        == (1, 3, 1, 2)
    assert marker["identity_sha256"] == config["identity_sha256"]
    assert marker["provenance"]["devices"] == ["cpu"]
    assert config["provenance"]["dtype"] == config["dtype"] == "float32"
    assert run_cli("merge", str(run)) == 2  # shard 2 not run yet
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run}: shard 2 of 3 is missing (batch 2 not committed)"
    run_inference(embedded_model, PROMPTS, PERSONAE, run, CFG, shard=(2, 3), progress=False)
    assert not (run / "results.json").exists()  # a shard never writes it
    assert merge_run(run) == run
    assert_same_run(run, single)
    assert not (run / "parts").exists()
    with h5py.File(run / "per_token.h5") as f:
        assert json.loads(f.attrs["provenance"])["dtype"] == "float32"
    assert merge_run(run) == run  # merged: nothing to do
    run_inference(embedded_model, PROMPTS, PERSONAE, run, CFG, shard=(0, 3), progress=False)
    assert_same_run(run, single)  # a shard rerun after the merge does nothing


@pytest.mark.slow
def test_slurm_array_numbered_from_one_via_the_cli(single, tmp_path):
    prompts, personae = tmp_path / "p.json", tmp_path / "q.json"
    prompts.write_text(json.dumps(PROMPTS))
    personae.write_text(json.dumps([p.to_dict() for p in PERSONAE]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLURM_ARRAY_JOB_ID": "4242",
           "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    args = [str(STEERLAB), "infer", "--prompts-json", str(prompts), "--personae-json",
            str(personae), "--max-tokens", "6", "--batch-size", "2", "--device", "cpu",
            "--no-progress"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env={**env, "SLURM_ARRAY_TASK_ID": str(k)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (1, 2, 3)]  # started together: config.json must be created once
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    run = tmp_path / "logs" / "personae-inference-4242"  # the array job's id: one folder
    assert sorted(p.name for p in (run / "shards").glob("*.json")) == [
        f"shard-000{i}-of-0003.json" for i in range(3)]
    assert "steerlab merge" in outs[0][0]
    assert run_cli("merge", str(run)) == 0
    assert_same_run(run, single, exact=False)


@pytest.mark.slow
def test_sampled_shards_equal_one_process_per_task_seeds(embedded_model, tmp_path):
    from steerlab.generation.generator import generate
    from steerlab.model.templates import encode_chat

    try:
        generate(embedded_model, [encode_chat(embedded_model.tokenizer, "Hi")],
                 max_new_tokens=1, temperature=1.0, seed=[0])
    except (TypeError, RuntimeError):
        pytest.skip("steerlab.generation.generate does not take per-row seeds yet")
    prompts = PROMPTS[:2]  # 4 tasks in 2 batches: one per shard
    cfg = InferConfig(max_tokens=6, batch_size=2, temperature=1.0, seed=11)
    for i in range(2):
        run_inference(embedded_model, prompts, PERSONAE, tmp_path / "sh", cfg, shard=(i, 2),
                      progress=False)
    merge_run(tmp_path / "sh")
    one = run_inference(embedded_model, prompts, PERSONAE, tmp_path / "one", cfg,
                        progress=False)
    assert_same_run(tmp_path / "sh", one)
    # Task t samples with seed + t whatever batch it is in. Other batches pad the rows
    # otherwise, so the logits differ in the last bits (measured: 2e-5, 5 eps of logits up to
    # ~40): the same tokens, up to a tie between the uniform and a CDF boundary (64 eps: 13x).
    from steerlab.inference.infer import make_tasks
    from steerlab.inference.results import read_per_token
    from steerlab.model.inputs import stop_token_ids
    from steerlab.model.personas import system_prompt_style

    other = run_inference(embedded_model, prompts, PERSONAE, tmp_path / "b3",
                          InferConfig(max_tokens=6, batch_size=3, temperature=1.0, seed=11),
                          progress=False)
    tok, style = embedded_model.tokenizer, system_prompt_style(cfg.system_prompt_style)
    stops = stop_token_ids(tok, embedded_model.original_model)
    for task in make_tasks(prompts, PERSONAE, 1):
        ids = encode_chat(tok, task.prompt, persona=task.persona, system_prompt=style,
                          enable_thinking=cfg.thinking_mode)
        got, want = (read_per_token(run, task.id)["tokens"] for run in (other, one))
        assert_same_tokens(embedded_model, ids, got, want, eps_units=64, temperature=1.0,
                           seed=cfg.seed + task.id, stop_ids=stops)


@pytest.mark.slow
def test_merge_names_extra_foreign_and_other_count_shards(sharded, tmp_path):
    run = _copy(sharded, tmp_path)
    shards = run / "shards"
    good = json.loads((shards / "shard-0000-of-0003.json").read_text())
    (shards / "shard-0003-of-0003.json").write_text(json.dumps(good))
    (shards / "shard-0001-of-0003.json").write_text(json.dumps(
        {**good, "identity_sha256": "f" * 64}))
    with pytest.raises(SteerlabError) as err:
        merge_run(run)
    lines = str(err.value).splitlines()
    assert lines == [
        f"{run}: shards/shard-0001-of-0003.json is from another run: its identity "
        f"ffffffffffff is not config.json's {good['identity_sha256'][:12]}",
        f"{run}: extra shard shards/shard-0003-of-0003.json: shard 3 of 3 (shards are 0-2)",
        f"{run}: shard 2 of 3 is missing (batch 2 not committed)",
    ]
    (shards / "shard-0003-of-0003.json").unlink()
    (shards / "shard-0001-of-0004.json").write_text(json.dumps(good))
    with pytest.raises(SteerlabError, match="shards from different configs: shards/shard-0000-"
                       "of-0003.json has n=3 and shards/shard-0001-of-0004.json has n=4"):
        merge_run(run)


@pytest.mark.slow
def test_resume_refuses_another_dtype_and_logs_another_device(embedded_model, sharded,
                                                              tmp_path, caplog):
    run = _copy(sharded, tmp_path)
    cfg = run / "config.json"
    data = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**data, "dtype": "bfloat16"}))
    with pytest.raises(SteerlabError) as err:
        run_inference(embedded_model, PROMPTS, PERSONAE, run, CFG, shard=(2, 3), progress=False)
    assert str(err.value) == (f"{cfg}, field 'dtype': the folder holds bfloat16, this run is "
                              "float32; use a new --output-dir")
    assert not (run / "parts" / "batch-000002.h5").exists()
    data["provenance"]["devices"] = ["cuda:0"]
    cfg.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="steerlab"):
        run_inference(embedded_model, PROMPTS, PERSONAE, run, CFG, shard=(0, 3), progress=False)
    assert "was run on cuda:0; this run is on cpu" in caplog.text
    assert json.loads(cfg.read_text())["provenance"]["devices"] == ["cuda:0", "cpu"]


@pytest.mark.slow
def test_second_writer_is_refused(embedded_model, sharded, tmp_path):
    run = _copy(sharded, tmp_path)
    prov = provenance(embedded_model)
    identity = run_identity(CFG, PROMPTS, PERSONAE, prov, embedded_model.cfg.n_layers)
    go = lambda shard: run_inference(embedded_model, PROMPTS, PERSONAE, run, CFG,  # noqa: E731
                                     shard=shard, progress=False)
    with open_run(run, identity, prov, shard=(2, 3)):  # shard 2 is running elsewhere
        with pytest.raises(SteerlabError, match=r"shard 2 of 3 is already running \(pid "
                           rf"{os.getpid()} holds shard-0002-of-0003.lock\)$"):
            go((2, 3))
        with pytest.raises(SteerlabError, match="another run or merge is writing"):
            go((0, 1))
        with pytest.raises(SteerlabError, match="a shard or run is still writing"):
            merge_run(run)
    with open_run(run, identity, prov):  # an unsharded run is under way
        with pytest.raises(SteerlabError, match="an unsharded run or a merge is writing"):
            go((2, 3))
    with open_run(run, identity, prov, shard=(2, 3)):  # the locks went with their holders
        pass


def test_parse_shard_reads_arrays_numbered_from_zero_or_one():
    slurm = lambda i, n, **kw: {"SLURM_ARRAY_TASK_ID": str(i),  # noqa: E731
                                "SLURM_ARRAY_TASK_COUNT": str(n), **kw}
    assert [parse_shard(None, slurm(k, 3, SLURM_ARRAY_TASK_MIN="1")) for k in (1, 2, 3)] == \
        [(0, 3), (1, 3), (2, 3)]
    assert [parse_shard(None, slurm(k, 3)) for k in (0, 1, 2)] == [(0, 3), (1, 3), (2, 3)]
    assert parse_shard(None, slurm(6, 4, SLURM_ARRAY_TASK_MIN="0",
                                   SLURM_ARRAY_TASK_STEP="2")) == (3, 4)
    with pytest.raises(SteerlabError, match="SLURM_ARRAY_TASK_ID=3 SLURM_ARRAY_TASK_COUNT=3"):
        parse_shard(None, slurm(3, 3))  # a 1-based array without SLURM_ARRAY_TASK_MIN


class Pair:
    def __init__(self, i: int, boom: bool = False):
        self.id, self.prompt, self.boom = f"p{i}", f"Question {i}?", boom  # see crash_at_boom
        self.rejected = f"The answer to {i} is this."
        self.chosen = f"Arr, answer {self.id} be this, matey"


PAIRS = [Pair(i) for i in range(6)]
KW = dict(batch_size=2, flush_every=2, progress=False)


def test_extract_refusals_name_the_field_and_both_values(tiny_model, tmp_path, monkeypatch):
    from test_store import crash_at_boom

    crash_at_boom(monkeypatch)
    out = extract(tiny_model, PAIRS, tmp_path / "acts.h5", layers=[0, 2], **KW)
    with pytest.raises(SteerlabError) as err:
        extract(tiny_model, PAIRS, out, layers=[1], **KW)
    assert "field 'layers'" in str(err.value) and "it holds [0, 2], this run is [1]" in str(
        err.value)
    crashed = tmp_path / "crashed.h5"
    with pytest.raises(RuntimeError, match="simulated"):
        extract(tiny_model, [*PAIRS[:3], Pair(3, boom=True)], crashed, layers=[0, 2], **KW)
    with pytest.raises(SteerlabError) as err:  # the unfinished parts were captured otherwise
        extract(tiny_model, PAIRS, crashed, layers=[1], **KW)
    assert "field 'layers'" in str(err.value) and "it holds [0, 2], this run is [1]" in str(
        err.value)


def test_merge_shards_names_missing_extra_and_other_config_shards(tiny_model, tmp_path):
    out = tmp_path / "acts.h5"
    shards = [extract(tiny_model, PAIRS, out, layers=[0, 2], shard=(i, 3), **KW)
              for i in range(3)]
    with pytest.raises(SteerlabError, match=r"^shard 1 of 3 is missing or unfinished \(no "
                       r"acts.shard-001-of-003.h5\)$"):
        merge_shards([shards[0], shards[2]], out)
    extra = shutil.copy(shards[0], tmp_path / "acts.shard-003-of-003.h5")
    with pytest.raises(SteerlabError, match=r"^extra shard acts.shard-003-of-003.h5: shard 3 "):
        merge_shards([*shards, extra], out)
    four = extract(tiny_model, PAIRS, out, layers=[0, 2], shard=(1, 4), **KW)
    with pytest.raises(SteerlabError, match="shards from different configs: acts.shard-000-"
                       "of-003.h5 has n=3 and acts.shard-001-of-004.h5 has n=4"):
        merge_shards([*shards, four], out)
    other = extract(tiny_model, PAIRS, tmp_path / "o" / "acts.h5", layers=[1], shard=(1, 3),
                    **KW)
    with pytest.raises(SteerlabError, match=r"^shards from different configs: field 'layers': "
                       r"acts.shard-000-of-003.h5 holds \[0, 2\], acts.shard-001-of-003.h5 "
                       r"holds \[1\]$"):
        merge_shards([shards[0], other, shards[2]], out)
    merged = merge_shards(list(reversed(shards)), out)  # named shards go in shard order
    single = extract(tiny_model, PAIRS, tmp_path / "single.h5", layers=[0, 2], **KW)
    with h5py.File(merged) as a, h5py.File(single) as b:
        assert all(np.array_equal(a[k][:], b[k][:]) for k in a)
