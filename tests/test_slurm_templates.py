"""The sbatch templates run as scripts (bash; `srun` and `apptainer` are stand-ins that log
their arguments and run the rest): the site hook is sourced first, the container wraps the
command, logs are appended, and every #SBATCH line comes before the first command (sbatch
stops reading directives there). A real cluster is not needed for these."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "slurm").glob("*.slurm"))
RUNS = [t for t in TEMPLATES if t.stem != "install_package"]  # the ones that run steerlab
STANDIN = """#!/bin/bash
printf '%s|%s\\n' "${STEERLAB_TEST_SETUP:-unset}" "$(basename "$0") $*" >> "$CALLS"
[[ "$(basename "$0")" == apptainer ]] && shift 3  # exec --nv IMAGE
exec "$@"
"""


@pytest.fixture
def stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "apptainer"):
        (bin_dir / name).write_text(STANDIN)
        (bin_dir / name).chmod(0o755)
    setup = tmp_path / "site.sh"
    setup.write_text("export STEERLAB_TEST_SETUP=sourced\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "CALLS": str(tmp_path / "calls.log"), "STEERLAB_SETUP": str(setup),
           "SLURM_ARRAY_JOB_ID": "77", "HF_HUB_OFFLINE": "1"}
    return env, tmp_path / "calls.log"


def _run(template: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(template), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_directives_come_first_and_logs_are_appended():
    assert len(TEMPLATES) == 5
    for t in TEMPLATES:
        lines = t.read_text().splitlines()
        first_command = next(i for i, line in enumerate(lines[1:], 1)
                             if line.strip() and not line.startswith("#"))
        directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
        assert directives and max(directives) < first_command, t.name
        assert "#SBATCH --open-mode=append" in lines, t.name
        assert subprocess.run(["bash", "-n", str(t)]).returncode == 0, t.name


@pytest.mark.parametrize("template", RUNS, ids=[t.stem for t in RUNS])
def test_template_sources_the_site_hook_then_runs_steerlab(template, stand_ins, tmp_path):
    env, calls = stand_ins
    inference = template.stem.startswith("batch_inference")
    args = ["--help"] if inference else [str(tmp_path / "missing.yaml")]
    out = _run(template, env, *args)
    # infer --help exits 0; extract on a missing config is the one-line bad-input error
    assert out.returncode == (0 if inference else 2), out.stderr
    if not inference:
        assert "missing.yaml: no such file" in out.stderr
    setup, command = calls.read_text().splitlines()[0].split("|")
    assert setup == "sourced"
    want = "srun steerlab infer --dtype bfloat16 --no-progress" if inference else \
        "srun steerlab extract --config"
    assert command.startswith(want), command
    if template.stem == "batch_inference_array":
        assert "--output-dir logs/personae-inference-77" in command


def test_container_wraps_the_command(stand_ins):
    env, calls = stand_ins
    out = _run(ROOT / "slurm" / "batch_inference.slurm",
               {**env, "STEERLAB_CONTAINER": "/images/steerlab.sif"}, "--help")
    assert out.returncode == 0, out.stderr
    srun, apptainer = (line.split("|")[1] for line in calls.read_text().splitlines())
    assert srun.startswith("srun apptainer exec --nv /images/steerlab.sif steerlab infer")
    assert apptainer.startswith("apptainer exec --nv /images/steerlab.sif steerlab infer")


def test_install_package_pip_installs_into_the_venv_in_the_container(stand_ins, tmp_path):
    env, calls = stand_ins
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(STANDIN)  # logs `python -m pip install ...`
    (venv / "bin" / "python").chmod(0o755)
    template = ROOT / "slurm" / "install_package.slurm"
    out = _run(template, {**env, "STEERLAB_VENV": str(venv), "STEERLAB_CONTAINER": "img.sif"},
               "flash-attn", "--no-build-isolation")
    # srun -> apptainer -> the venv's python (a stand-in too): each logs what it was given
    lines = calls.read_text().splitlines()
    assert lines[0] == (f"sourced|srun apptainer exec --nv img.sif {venv}/bin/python -m pip "
                        "install flash-attn --no-build-isolation"), (lines, out.stderr)
    assert lines[2].endswith("python -m pip install flash-attn --no-build-isolation")
    missing = _run(template, {**env, "STEERLAB_VENV": str(tmp_path / "none")}, "flash-attn")
    assert missing.returncode == 2 and "no such venv" in missing.stderr
    assert _run(template, {**env, "STEERLAB_VENV": str(venv)}).returncode == 2  # no package
