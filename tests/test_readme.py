"""The README's code blocks work as shown.

- ```python blocks run top to bottom, in order, in one namespace, with a temporary folder as
  the current directory (they load the embedded model themselves, as a reader would). A
  block that needs what a test machine lacks (an endpoint, a GPU) is marked by an HTML
  comment on the line before it, ``<!-- not run: <why> -->``, and only such a block is left
  out.
- ```bash / ```sh blocks are not executed: they install, download models, use GPUs and
  SLURM. Each ``steerlab ...`` command in them (also one quoted inside another command, e.g.
  ``sbatch --wrap "steerlab merge ..."``) is parsed by the real CLI down to its command, as
  ``steerlab`` would before running it, invoking nothing: every command and option must exist
  and every value must convert to its type (files are not opened: that happens when a
  command runs, and the commands here need GPUs or downloads). Shell variables take their
  values from the block's own assignments (``DATA=...``); one assigned from a command
  substitution (``jid=$(sbatch ...)``) stands for a job id, and the substituted command is
  checked too. ``make TARGET`` must name Makefile targets and ``sbatch SCRIPT`` an existing
  script; the arguments after a script whose header says they are "passed on to `steerlab
  COMMAND`" are parsed as that command's.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from steerlab.cli import app

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!-- not run: (.+?) -->$")
SEPARATORS = {";", "&&", "||", "|", "&"}


def code_blocks(text: str) -> list[dict]:
    """The fenced blocks of a Markdown text: language, code, first line number, and the
    reason of a ``<!-- not run: ... -->`` marker on the last non-blank line before it."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        before = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
        marker = NOT_RUN.match(before)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append({"lang": m[1], "code": "\n".join(lines[i + 1:end]), "line": i + 2,
                       "not_run": marker[1] if marker else None})
        i = end + 1
    return blocks


README = code_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_not_run_marker_leaves_out_exactly_its_block():
    text = ("x\n\n<!-- not run: needs an OpenAI-compatible endpoint -->\n```python\na = 1\n```\n"
            "<!-- a comment -->\n```python\nb = 2\n```\n```bash\nls\n```\n")
    got = [(b["lang"], b["code"], b["not_run"]) for b in code_blocks(text)]
    assert got == [("python", "a = 1", "needs an OpenAI-compatible endpoint"),
                   ("python", "b = 2", None), ("bash", "ls", None)]


@pytest.mark.slow
def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    blocks = [b for b in README if b["lang"] == "python"]
    assert blocks, "the README has no python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        if block["not_run"]:
            continue
        exec(compile(block["code"], f"README.md:{block['line']}", "exec"), namespace)


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block, with variables expanded (see the docstring)."""
    env = {"HOME": "~"}
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        assignment = re.match(r"^(\w+)=(.*)$", words[0]) if words else None
        if assignment and assignment[2].startswith("$("):  # jid=$(sbatch ...): the command
            env[assignment[1]] = "12345"
            words = [assignment[2][2:], *words[1:]]
            words[-1] = words[-1].removesuffix(")")
        elif assignment:
            env[assignment[1]] = assignment[2]
            words = words[1:]
        words = [re.sub(r"\$(\w+)", lambda m: env.get(m[1], m[0]), w) for w in words]
        command: list[str] = []
        for word in [*words, ";"]:
            if word in SEPARATORS:
                commands += [command] if command else []
                command = []
            else:
                command.append(word)
    return commands


def steerlab_invocations(commands: list[list[str]]) -> list[list[str]]:
    """Each ``steerlab`` command's arguments, also from a word that is itself a command."""
    found = []
    for words in commands:
        if words and words[0] == "steerlab":
            found.append(words[1:])
        for word in words[1:]:
            if word.startswith("steerlab "):
                found += steerlab_invocations([shlex.split(word)])
    return found


def parse(args: list[str]):
    """``steerlab ARGS`` parsed as the CLI parses it (its groups down to one command), without
    invoking anything; returns the command's context. Raises the CLI's usage errors."""
    command = typer.main.get_command(app)
    ctx = command.make_context("steerlab", [], resilient_parsing=True)
    rest = list(args)
    while hasattr(command, "commands"):
        assert rest and not rest[0].startswith("-"), f"no command in {args}"
        name, *rest = rest
        command = command.get_command(ctx, name)
        assert command is not None, f"steerlab has no command {name!r} ({args})"
        if not hasattr(command, "commands"):
            return command.make_context(name, rest, parent=ctx)
        ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)
    raise AssertionError(f"unreachable: {args}")


SHELL = [b for b in README if b["lang"] in {"bash", "sh", "shell"}]


@pytest.mark.parametrize("block", SHELL, ids=[f"line{b['line']}" for b in SHELL])
def test_shell_blocks_name_real_commands(block, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths in the README are relative to a checkout
    commands = shell_commands(block["code"])
    assert commands
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for words in commands:
        if words[0] == "make":
            missing = [w for w in words[1:] if "=" not in w and not w.startswith("-")
                       and w not in targets]
            assert not missing, f"README.md:{block['line']}: no Makefile target {missing}"
        if words[0] == "sbatch" and "--wrap" not in words:
            at = next(i for i, w in enumerate(words) if i and not w.startswith("-"))
            script = ROOT / words[at]
            assert script.is_file(), f"README.md:{block['line']}: no {words[at]}"
            # a template that passes its arguments on to a steerlab command says which
            passes = re.search(r"passed on to `steerlab ([\w ]+)`", script.read_text())
            if passes:
                parse([*passes[1].split(), *words[at + 1:]])
    for args in steerlab_invocations(commands):
        ctx = parse(args)
        assert ctx.command.name, args


def test_every_block_is_checked():
    """No block escapes both checks through its fence: each names a language this file runs
    or parses."""
    assert {b["lang"] for b in README} <= {"python", "bash", "sh", "shell"}
