"""benchmarks/bench_gpu.py: every section runs on the CPU (tiny shape); no CUDA means a skip."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
SECTIONS = {"load", "generation", "engine", "lens", "steer", "strengths", "capture", "cli"}
SMOKE = ("--device", "cpu", "--shape", "tiny", "--batches", "2", "--new-tokens", "4")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.mark.extended
def test_cpu_smoke_run_covers_every_section(tmp_path):
    out = tmp_path / "bench.json"
    run = _run(*SMOKE, "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {out}" in run.stdout
    result = json.loads(out.read_text())
    assert set(result["sections"]) == SECTIONS
    for name, section in result["sections"].items():
        assert section["rows"], name
        for row in section["rows"]:
            where = f"{name}: {row['measurement']}"
            assert row["steerlab_s"] > 0 and row["baseline_s"] > 0, where
            for key in ("steerlab", "baseline", "ratio"):
                value = row[key]
                assert isinstance(value, float) and math.isfinite(value) and value > 0, where
    load = result["sections"]["load"]
    assert load["params_off_device"] == 0 and load["buffers_off_device"] == 0
    engine = result["sections"]["engine"]
    assert engine["captures"] > 0 and engine["captures_during_timed_runs"] == 0
    assert engine["targets"] and not any(t["applies"] for t in engine["targets"])  # a GPU's
    assert "engine target: " in run.stdout
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["shape"] == "tiny" and meta["torch"]
    assert meta["new_tokens"] == 4 and meta["batches"] == [2]


def test_without_cuda_prints_one_skip_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device; the script would run, not skip")
    run = _run()
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(line.startswith("skip: ") for line in run.stdout.splitlines()), run.stdout
