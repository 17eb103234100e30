"""docs/architecture.md stays true: every module is described, layers only import downwards,
and no import cycle runs at module level (lazy imports inside functions are allowed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "steerlab"
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, *, top_level: bool) -> set[str]:
    """steerlab modules imported by ``path`` (only module-level statements if top_level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("steerlab"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("steerlab")}
    return found


def _layers() -> dict[str, int]:
    """Layer of each top-level name, read from the diagram in docs/architecture.md."""
    diagram = re.search(r"```\n(.*?)```", DOC, re.S)[1]
    layer, out = 0, {}
    for line in diagram.splitlines():
        m = re.match(r"\s*(\d)\s+\S+(?:\s\S+)?\s{2,}(.*)", line)
        if m:
            layer, names = int(m[1]), m[2]
        else:
            names = line
        for name in names.split():
            out[name.removeprefix("steerlab/").removesuffix("/*")] = layer
    return out


def _layer_of(module: str, layers: dict[str, int]) -> int | None:
    parts = module.split(".")[1:]
    if not parts:
        return None  # the package root re-exports everything
    return layers.get(parts[0])


def test_every_module_is_described():
    missing = [m for m in _modules() if m != "steerlab" and not m.startswith("steerlab.cli.")
               and f"{m.split('.')[1]}" not in DOC]
    assert not missing, f"add to docs/architecture.md: {missing}"
    for module in _modules():
        top = module.split(".")[1] if "." in module else None
        if top and top != "cli":
            assert f"**`{top}.py`**" in DOC or f"**`{top}/`**" in DOC, top


def test_layers_only_import_downwards():
    layers = _layers()
    modules = _modules()
    unplaced = sorted({m.split(".")[1] for m in modules if "." in m} - set(layers))
    assert not unplaced, f"no layer in the diagram for {unplaced}"
    wrong = []
    for module, path in modules.items():
        mine = _layer_of(module, layers)
        if mine is None:
            continue
        for dep in _imports(path, top_level=False):
            theirs = _layer_of(dep, layers)
            if theirs is not None and theirs > mine:
                wrong.append(f"{module} (layer {mine}) imports {dep} (layer {theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_module_level_import_cycles():
    modules = _modules()
    graph = {m: {d for d in _imports(p, top_level=True) if d in modules and d != m}
             for m, p in modules.items() if m != "steerlab"}

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(node):], node]))
        if node in done:
            return
        for dep in graph.get(node, ()):
            visit(dep, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for module in graph:
        visit(module, [], done)
