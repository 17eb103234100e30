"""Interactive chat: the session state on the tiny model, and `steerlab chat` through a real
pseudo-terminal on the embedded model (structure only: labels, prompts, lengths, differences)."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from steerlab.base.errors import SteerlabError
from steerlab.chat.session import ChatSession
from steerlab.cli._commands import Command, parse_command, run_command
from steerlab.model.personas import ASSISTANT
from steerlab.steering.vector import SteeringVector

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _vector(d_model: int, layers: tuple[int, ...], norm: float, seed: int = 0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(len(layers), d_model, generator=g)
    return SteeringVector(d / d.norm(dim=-1, keepdim=True) * norm, layers)


def test_parse_command():
    assert parse_command("hello /there") is None
    assert parse_command("//not a command") is None
    assert parse_command("  /tokens 50 ") == Command("tokens", "50")
    assert parse_command("/system You are   terse.") == Command("system", "You are   terse.")
    assert parse_command("/CLEAR") == Command("clear")
    with pytest.raises(SteerlabError, match="/help"):
        parse_command("/frobnicate")


def test_commands_change_state(tiny_model, tmp_path):
    s = ChatSession(tiny_model)
    s.history.append({"role": "user", "content": "x"})
    assert "cleared" in run_command(s, Command("clear")) and s.history == []
    run_command(s, Command("persona", "Captain Flint"))
    assert s.persona.persona == "Captain Flint"
    run_command(s, Command("persona", "assistant"))
    assert s.persona == ASSISTANT
    run_command(s, Command("system", "Be brief."))
    assert s.system_prompt()(ASSISTANT) == "Be brief."
    run_command(s, Command("system"))
    assert s.system is None
    # SmolLM2's ChatML template has no thinking mode: the flag is set, and said to do nothing
    assert "no effect" in run_command(s, Command("thinking"))
    assert s.thinking
    run_command(s, Command("nothinking"))
    assert not s.thinking
    run_command(s, Command("tokens", "7"))
    assert s.max_tokens == 7
    for bad in ("0", "x", ""):
        with pytest.raises(SteerlabError, match="usage: /tokens"):
            run_command(s, Command("tokens", bad))
    assert "/steer" in run_command(s, Command("help"))
    path = _vector(64, (1, 2), 5.0).save(tmp_path / "v")
    assert "steering with" in run_command(s, Command("steer", f"{path} 3 2"))
    assert s.steering.alpha == 3.0 and s.steered_layers() == [2]
    first = s.steering
    run_command(s, Command("steer", "-1.5"))
    assert s.steering.alpha == -1.5 and s.steering.vector is first.vector
    assert first.alpha == 3.0  # a Steering is a frozen value: changing strength makes a new one
    for bad in ("nan", "inf"):
        with pytest.raises(SteerlabError, match="finite"):
            run_command(s, Command("steer", bad))
    with pytest.raises(SteerlabError, match="no layer 0"):
        run_command(s, Command("steer", f"{path} 3 0"))
    with pytest.raises(SteerlabError, match="no such file"):
        run_command(s, Command("steer", f"{tmp_path / 'nope'} 3"))
    with pytest.raises(SteerlabError, match="d_model"):
        s.set_steering(_vector(32, (1,), 1.0), 1.0)
    run_command(s, Command("unsteer"))
    assert s.steering is None and s.steered_layers() == []
    with pytest.raises(SteerlabError, match="no steering vector"):
        s.set_strength(2.0)


def test_reply_streams_and_keeps_history(tiny_model):
    s = ChatSession(tiny_model, max_tokens=12)
    chunks: list[str] = []
    r = s.reply("Hello", on_text=chunks.append)
    assert "".join(chunks) == r.text and r.n_tokens <= 12 and not r.interrupted
    assert [m["role"] for m in s.history] == ["user", "assistant"]
    r2 = s.reply("Again", should_stop=lambda: True)
    assert r2.interrupted and r2.n_tokens == 1 and len(s.history) == 4


def test_steered_reply_equals_steered_generate(tiny_model):
    """The session's steered reply and projections are those of the library path on the same
    prompt ids: ``generate`` under ``steer`` and ``monitor`` (greedy: exact token equality)."""
    from steerlab.generation.generator import generate
    from steerlab.steering.intervention import steer
    from steerlab.steering.monitoring import monitor

    vec = _vector(64, (1,), 50.0)
    s = ChatSession(tiny_model, max_tokens=10)
    ids = s.prompt_ids("Hello")
    plain = generate(tiny_model, [ids], max_new_tokens=10).tokens[0]
    with steer(tiny_model, vec, 1.0), monitor(tiny_model, vec, layers=[1]) as mon:
        want = generate(tiny_model, [ids], max_new_tokens=10).tokens[0]
    assert tuple(plain) == s.reply("Hello").tokens
    s.history.clear()
    s.set_steering(vec, 1.0)
    steered = s.reply("Hello", projection_layer=1)
    assert steered.tokens == tuple(want)
    # float32 projections of the same residuals: equal up to summation order (1e-5 relative)
    torch.testing.assert_close(torch.tensor(steered.projection),
                               mon.trace(1)[0, : len(want)], rtol=1e-5, atol=1e-5)
    s.history.clear()
    s.set_strength(0.0)  # strength 0 leaves the model untouched
    assert s.reply("Hello").tokens == tuple(plain)


# --- the terminal program -----------------------------------------------------------------


def _words(text: str) -> str:
    """Text with whitespace runs collapsed (the terminal turns newlines into CR LF)."""
    return " ".join(text.split())


class _Term:
    """`steerlab chat` in a pseudo-terminal."""

    def __init__(self, *args: str):
        import pexpect

        env = {**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float sums as here
        self.child = pexpect.spawn(sys.executable, ["-m", "steerlab.cli", "chat", *args],
                                   env=env, encoding="utf-8", timeout=120,
                                   dimensions=(40, 300))
        self.child.expect("Ctrl-D quits")
        self.prompt()

    def prompt(self) -> str:
        self.child.expect_exact("you> ")
        return ANSI.sub("", self.child.before)

    def command(self, line: str) -> str:
        self.child.sendline(line)
        return self.prompt().replace(line, "", 1).strip()

    def say(self, line: str, label: str) -> str:
        self.child.sendline(line)
        self.child.expect_exact(f"{label}> ")
        return self.prompt().strip()


@pytest.mark.slow
def test_terminal_chat(tmp_path, embedded_model):
    import pexpect

    vec = _vector(576, (8,), 60.0).save(tmp_path / "random")
    # references: the library's replies on the same weights, unsteered and steered
    ref = ChatSession(embedded_model, max_tokens=12)
    want_plain = ref.reply("Hi there").text
    ref.clear()
    ref.set_steering(SteeringVector.load(vec), 1.0)
    want_steered = ref.reply("Hi there").text
    t = _Term("--max-tokens", "12")
    assert "/persona NAME" in t.command("/help")
    assert "max tokens per reply: 12" in t.command("/tokens 12")
    assert _words(t.say("Hi there", "assistant")) == _words(want_plain)
    assert "cleared" in t.command("/clear")
    assert "steering with" in t.command(f"/steer {vec} 1")
    t.command("/clear")
    assert _words(t.say("Hi there", "assistant")) == _words(want_steered)
    assert "steering off" in t.command("/unsteer")
    t.command("/clear")
    assert _words(t.say("Hi there", "assistant")) == _words(want_plain)
    assert "persona: Hamlet" in t.command("/persona Hamlet")
    assert t.say("Who are you?", "Hamlet")
    assert "system prompt: Be terse." in t.command("/system Be terse.")
    assert "thinking on" in t.command("/thinking")
    assert "thinking off" in t.command("/nothinking")
    for bad, hint in (("/foo", "unknown command /foo"), ("/tokens many", "usage: /tokens"),
                      (f"/steer {tmp_path / 'none'} 2", "no such file")):
        out = t.command(bad)
        assert out.startswith("! ") and hint in out and len(out.splitlines()) == 1

    # Esc stops a long reply mid-stream; the session goes on.
    t.command("/tokens 2000")
    t.child.sendline("Count from 1 to 500, one number per line.")
    t.child.expect_exact("Hamlet> ")
    t.child.expect(r"\S+\s+\S+\s+\S+\s+\S+")  # a few words have streamed
    t.child.send("\x1b")
    t.child.expect(r"\[stopped after (\d+) tokens\]")
    assert 1 <= int(t.child.match.group(1)) < 2000
    t.prompt()
    # type-ahead while a reply streams is kept: a line ended with Enter is sent next, an
    # unfinished one starts the next prompt
    t.command("/tokens 2000")
    t.child.sendline("Count from 1 to 500, one number per line.")
    t.child.expect_exact("Hamlet> ")
    t.child.expect(r"\S+\s+\S+\s+\S+")
    t.child.send("/tokens 6\r/persx\x7fo")  # typed during the stream (not echoed yet)
    t.child.send("\x1b")
    t.child.expect(r"\[stopped after \d+ tokens\]")
    t.child.expect_exact("you> /tokens 6")  # the queued line, echoed as it is sent
    t.child.expect_exact("max tokens per reply: 6")
    t.child.expect_exact("you> /perso")  # the unfinished line (backspace applied), editable
    t.child.sendline("na Ophelia")
    t.child.expect_exact("persona: Ophelia")
    t.prompt()
    assert t.say("Thanks!", "Ophelia")
    # Ctrl-C stops a stream too, and the session goes on
    t.command("/tokens 2000")
    t.child.sendline("Count from 1 to 500, one number per line.")
    t.child.expect_exact("Ophelia> ")
    t.child.expect(r"\S+\s+\S+\s+\S+")
    t.child.sendintr()
    t.child.expect(r"\[stopped after \d+ tokens\]")
    t.prompt()
    assert "max tokens per reply: 4" in t.command("/tokens 4")
    t.child.sendeof()
    t.child.expect(pexpect.EOF)
    t.child.close()
    assert t.child.exitstatus == 0
