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


def missing() -> list[str]:
    page = PAGE.read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    text = " ".join(text.split())
    wrong = []
    for module in PUBLIC:
        package = importlib.import_module(module)
        for name in package.__all__:
            if f'id="{module}.{name}"' not in page:
                wrong.append(f"{module}.{name}: not on the API page")
                continue
            doc = getattr(package, name).__doc__ if name != "__version__" else None
            first = " ".join((doc or "").strip().split("\n\n")[0].split())
            plain = re.sub(r":\w+:`~?([^`]+)`|``([^`]+)``|`([^`]+)`",
                           lambda m: (m[1] or m[2] or m[3]).rpartition(".")[2]
                           if m[1] else (m[2] or m[3]), first)
            words = plain.split()[:6]
            if words and " ".join(words) not in text:
                wrong.append(f"{module}.{name}: its docstring is not shown ({' '.join(words)})")
    return wrong


if __name__ == "__main__":
    problems = missing()
    for line in problems:
        print(line)
    n = sum(len(importlib.import_module(m).__all__) for m in PUBLIC)
    print(f"API page: {n - len(problems)} of {n} public names with their docstrings")
    sys.exit(1 if problems else 0)
