"""HDF5 store: sharded == single, resume after a crash == uninterrupted, reader, bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from steerlab.base.errors import SteerlabError
from steerlab.base.shards import parse_shard, shard_path, shard_range
from steerlab.extraction.extractor import extract, merge_shards
from steerlab.extraction.store import ActivationFile

DATASETS = ("chosen", "rejected", "chosen_mean", "rejected_mean", "divergence",
            "chosen_length", "rejected_length", "response_start", "pair_id", "layers")


class P:
    def __init__(self, i, boom=False):
        self.id = f"p{i:03d}"
        self.prompt = f"Question number {i}?"
        self.chosen = f"Arr, answer {i} be this, matey{'!' * (i % 3)}"
        self.rejected = f"The answer to {i} is this{'.' * (i % 4)}"
        self.boom = boom  # the capture of its batch crashes (crash_at_boom)


def crash_at_boom(monkeypatch) -> None:
    """Make extraction crash at the batch holding a pair marked ``boom``, after the batches
    before it were committed (extract tokenises every pair up front, so the crash is put in
    the capture itself)."""
    import importlib

    module = importlib.import_module("steerlab.extraction.extractor")  # the module, not sl.extract
    real = module.capture_pairs

    def capture(model, batch, *args, **kwargs):
        if any(getattr(p, "boom", False) for p in batch):
            raise RuntimeError("simulated crash")
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(module, "capture_pairs", capture)


PAIRS = [P(i) for i in range(11)]
KW = dict(layers=[0, 2], mean=True, batch_size=2, flush_every=3, progress=False)


def assert_same_file(a, b):
    """Bit-identical datasets and attributes: the runs compare the same batches through the same
    kernels, so exact equality is what they must give, not a tolerance."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in DATASETS:
            assert np.array_equal(fa[name][:], fb[name][:]), name
        assert dict(fa.attrs) .keys() == dict(fb.attrs).keys()
        for k in fa.attrs:
            assert np.array_equal(fa.attrs[k], fb.attrs[k]), k


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory):
    return extract(tiny_model, PAIRS, tmp_path_factory.mktemp("single") / "acts.h5", **KW)


def test_single_file_layout(single):
    f = ActivationFile(single)
    assert f.n_pairs == 11 and f.layers == (0, 2) and f.meta.hook == "resid_post"
    assert list(f.read("pair_id")) == [p.id for p in PAIRS]
    with h5py.File(single, "r") as h:
        assert h["chosen"].shape == (11, 2, 64) and h["chosen"].chunks is not None
        assert h.attrs["steerlab_version"] and h.attrs["model_id"] == "tiny-llama"
    got = np.concatenate([c.numpy() for c, _ in f.iter_batches(4)])
    assert np.array_equal(got, f.read("chosen"))
    assert not single.with_name("acts.h5.parts").exists()


def test_sharded_then_merged_equals_single(tiny_model, tmp_path, single):
    out = tmp_path / "acts.h5"
    shards = [extract(tiny_model, PAIRS, out, shard=(i, 3), **KW) for i in range(3)]
    assert [ActivationFile(s).n_pairs for s in shards] == [4, 4, 3]
    with pytest.raises(SteerlabError, match="missing or unfinished"):
        merge_shards(shards[:2], out)
    merge_shards(shards, out)
    assert_same_file(out, single)


def test_resume_after_crash_equals_uninterrupted(tiny_model, tmp_path, single, monkeypatch):
    crash_at_boom(monkeypatch)
    out = tmp_path / "acts.h5"
    broken = PAIRS[:7] + [P(7, boom=True)] + PAIRS[8:]
    with pytest.raises(RuntimeError, match="simulated"):
        extract(tiny_model, broken, out, **KW)
    parts = out.with_name("acts.h5.parts")
    assert not out.exists() and len(list(parts.glob("part-*.h5"))) == 1  # rows 0..4
    (parts / ".part-000000004-000000008.h5.tmp").write_bytes(b"half-written")
    with pytest.raises(SteerlabError, match="different settings"):
        extract(tiny_model, PAIRS, out, **{**KW, "layers": [1]})
    extract(tiny_model, PAIRS, out, **KW)
    assert_same_file(out, single)
    assert extract(tiny_model, PAIRS, out, **KW) == out  # complete: nothing to do


def test_existing_output_is_never_damaged(tiny_model, single):
    before = single.read_bytes()
    with pytest.raises(SteerlabError, match="other settings"):
        extract(tiny_model, PAIRS, single, **{**KW, "layers": [1]})
    with pytest.raises(SteerlabError, match="input 'shards'"):  # its own input
        merge_shards([single], single)
    assert single.read_bytes() == before


def test_bad_activation_files(tmp_path, single):
    text = tmp_path / "x.h5"
    text.write_text("not hdf5")
    with pytest.raises(SteerlabError, match="not an HDF5 file"):
        ActivationFile(text)
    with pytest.raises(SteerlabError, match="no such"):
        ActivationFile(tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1]
    with pytest.raises(SteerlabError, match="not a steerlab activation file"):
        ActivationFile(other)
    broken = tmp_path / "broken.h5"
    broken.write_bytes(single.read_bytes())
    with h5py.File(broken, "a") as f:
        del f["divergence"]
    with pytest.raises(SteerlabError, match="divergence"):
        ActivationFile(broken)


def test_shard_arithmetic():
    assert parse_shard(None, {}) == (0, 1)
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == (3, 8)
    assert parse_shard("1/4", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == (1, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(SteerlabError, match="shard"):
            parse_shard(bad, {})
    spans = [shard_range(103, 8, (i, 5)) for i in range(5)]
    assert spans[0][0] == 0 and spans[-1][1] == 103
    assert all(a[1] == b[0] and a[1] % 8 == 0 for a, b in zip(spans, spans[1:], strict=False))
    assert shard_path(__import__("pathlib").Path("o/a.h5"), (2, 8)).name == "a.shard-002-of-008.h5"


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tiny_model, tokenizer, tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    import torch
    from conftest import make_tiny_hf

    from steerlab.model.loading import load_model
    from steerlab.traits.pairs import Pair, save_pairs

    model_dir = tmp_path / "tiny"
    make_tiny_hf(tokenizer, seed=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs = [Pair(p.id, p.prompt, p.chosen, p.rejected) for p in (P(i) for i in range(80))]
    save_pairs(pairs, tmp_path / "pairs.jsonl")
    out = tmp_path / "run" / "acts.h5"
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(f"model: {model_dir}\npairs: {tmp_path / 'pairs.jsonl'}\noutput: {out}\n"
                   f"layers: [0, 2]\npositions: [divergence, mean]\nbatch_size: 2\n"
                   f"flush_every: 2\ndevice: cpu\nlog_file: {tmp_path / 'extract.log'}\n")
    ref = extract(load_model(model_dir, device="cpu"), pairs, tmp_path / "ref.h5", layers=[0, 2],
                  mean=True, batch_size=2, flush_every=2, progress=False,
                  pairs_file=str(tmp_path / "pairs.jsonl"))
    cmd = [sys.executable, "-m", "steerlab.cli", "extract", "--config", str(cfg),
           "--no-progress"]
    # exact comparison with this process's file: the same batches through the same kernels
    # with the same thread count (so BLAS splits its sums alike) are bit-identical
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    parts = out.with_name("acts.h5.parts")
    # A fixed seed picks the part count to wait for and the sleep after it; where the kill lands
    # still varies with the machine's timing, and the rerun must be exact wherever it lands.
    # Of the 40 parts (~20-40 ms each) at least 10 are left after 30 and 50 ms: never finished.
    rng = random.Random(20261202)
    stop_after, jitter = rng.randint(1, 30), rng.uniform(0.0, 0.05)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and len(list(parts.glob("part-*"))) < stop_after:
            time.sleep(0.002)
        time.sleep(jitter)  # land anywhere inside a batch, a part write or between them
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_file(out, ref)
    assert "resuming" in (tmp_path / "extract.log").read_text()
