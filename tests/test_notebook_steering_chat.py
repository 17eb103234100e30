"""notebooks/03_steering_chat.ipynb runs top to bottom on the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(path: Path, timeout: int = 600):
    """Execute a notebook in its folder with nbclient; a failing cell raises CellExecutionError."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow
def test_steering_chat_notebook_runs():
    pytest.importorskip("nbclient")
    nb = run_notebook(NOTEBOOKS / "03_steering_chat.ipynb")
    views = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
             and "SteeringChat" in o["data"].get("text/plain", "")]
    assert views, "the chat widget was not displayed"
    chunks = re.search(r"streamed chunks in the last reply: (\d+)", _text(nb))
    assert chunks and int(chunks.group(1)) > 1
