"""After `mkdocs build`: the API page lists every public name (the root's and each
subpackage's ``__all__``) with the first line of its docstring. Run by `make docs`."""

from __future__ import annotations

import html
import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / ".site" / "api" / "index.html"
PUBLIC = ["steerlab", *(f"steerlab.{p.parent.name}" for p in
                        sorted((ROOT / "steerlab").glob("*/__init__.py"))
                        if p.parent.name not in {"cli", "builtin"})]


def plain(text: str) -> str:
    """Text without markup that renders differently (roles, backticks), spaces collapsed."""
    return " ".join(re.sub(r":\w+:|[`~*]", "", text).split())


def missing() -> list[str]:
    page = PAGE.read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    shown = plain(text)
    wrong = []
    for module in PUBLIC:
        package = importlib.import_module(module)
        for name in package.__all__:
            if name.startswith("__"):  # __version__: the page's filters leave dunders out
                continue
            if f'id="{module}.{name}"' not in page:
                wrong.append(f"{module}.{name}: not on the API page")
                continue
            doc = getattr(package, name).__doc__ if name != "__version__" else None
            words = plain(" ".join((doc or "").strip().split("\n\n")[0].split())).split()[:6]
            if words and " ".join(words) not in shown:
                wrong.append(f"{module}.{name}: its docstring is not shown ({' '.join(words)})")
    return wrong


if __name__ == "__main__":
    problems = missing()
    for line in problems:
        print(line)
    n = sum(not name.startswith("__") for m in PUBLIC
            for name in importlib.import_module(m).__all__)
    print(f"API page: {n - len(problems)} of {n} public names with their docstrings")
    sys.exit(1 if problems else 0)
