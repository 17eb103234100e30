"""Regenerate the command reference in docs/cli.md from the CLI's own help texts.

Usage: ``python docs/gen_cli.py`` (rewrites the part between the ``generated`` markers).
"""

from __future__ import annotations

import re
from pathlib import Path

import typer

from steerlab.cli import app

DOC = Path(__file__).with_name("cli.md")
START, END = "<!-- generated: start -->", "<!-- generated: end -->"


def _commands(cmd, ctx, path):
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            yield from _commands(cmd.get_command(ctx, name), ctx, [*path, name])
    else:
        yield " ".join(path), cmd


def _default(opt) -> str:
    if opt.required:
        return "required"
    d = opt.default
    if isinstance(d, bool):
        flag = opt.opts[0] if d else (opt.secondary_opts or ["off"])[0]
        return f"`{flag}`"
    return "" if d is None or d == "" else f"`{d}`"


def reference() -> str:
    root = typer.main.get_command(app)
    ctx = root.make_context("steerlab", [], resilient_parsing=True)
    out = []
    for name, cmd in _commands(root, ctx, []):
        args = [p for p in cmd.params if type(p).__name__.endswith("Argument")]
        opts = [p for p in cmd.params
                if type(p).__name__.endswith("Option") and p.name != "help"]
        usage = "".join(f" {a.name.upper()}" + ("..." if a.nargs == -1 else "") for a in args)
        out += [f"### `steerlab {name}`", "", (cmd.help or "").strip().split("\n")[0], "",
                "```", f"steerlab {name}{usage} [OPTIONS]", "```", ""]
        if args or opts:
            out += ["| argument / option | default | meaning |", "| --- | --- | --- |"]
            for a in args:
                out.append(f"| `{a.name.upper()}` | {'required' if a.required else ''} | "
                           f"{getattr(a, 'help', None) or ''} |")
            for o in opts:
                flags = " / ".join(f"`{x}`" for x in [*o.opts, *o.secondary_opts])
                text = (o.help or "").replace("|", "\\|")
                out.append(f"| {flags} | {_default(o)} | {text} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    text = DOC.read_text(encoding="utf-8")
    block = f"{START}\n\n{reference()}\n{END}"
    text = re.sub(re.escape(START) + ".*" + re.escape(END), lambda _: block, text, flags=re.S)
    DOC.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
