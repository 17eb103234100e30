"""The incremental detokenizer against the one-shot decode: random token sequences of the
embedded tokenizer (words, emoji, CJK, byte tokens that split characters, garbage bytes,
special tokens) pushed in random chunks give the text ``tokenizer.decode`` gives, no piece
shows a U+FFFD the whole text lacks, and each push decodes a bounded window."""

from __future__ import annotations

import random

import pytest

from steerlab.generation.detokenize import HOLD, MAX_PENDING, Detokenizer

TEXTS = ["Ahoy! Ça va? 海賊の船 🏴‍☠️ naïve — über 🦜🦜 end", "日本語のテキスト、中文字符。",
         " 👩‍👩‍👧‍👦 ∑ x² ≤ π", "Hello world, the quick brown fox.", "Ω≈ç√∫˜µ≤≥÷ 😀😃😄"]
MAX_CHUNK = 10


def _byte_ids(tokenizer) -> list[int]:
    """The id of each single-byte token (GPT-2's byte-to-character map)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], n = chr(256 + n), n + 1
    return [tokenizer.convert_tokens_to_ids(chars[b]) for b in range(256)]


class Counting:
    """The tokenizer, counting the ids of each decode call."""

    def __init__(self, tokenizer):
        self.tok, self.calls = tokenizer, []
        self.all_special_ids = tokenizer.all_special_ids
        self.added_tokens_decoder = tokenizer.added_tokens_decoder

    def decode(self, ids, **kw):
        self.calls.append(len(ids))
        return self.tok.decode(ids, **kw)


def _sequence(tokenizer, rng: random.Random, n: int, garbage: float = 0.1) -> list[int]:
    """``n`` or so ids: pieces of text, characters spelled byte by byte, random bytes and
    vocabulary ids, special tokens."""
    byte = _byte_ids(tokenizer)
    special = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.3:
            text = rng.choice(TEXTS)
            lo = rng.randrange(len(text))
            out += tokenizer(text[lo:lo + rng.randint(1, 12)], add_special_tokens=False)[
                "input_ids"]
        elif r < 0.55:  # a multi-byte character split into byte tokens
            out += [byte[b] for b in rng.choice("海🦜ç€😀語𝄞").encode()]
        elif r < 0.55 + garbage:  # bytes that may never form a character
            out += [byte[rng.randrange(0x80, 0x100)] for _ in range(rng.randint(1, 5))]
        elif r < 0.95:
            out.append(rng.randrange(len(tokenizer)))
        else:
            out.append(rng.choice(special))
    return out


def _stream(tokenizer, ids: list[int], rng: random.Random) -> tuple[list[str], Counting]:
    counting = Counting(tokenizer)
    d = Detokenizer(counting)
    pieces, at = [], 0
    while at < len(ids):
        k = rng.randint(1, MAX_CHUNK)
        pieces.append(d.push(ids[at:at + k]))
        at += k
    pieces.append(d.flush())
    return pieces, counting


@pytest.mark.parametrize("seed", range(12))
def test_pieces_join_to_the_whole_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = _sequence(tokenizer, rng, 300, garbage=0.02 if seed % 2 else 0.3)
    pieces, counting = _stream(tokenizer, ids, rng)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == whole
    if "\ufffd" not in whole:
        assert not any("\ufffd" in p for p in pieces)
    assert max(counting.calls) <= 2 * (MAX_PENDING + MAX_CHUNK) + HOLD


def test_no_piece_splits_a_character(tokenizer):
    text = "Ahoy! Ça va? 海賊の船 🏴‍☠️ naïve — über 🦜🦜 end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tokenizer)
    pieces = [d.push([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5


def test_garbage_bytes_stream_out_in_bounded_windows(tokenizer):
    """Bytes that never form a character are let out as they become final, not held to
    the end, and the window stays small."""
    byte = _byte_ids(tokenizer)
    rng = random.Random(7)
    ids = [byte[rng.randrange(0x80, 0x100)] for _ in range(400)]
    pieces, counting = _stream(tokenizer, ids, rng)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(counting.calls) <= 2 * (MAX_PENDING + MAX_CHUNK) + HOLD
    assert len(pieces[-1]) < 20  # the flush lets out only the last few


def test_cost_is_linear_in_the_reply(tokenizer):
    """Characters decoded over a long reply pushed token by token: a bounded multiple of its
    length (decoding the whole reply at each push: about half its tokens times it)."""
    rng = random.Random(3)
    ids = _sequence(tokenizer, rng, 3000)
    d = Detokenizer(tokenizer)
    pieces = [d.push([i]) for i in ids] + [d.flush()]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == whole
    assert d.decoded < 12 * len(whole)  # about 5x; re-decoding the reply: 1500x


def test_special_tokens_are_skipped(tokenizer):
    d = Detokenizer(tokenizer)
    hello = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    specials = [tokenizer.eos_token_id, *tokenizer.all_special_ids]
    got = d.push([*specials, *hello, *specials]) + d.flush()
    assert got == "Hello" and d.ids == hello
