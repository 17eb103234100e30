"""The installed stack is the locked one, and the lock satisfies pyproject's ranges."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = Version(version)
    return pins


@pytest.mark.skipif(bool(os.environ.get("STEERLAB_UNLOCKED")), reason="make test-latest")
def test_installed_versions_equal_the_lock():
    wrong = {}
    for name, version in locked().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            wrong[name] = (str(version), "not installed")
            continue
        if installed.public != version.public:  # torch's +cpu / +cu128 build tag may differ
            wrong[name] = (str(version), str(installed))
    assert not wrong, f"installed differs from requirements.lock (locked, installed): {wrong}"


def test_lock_satisfies_the_pyproject_ranges():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    pins = locked()
    for req in requirements:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (name, str(pins[name]))
