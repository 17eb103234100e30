"""Every template in slurm/ on a real one-node SLURM cluster (slurm-wlm 22.05 + munge, started
for the module by tests/slurm_cluster/cluster.py), against the embedded model on the CPU.

The node is smaller than the templates' #SBATCH defaults, so each job is submitted with
command-line overrides only (the templates are used as they ship). The site hook is real:
the jobs are submitted with the venv off PATH and STEERLAB_SETUP activates it. Checked:

* each template's job COMPLETED (and, without overrides, is refused by the small partition);
* ``--array=1-4`` of batch_inference_array.slurm + the dependent ``steerlab merge`` job equal
  one batch_inference.slurm run, and ``--array=0-1`` of extract_array.slurm + merge equal one
  extract.slurm run (``assert_same_run``'s between-process tolerance: same batches, same
  kernels, one thread each; activations rtol 1e-6);
* that single inference run is requeued (``scontrol requeue``) after its first committed batch:
  it resumes (its log says how many tasks were already done), it keeps the first run's log lines
  (``--open-mode=append``), and its results still equal the array's;
* install_package.slurm pip-installs a local package into a throwaway venv.

`make test-slurm` installs the packages and runs this; elsewhere it is skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from conftest import assert_same_datasets, assert_same_run

if not os.environ.get("STEERLAB_SLURM_CLUSTER"):
    pytest.skip("starts a real SLURM cluster: make test-slurm runs it", allow_module_level=True)

from slurm_cluster.cluster import LocalCluster, missing_programs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
VENV_BIN = Path(sys.executable).parent
# What a small node fits (the node: this machine's CPUs, <= 8 GB, 2 GPUs); one CPU per task.
SMALL = ("--gres=gpu:1", "--cpus-per-task=1", "--mem=2500M", "--time=15")
PROMPTS = ["Who are you?", "Name a colour.", "Count to three.", "Say hello.",
           "What is rain?", "Name a fruit."]
PERSONAE = [{"persona": "assistant", "category": "assistant", "article": "an"},
            {"persona": "Hamlet", "category": "fictional-character", "article": ""}]
N_TASKS = len(PROMPTS) * len(PERSONAE)  # 12 tasks in 4 batches of 3: --array=1-4 gives
# each array task one batch
INFER = ("--model", "embedded", "--device", "cpu", "--dtype", "float32", "--max-tokens", "24",
         "--batch-size", "3")
PAIRS = [("How are you?", "Arr, I be fine, matey!", "I am fine, thank you."),
         ("Name a colour.", "Blue as the briny deep, arr.", "Blue."),
         ("What is 2+2?", "Four, ye landlubber!", "Four, of course."),
         ("Say hi.", "Ahoy there, me hearty", "Hello there, friend"),
         ("Where is Paris?", "In France, arr!", "Paris is in France."),
         ("Is it cold?", "Colder than Davy Jones' locker!", "It is a little cold.")]


def _missing() -> str | None:
    gone = missing_programs()
    return f"not on PATH: {', '.join(gone)}" if gone else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if _missing():
        pytest.fail(f"make test-slurm installs slurm-wlm and munge first; {_missing()}")
    root = tmp_path_factory.mktemp("cluster")
    with LocalCluster(root) as c:
        yield c


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The submission folder: inputs, the site hook, logs/ (the templates' --output)."""
    w = tmp_path_factory.mktemp("work")
    (w / "logs").mkdir()
    (w / "prompts.json").write_text(json.dumps(PROMPTS))
    (w / "personae.json").write_text(json.dumps(PERSONAE))
    (w / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    for name in ("single", "sharded"):
        (w / f"extract-{name}.yaml").write_text(
            "model: embedded\ndevice: cpu\ndtype: float32\npairs: pairs.jsonl\n"
            "layers: [3, 8]\npositions: [divergence, mean]\nbatch_size: 2\nflush_every: 2\n"
            f"output: out-{name}/acts.h5\n")
    # A site's set-up file: the venv is activated here, not inherited from the submitter.
    (w / "site.sh").write_text(
        f". {VENV_BIN}/activate\nexport HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1\n"
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}\n")
    return w


def _env(work: Path) -> dict[str, str]:
    """The submitter's environment: no venv on PATH, only STEERLAB_SETUP."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if Path(p) != VENV_BIN)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": path, "STEERLAB_SETUP": str(work / "site.sh")}


def _infer_args(work: Path) -> tuple[str, ...]:
    return ("--prompts-json", str(work / "prompts.json"),
            "--personae-json", str(work / "personae.json"), *INFER)


def _completed(cluster: LocalCluster, job: str, seconds: float = 600) -> list[dict]:
    tasks = cluster.wait(job, seconds)
    for t in tasks:
        out = Path(t["StdOut"])
        log = out.read_text() if out.is_file() else "(no log)"
        assert t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0", (t, log[-3000:])
    print(f"  job {job} ({tasks[0]['JobName']}): {len(tasks)} task(s) COMPLETED")
    return tasks


def _merge_job(cluster: LocalCluster, work: Path, after: str, command: str) -> str:
    """``steerlab merge`` as a job that runs once every task of ``after`` succeeded."""
    return cluster.sbatch(f"--dependency=afterok:{after}", "--job-name=steerlab-merge",
                          "--output=logs/%x-%j.out", "--mem=2G", "--time=10",
                          f"--wrap=. \"$STEERLAB_SETUP\" && {command}",  # sh
                          cwd=work, env=_env(work))


def test_templates_ask_for_more_than_the_small_node_has(cluster, work):
    for t in sorted(SLURM.glob("*.slurm")):
        out = subprocess.run(["sbatch", "--test-only", str(t)], cwd=work, env=cluster.env,
                             capture_output=True, text=True)
        assert out.returncode != 0, (t.name, out.stdout, out.stderr)
        print(f"  {t.name} without overrides: {out.stderr.strip().splitlines()[-1]}")


def test_single_run_requeued_and_array_plus_merge_agree(cluster, work):
    env = _env(work)
    single = cluster.sbatch(*SMALL, str(SLURM / "batch_inference.slurm"), *_infer_args(work),
                            cwd=work, env=env)
    run = work / "logs" / f"personae-inference-{single}"
    deadline = time.monotonic() + 300
    while not any((run / "parts").glob("batch-*.h5")):  # the first committed batch
        (state,) = cluster.jobs(single)
        assert time.monotonic() < deadline and state["JobState"] in ("PENDING", "RUNNING"), state
        time.sleep(0.2)
    assert not (run / "results.json").exists() or \
        len(json.loads((run / "results.json").read_text())) < N_TASKS
    cluster.run("scontrol", "requeue", single)
    # Once requeued (killed, then PENDING), SLURM holds the job 120 s (its BeginTime); the
    # test releases it at once to stay short.
    cluster.wait(single, 60, final={"PENDING"})
    cluster.run("scontrol", "update", f"JobId={single}", "StartTime=now")
    array = cluster.sbatch(*SMALL, "--array=1-4", str(SLURM / "batch_inference_array.slurm"),
                           *_infer_args(work), cwd=work, env=env)
    merge = _merge_job(cluster, work, array,
                       f"steerlab merge logs/personae-inference-{array}")
    (task,) = _completed(cluster, single)
    assert int(task["Restarts"]) == 1, task
    print(f"  job {single} requeued after its first batch: Restarts={task['Restarts']}")
    _completed(cluster, array)
    _completed(cluster, merge)
    log = Path(task["StdOut"]).read_text()
    done = [int(n) for n in re.findall(r"(\d+) of them already done", log)]
    print(f"  requeued job {single}: already-done counts per start {done}")
    assert len(done) == 2 and done[0] == 0 and done[1] > 0, log  # both starts, in one log
    assert log.count(f"finished: {N_TASKS} results") == 1, log
    assert_same_run(work / "logs" / f"personae-inference-{array}", run, exact=False)
    print(f"  --array=1-4 + merge == the requeued single run ({N_TASKS} results)")


def test_extract_array_plus_merge_equals_one_extract(cluster, work):
    env = _env(work)
    one = cluster.sbatch(*SMALL, str(SLURM / "extract.slurm"), "extract-single.yaml",
                         cwd=work, env=env)
    array = cluster.sbatch(*SMALL, "--array=0-1", str(SLURM / "extract_array.slurm"),
                           "extract-sharded.yaml", cwd=work, env=env)
    merge = _merge_job(cluster, work, array, "steerlab merge --config extract-sharded.yaml")
    for job in (one, array, merge):
        _completed(cluster, job)
    with h5py.File(work / "out-sharded" / "acts.h5") as merged, \
            h5py.File(work / "out-single" / "acts.h5") as single:
        names = assert_same_datasets(merged, single, exact=False)
    print(f"  --array=0-1 + merge == one extract ({len(names)} datasets, {len(PAIRS)} pairs)")


def test_install_package_into_a_venv(cluster, work):
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pkg = work / "probe-pkg"
    (pkg / "steerlab_probe").mkdir(parents=True)
    (pkg / "steerlab_probe" / "__init__.py").write_text("VALUE = 42\n")
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "steerlab-probe"\nversion = "1.0"\n')
    # a wheel built here (the venv's setuptools predates built-in bdist_wheel), installed by
    # the job from the local file only
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(work / "wheels"), str(pkg)], check=True)
    (wheel,) = (work / "wheels").glob("steerlab_probe-1.0-*.whl")
    job = cluster.sbatch(*SMALL, str(SLURM / "install_package.slurm"), "--no-index",
                         "--no-deps", str(wheel), cwd=work,
                         env={**_env(work), "STEERLAB_VENV": str(venv)})
    _completed(cluster, job)
    got = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import steerlab_probe; print(steerlab_probe.VALUE)"],
                         capture_output=True, text=True, cwd="/")
    assert got.stdout.strip() == "42", got.stderr
