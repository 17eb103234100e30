"""docs/architecture.md stays true: every module is described, layers only import downwards
and no steerlab modules import each other in a circle, imports inside functions included; a
lazy import says what heavy dependency it defers; nothing imports another module's private
names or takes a name from a module that only re-exports it. The facts come from
tests/arch_facts.py, which `make arch` prints."""

from __future__ import annotations

import importlib
import io

from arch_facts import (
    DOC,
    Import,
    all_imports,
    cycles,
    imports,
    layers,
    modules,
    needless_lazy,
    private_names,
    reexported,
    report,
    subpackages,
    upward,
)
from arch_facts import graph as import_graph

TEXT = DOC.read_text(encoding="utf-8")


def test_every_module_is_described():
    """Each module has its line in its subpackage's section (the CLI's in one paragraph)."""
    missing = []
    for module in modules():
        parts = module.split(".")[1:]
        if not parts or parts[0] == "cli":
            continue
        name = f"{'/'.join(parts)}.py" if module not in PACKAGES else f"{parts[0]}/"
        if f"**`{name}`**" not in TEXT and f"`{name}`" not in TEXT:
            missing.append(name)
    assert not missing, f"add to docs/architecture.md: {missing}"


PACKAGES = {f"steerlab.{p}" for p in subpackages()}


def test_the_folders_are_the_layers():
    """Every module sits in a subpackage (apart from the front ends), each subpackage on a
    layer of its own, and the diagram lists exactly the folders there are."""
    table = layers()
    top = [m for m in modules() if m.count(".") == 1 and m not in PACKAGES]
    assert sorted(top) == ["steerlab.demo", "steerlab.doctor"], top
    shared = {"base", "builtin"}, {"cli", "demo", "doctor"}  # data beside base; the front ends
    for name in subpackages():
        assert name in table, f"no layer in the diagram for {name}/"
        peers = {n for n, v in table.items() if v == table[name]} - {name}
        assert not peers or any({name, *peers} <= group for group in shared), (name, peers)
    assert set(table) <= set(subpackages()) | {"demo", "doctor"}, set(table)


def test_each_subpackage_says_what_it_is_and_exports_a_few_names():
    """A one-line docstring and an explicit, short ``__all__`` whose names all resolve."""
    for name in subpackages():
        if name in {"cli", "builtin"}:
            continue
        package = importlib.import_module(f"steerlab.{name}")
        doc = package.__doc__ or ""
        assert doc and "\n" not in doc.strip() and len(doc) <= 96, (name, doc)
        exported = package.__all__
        assert 1 <= len(exported) <= 20 and len(set(exported)) == len(exported), name
        for public in exported:
            assert getattr(package, public).__doc__, f"steerlab.{name}.{public}: no docstring"


def test_layers_only_import_downwards():
    """Lazy imports included: a function of a lower layer may not reach up either."""
    wrong = upward(all_imports(), layers())
    assert not wrong, "\n".join(wrong)


def test_no_import_circles_lazy_imports_included():
    found = cycles(import_graph(all_imports()))
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_lazy_imports_only_defer_heavy_dependencies():
    wrong = needless_lazy(all_imports())
    assert not wrong, "\n".join(wrong)


def test_no_private_names_from_other_modules():
    wrong = private_names(all_imports())
    assert not wrong, "\n".join(wrong)


def test_names_come_from_the_module_that_defines_them():
    wrong = reexported(all_imports())
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_lazy_imports_and_circles(tmp_path):
    """The reader finds an import inside a function, with its comment; the circle finder
    finds a circle closed by it and names its modules in order."""
    path = tmp_path / "a.py"
    path.write_text("import json\n\n\ndef f():\n    from steerlab.b import _x\n"
                    "    import plotly.io  # deferred: plotly\n", encoding="utf-8")
    found = imports("steerlab.a", path, {"steerlab.a", "steerlab.b"})
    assert found == [Import("steerlab.a", "json", (), 1, False, None),
                     Import("steerlab.a", "steerlab.b", ("_x",), 5, True, None),
                     Import("steerlab.a", "plotly.io", (), 6, True, "plotly")]
    assert private_names(found) == ["steerlab.a:5 imports steerlab.b._x"]
    assert len(needless_lazy(found)) == 1
    edges = {"steerlab.a": {"steerlab.b"}, "steerlab.b": {"steerlab.c"},
             "steerlab.c": {"steerlab.a", "steerlab.d"}, "steerlab.d": set()}
    assert cycles(edges) == [["steerlab.a", "steerlab.b", "steerlab.c", "steerlab.a"]]
    assert cycles({**edges, "steerlab.c": {"steerlab.d"}}) == []


def test_make_arch_prints_the_facts():
    out = io.StringIO()
    report(out)
    text = out.getvalue()
    assert "Import circles among steerlab modules, lazy imports included: 0" in text
    assert "Imports against the layer order: 0" in text
    assert f"Subpackages: {len(subpackages())}; top-level modules: 2 (demo doctor)" in text
