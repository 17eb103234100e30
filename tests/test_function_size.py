"""Every function in steerlab/ fits on a screen: at most 60 lines of code (STYLE.md).

A function's lines of code are the lines of its span (nested functions and classes included)
that hold a token other than a comment: blank lines, comment lines and docstrings (of the
function and of anything nested in it) do not count.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "steerlab"
MAX_LINES = 60
_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


def _code_lines(source: str) -> set[int]:
    """The line numbers holding a token other than a comment (a string spans all its lines)."""
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines


def _docstring_lines(tree: ast.AST) -> set[int]:
    """The lines of every module, class and function docstring."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def function_sizes(source: str) -> list[tuple[str, int]]:
    """`(qualified name, lines of code)` of every function in a module's source, nested ones
    included."""
    tree = ast.parse(source)
    code = _code_lines(source) - _docstring_lines(tree)
    sizes: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    # Decorators count: they are part of what a reader holds.
                    start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                    span = range(start, child.end_lineno + 1)
                    sizes.append((name, sum(1 for line in span if line in code)))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return sizes


def test_counting():
    source = '''
@decorator
def f(x):
    """Docstring,

    over lines."""
    # a comment

    y = (x +
         1)
    def g():
        """Nested docstring."""
        return """a string
        that is code"""
    return y
'''
    sizes = dict(function_sizes(source))
    # decorator, def, two lines of y, def g, two lines of the returned string, return y
    assert sizes == {"f": 8, "f.g": 3}


def test_functions_fit_on_a_screen():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{name}: {size} lines"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, size in function_sizes(path.read_text(encoding="utf-8"))
        if size > MAX_LINES
    ]
    assert not offenders, f"functions over {MAX_LINES} lines of code:\n" + "\n".join(offenders)
