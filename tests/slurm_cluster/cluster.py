"""A throwaway one-node SLURM cluster for tests: munged, slurmctld and slurmd from the
distribution's packages, every file (config, state, spool, logs, munge key and socket) in one
temporary folder, on free loopback ports, so it never meets a real cluster on the machine.

The node is deliberately small (this machine's CPUs, at most 8 GB, two fake GPUs backed by
device files), smaller than the templates' #SBATCH defaults, so jobs only run with command-line
overrides, as on a user's small partition.

    with LocalCluster(tmp) as cluster:
        job = cluster.sbatch("--gres=gpu:1", "slurm/extract.slurm", "cfg.yaml", cwd=work)
        assert cluster.wait(job)["JobState"] == "COMPLETED"
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port  # the harness runs under tests/ (its sys.path)

NODE = "localnode"
N_GPUS = 2
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def missing_programs() -> list[str]:
    """The daemons and clients not on PATH (empty: a cluster can start)."""
    return [p for p in PROGRAMS if shutil.which(p) is None]


def _mem_mb() -> int:
    kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return min(kb // 1024 - 1024, 8192)  # leave the OS a GB; a small node


class LocalCluster:
    """Start the cluster on ``__enter__`` (bounded wait for the node to be idle), stop it and
    cancel every job on ``__exit__``; ``root`` keeps its logs for a failed test to show."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.mem_mb = _mem_mb()
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    # -- set-up -------------------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for d in ("etc", "state", "spool", "run", "log", "munge", "dev"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        for k in range(N_GPUS):  # fake GPUs: the gres plugin needs device files to exist
            dev = r / "dev" / f"nvidia{k}"
            if not dev.exists():
                os.mknod(dev, 0o600 | 0o020000, os.makedev(1, 3))  # a char device (like null)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (r / "etc" / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={NODE} Name=gpu File={r}/dev/nvidia[0-{N_GPUS - 1}]\n")
        settings = {
            "ClusterName": "steerlabtest",
            "SlurmctldHost": f"{socket.gethostname().split('.')[0]}(127.0.0.1)",
            "SlurmctldPort": free_port(), "SlurmdPort": free_port(),
            "SlurmUser": "root", "SlurmdUser": "root",
            "AuthType": "auth/munge", "CredType": "cred/munge",
            "AuthInfo": f"socket={r}/munge/munge.socket",
            "StateSaveLocation": r / "state", "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "run" / "slurmctld.pid",
            "SlurmdPidFile": r / "run" / "slurmd.pid",
            "SlurmctldLogFile": r / "log" / "slurmctld.log",
            "SlurmdLogFile": r / "log" / "slurmd.log",
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core_Memory",
            "GresTypes": "gpu", "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none", "JobCompType": "jobcomp/none",
            "MpiDefault": "none", "ReturnToService": 2, "MinJobAge": 3600,
            "SchedulerType": "sched/backfill", "KillWait": 5, "MailProg": "/bin/true",
            "SlurmctldTimeout": 30, "SlurmdTimeout": 30, "InactiveLimit": 0,
        }
        lines = [f"{k}={v}" for k, v in settings.items()] + [
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} "
            f"CPUs={self.cpus} RealMemory={self.mem_mb} Gres=gpu:{N_GPUS} State=UNKNOWN",
            f"PartitionName=small Nodes={NODE} Default=YES MaxTime=INFINITE State=UP"]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, *cmd: str, name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 (kept open)
        self._procs.append(subprocess.Popen(cmd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT))

    def __enter__(self) -> LocalCluster:
        self._write_config()
        r = self.root
        try:
            self._start("munged", "--foreground", "--force", f"--key-file={r}/munge/munge.key",
                        f"--socket={r}/munge/munge.socket", f"--pid-file={r}/run/munged.pid",
                        f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/seed",
                        name="munged")
            self._wait_for(lambda: (r / "munge" / "munge.socket").exists(), 20, "munged")
            self._start("slurmctld", "-D", "-i", "-f", str(self.conf), name="slurmctld")
            self._wait_for(lambda: self._ok("scontrol", "ping"), 30, "slurmctld")
            self._start("slurmd", "-D", "-N", NODE, "-f", str(self.conf), name="slurmd")
            self._wait_for(lambda: self.node_state().startswith("IDLE"), 60, "the node")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._procs:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env,
                           capture_output=True, timeout=30)
        for p in reversed(self._procs):
            p.terminate()
        for p in reversed(self._procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()

    def _wait_for(self, ready, seconds: float, what: str) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if ready():
                return
            dead = [p.args[0] for p in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited while starting; see {self.root}/log")
            time.sleep(0.5)
        raise RuntimeError(f"{what} not ready after {seconds} s; see {self.root}/log")

    # -- clients ------------------------------------------------------------------------------
    def _ok(self, *cmd: str) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def run(self, *cmd: str, cwd: Path | None = None, env: dict | None = None) -> str:
        """Run a SLURM client command against this cluster; its stdout (raises on failure)."""
        out = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
        return out.stdout

    def node_state(self) -> str:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env,
                             capture_output=True, text=True)
        return out.stdout.strip().upper()

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        """Submit; the job id (``--parsable``)."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).strip().split(";")[0]

    def jobs(self, job: str) -> list[dict[str, str]]:
        """``scontrol show job``'s fields for the job (one dict per array task)."""
        text = self.run("scontrol", "show", "job", "-o", job)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line]

    def wait(self, job: str, seconds: float = 600,
             final: frozenset[str] | set[str] = FINAL) -> list[dict[str, str]]:
        """Wait (bounded) until every task of ``job`` is in a final state; their fields."""
        end = time.monotonic() + seconds
        while True:
            tasks = self.jobs(job)
            if tasks and all(t["JobState"] in final for t in tasks):
                return tasks
            if time.monotonic() > end:
                states = [(t["JobId"], t["JobState"], t.get("Reason")) for t in tasks]
                raise TimeoutError(f"job {job} not done after {seconds} s: {states}")
            time.sleep(1)
