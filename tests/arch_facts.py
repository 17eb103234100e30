"""The import graph of steerlab, read from the source: `make arch` prints it and
tests/test_architecture.py asserts on it.

Every import statement counts, those inside functions (lazy imports) included: the layers of
docs/architecture.md's diagram, import circles among steerlab modules, imports against the
layer order, imports of another module's private names, and what each lazy import defers (its
``# deferred: <dependency>`` comment).
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "steerlab"
DOC = ROOT / "docs" / "architecture.md"
DEFERRED = re.compile(r"#\s*deferred:\s*(.+)")


@dataclass(frozen=True)
class Import:
    """One imported module (or name of a module) in one statement of a steerlab module."""

    importer: str  # steerlab.x
    target: str  # the module imported: steerlab.y, plotly.io, json
    names: tuple[str, ...]  # the names taken from it (empty for ``import target``)
    line: int
    lazy: bool  # inside a function (or class body), not at module level
    deferred: str | None  # what its ``# deferred:`` comment names


def modules() -> dict[str, Path]:
    """``{steerlab.x: path}`` for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """The comment of each line, and the lines that hold only a comment."""
    found, alone = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string
            if not tok.line[: tok.start[1]].strip():
                alone.add(tok.start[0])
    return found, alone


def _module_level(tree: ast.Module) -> set[int]:
    """ids of the statements that run at import (module body, its ifs and trys)."""
    out: set[int] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        out.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            for handler in getattr(node, "handlers", []):
                todo += handler.body
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and \
        node.test.id == "TYPE_CHECKING"


def imports(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every import of ``path``, one entry per module imported (``from steerlab import x``
    where ``x`` is a module counts as importing ``steerlab.x``)."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    top = _module_level(tree)
    typing_only = {id(n) for node in ast.walk(tree) if _type_checking(node)
                   for part in node.body for n in ast.walk(part)}
    comments, alone = _comments(source)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in typing_only:
            continue  # imports under ``if TYPE_CHECKING:`` never run
        above = [node.lineno - 1] if node.lineno - 1 in alone else []
        notes = [comments.get(n, "") for n in [*above, *range(node.lineno, node.end_lineno + 1)]]
        match = next((m for m in map(DEFERRED.search, notes) if m), None)
        deferred = match[1].strip() if match else None

        def add(target: str, names: tuple[str, ...], node=node, deferred=deferred) -> None:
            out.append(Import(module, target, names, node.lineno, id(node) not in top, deferred))

        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, ())
            continue
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        plain = tuple(a.name for a in node.names if f"{base}.{a.name}" not in known)
        if plain or base not in known:
            add(base, plain)
        for alias in node.names:
            if f"{base}.{alias.name}" in known:
                add(f"{base}.{alias.name}", ())
    return sorted(out, key=lambda i: (i.importer, i.line, i.target))


def all_imports() -> list[Import]:
    mods = modules()
    return [i for m, p in mods.items() for i in imports(m, p, set(mods))]


def layers(doc: str | None = None) -> dict[str, int]:
    """Layer of each subpackage and top-level module, read from the diagram in
    docs/architecture.md: lines ``<layer>  <name>/ <name>.py ...  — <what it holds>``."""
    doc = DOC.read_text(encoding="utf-8") if doc is None else doc
    diagram = re.search(r"```\n(.*?)```", doc, re.S)[1]
    out = {}
    for line in diagram.splitlines():
        m = re.match(r"\s*(\d+)\s+(.*?)\s+—", line)
        if m:
            for name in m[2].split():
                out[name.removesuffix("/").removesuffix(".py")] = int(m[1])
    return out


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of a steerlab module: its subpackage's, or its own at the top level (None for
    the package root, which re-exports the public API)."""
    parts = module.split(".")[1:]
    return table.get(parts[0]) if parts else None


def subpackages() -> list[str]:
    """The subpackages of steerlab (folders with an ``__init__.py``)."""
    return sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


def graph(found: list[Import]) -> dict[str, set[str]]:
    """steerlab module -> the steerlab modules it imports, lazily or not (root left out: it
    re-exports everything and nothing imports it)."""
    known = set(modules()) - {"steerlab"}
    out: dict[str, set[str]] = {m: set() for m in known}
    for imp in found:
        if imp.importer in known and imp.target in known and imp.target != imp.importer:
            out[imp.importer].add(imp.target)
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules, as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if dep not in index:
                connect(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return [_circle(group, edges) for group in sorted(groups)]


def _circle(group: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = group[0]
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for dep in sorted(edges[node] & set(group)):
            if dep == start:
                return [*paths[node], start]
            if dep not in paths:
                paths[dep] = [*paths[node], dep]
                todo.append(dep)
    raise AssertionError(group)


def upward(found: list[Import], table: dict[str, int]) -> list[str]:
    """Imports of a module of a higher layer than the importer's."""
    wrong = []
    for imp in found:
        if not imp.target.startswith("steerlab."):
            continue
        mine, theirs = layer_of(imp.importer, table), layer_of(imp.target, table)
        if mine is not None and theirs is not None and theirs > mine:
            wrong.append(f"{imp.importer}:{imp.line} (layer {mine}) imports {imp.target} "
                         f"(layer {theirs}){' lazily' if imp.lazy else ''}")
    return wrong


def private_names(found: list[Import]) -> list[str]:
    """Imports of another steerlab module's ``_private`` names (a package's own ``_private``
    submodules, like steerlab/cli/_app.py, are its business)."""
    wrong = []
    for imp in found:
        if not imp.target.startswith("steerlab") or imp.target == imp.importer:
            continue
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__"):
                wrong.append(f"{imp.importer}:{imp.line} imports {imp.target}.{name}")
        package = imp.target.rpartition(".")[0]
        private = [p for p in imp.target.split(".") if p.startswith("_")]
        if private and not (imp.importer == package or imp.importer.startswith(package + ".")):
            wrong.append(f"{imp.importer}:{imp.line} imports the private module {imp.target}")
    return wrong


def _imported_names(path: Path) -> set[str]:
    """Names a module binds at module level by importing them."""
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).partition(".")[0] for a in node.names}
    return out


def reexported(found: list[Import]) -> list[str]:
    """Names a steerlab module takes from another that only re-exports them (import from the
    module that defines a name; packages' ``__init__`` re-exports are for users)."""
    mods = modules()
    bound = {m: _imported_names(p) for m, p in mods.items() if p.name != "__init__.py"}
    wrong = []
    for imp in found:
        for name in imp.names:
            if name in bound.get(imp.target, ()):
                wrong.append(f"{imp.importer}:{imp.line} takes {name} from {imp.target}, "
                             "which imports it from elsewhere")
    return wrong


def is_library(module: str) -> bool:
    """Library modules (the CLI adapter, steerlab.cli, is not one)."""
    return module != "steerlab.cli" and not module.startswith("steerlab.cli.")


def lazy_imports(found: list[Import], *, library_only: bool = True) -> list[Import]:
    return [i for i in found if i.lazy and (is_library(i.importer) or not library_only)]


def needless_lazy(found: list[Import]) -> list[str]:
    """Lazy imports in library modules that defer nothing: no ``# deferred: <dependency>``
    comment (naming the package imported), or a module the file already imports at the top."""
    at_top = defaultdict(set)
    for imp in found:
        if not imp.lazy:
            at_top[imp.importer].add(imp.target)
    wrong = []
    for imp in lazy_imports(found):
        where = f"{imp.importer}:{imp.line} imports {imp.target} inside a function"
        if imp.target in at_top[imp.importer]:
            wrong.append(f"{where}, already imported at the top")
        elif imp.deferred is None:
            wrong.append(f"{where} with no '# deferred: <dependency>' comment")
        elif not imp.deferred.startswith(imp.target.partition(".")[0]):
            wrong.append(f"{where}, its comment names another dependency: {imp.deferred}")
    return wrong


def report(out=sys.stdout) -> None:
    """Print the facts."""
    found = all_imports()
    table = layers()
    mods = [m for m in modules() if m != "steerlab"]
    packages = subpackages()
    top = [m for m in mods if m.count(".") == 1 and m.split(".")[1] not in packages]
    print(f"Subpackages: {len(packages)}; top-level modules: {len(top)} "
          f"({' '.join(m.split('.')[1] for m in top)})", file=out)
    print("Modules per subpackage, by layer (docs/architecture.md):", file=out)
    for layer in sorted(set(table.values()), reverse=True):
        for name in sorted(n for n, v in table.items() if v == layer):
            inside = sorted(m.split(".")[2] for m in mods
                            if m.startswith(f"steerlab.{name}.") and m.count(".") == 2)
            what = f"{name}/ ({len(inside)}): {' '.join(inside)}" if name in packages else name
            print(f"  {layer:>2} {what}", file=out)
    unplaced = sorted(m for m in mods if layer_of(m, table) is None)
    if unplaced:
        print(f"  no layer: {' '.join(unplaced)}", file=out)
    circles = cycles(graph(found))
    print(f"Import circles among steerlab modules, lazy imports included: {len(circles)}",
          file=out)
    for circle in circles:
        print("  " + " -> ".join(circle), file=out)
    wrong = upward(found, table)
    print(f"Imports against the layer order: {len(wrong)}", file=out)
    for line in wrong:
        print("  " + line, file=out)
    private = private_names(found)
    print(f"Imports of another module's private names: {len(private)}", file=out)
    for line in private:
        print("  " + line, file=out)
    relayed = reexported(found)
    print(f"Names taken from a module that re-exports them: {len(relayed)}", file=out)
    for line in relayed:
        print("  " + line, file=out)
    lazy = lazy_imports(found)
    print(f"Lazy imports in library modules: {len(lazy)}", file=out)
    for imp in lazy:
        print(f"  {imp.importer}:{imp.line} {imp.target}  deferred: {imp.deferred}", file=out)
    needless = needless_lazy(found)
    if needless:
        print(f"Lazy imports that defer nothing: {len(needless)}", file=out)
        for line in needless:
            print("  " + line, file=out)
    cli = [i for i in lazy_imports(found, library_only=False) if not is_library(i.importer)]
    print(f"Lazy imports in the CLI (steerlab/cli, not checked for a deferred comment): "
          f"{len(cli)}", file=out)


if __name__ == "__main__":
    report()
