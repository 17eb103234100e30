"""docs/architecture.md stays true: every module is described, layers only import downwards
and no steerlab modules import each other in a circle, imports inside functions included; a
lazy import says what heavy dependency it defers; nothing imports another module's private
names or takes a name from a module that only re-exports it. The facts come from
tests/arch_facts.py, which `make arch` prints."""

from __future__ import annotations

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
    upward,
)
from arch_facts import graph as import_graph

TEXT = DOC.read_text(encoding="utf-8")


def test_every_module_is_described():
    missing = [m for m in modules() if m != "steerlab" and not m.startswith("steerlab.cli.")
               and f"{m.split('.')[1]}" not in TEXT]
    assert not missing, f"add to docs/architecture.md: {missing}"
    for module in modules():
        top = module.split(".")[1] if "." in module else None
        if top and top != "cli":
            assert f"**`{top}.py`**" in TEXT or f"**`{top}/`**" in TEXT, top


def test_layers_only_import_downwards():
    """Lazy imports included: a function of a lower layer may not reach up either."""
    table = layers()
    unplaced = sorted({m.split(".")[1] for m in modules() if "." in m} - set(table))
    assert not unplaced, f"no layer in the diagram for {unplaced}"
    wrong = upward(all_imports(), table)
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
