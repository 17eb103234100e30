#!/usr/bin/env bash
# make test-slurm: install slurm-wlm and munge from the distribution where they are missing
# (root + apt-get), then run tests/test_slurm_cluster.py, which starts a throwaway one-node
# cluster, submits every slurm/ template and tears it down. Where the packages cannot be
# installed, one line says why and nothing fails.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
LOG=.slurm-install.log
need=()
for p in munged slurmctld slurmd sbatch; do command -v "$p" >/dev/null || need+=("$p"); done
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "test-slurm: skipped: ${need[*]} not installed, and apt-get needs root (install slurm-wlm and munge)"
        exit 0
    fi
    echo "test-slurm: installing slurm-wlm and munge with apt-get (log: $LOG)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurm-wlm munge; } >"$LOG" 2>&1; then
        echo "test-slurm: skipped: apt-get could not install slurm-wlm and munge (see $LOG)"
        exit 0
    fi
fi
echo "test-slurm: $(slurmctld -V) on a one-node cluster ($(nproc) CPUs, 2 fake GPUs)"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 STEERLAB_SLURM_CLUSTER=1 \
    exec "$PYTHON" -m pytest -q -s -p no:randomly tests/test_slurm_cluster.py
