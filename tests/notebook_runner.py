"""Run a notebook headless, top to bottom, in a fresh kernel (for tests)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(name: str, env: dict[str, str] | None = None, timeout: int = 300):
    """Execute ``notebooks/<name>`` with extra environment variables; returns the notebook.

    Any cell error raises ``nbclient.exceptions.CellExecutionError``.
    """
    import nbclient
    import nbformat

    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb
