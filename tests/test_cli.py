"""The CLI adapter: help texts and the bad-input contract (one line, exit code 2)."""

from __future__ import annotations

import subprocess
import sys

STEERLAB = [sys.executable, "-m", "steerlab.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STEERLAB, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_bad_model_path_is_exit_2_with_one_line(tmp_path):
    out = _run("demo", "--model", str(tmp_path / "missing" / "model"))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no such model directory" in lines[0]


def test_unknown_option_is_exit_2():
    out = _run("demo", "--no-such-option")
    assert out.returncode == 2
