"""Token ids to text as they arrive: the one incremental detokenizer of every stream (the chat
terminal, the notebook widget through :class:`steerlab.chat.session.ChatSession`, and the
server's SSE answers).

As vLLM's: a *prefix* offset and a *read* offset into the ids. Each push decodes only the
window from the prefix offset, with and without the tokens after the read offset; the
difference is the new text. The tokens before the read offset give the new ones their left
context (a word's leading space, a character spread over several byte tokens). Text ending in
U+FFFD is held back until the multi-byte character completes. Special tokens are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REPLACEMENT = "\ufffd"  # what a decode shows for bytes that are not (yet) a whole character
MAX_PENDING = 8  # tokens held back (text ending in U+FFFD) before a cut is forced
HOLD = 3  # a UTF-8 character still open needs at most this many more bytes (tokens)


class Detokenizer:
    """Turn a growing list of token ids into text pieces, never splitting a character.

    Joining every piece :meth:`push` returns and then :meth:`flush` gives
    ``tokenizer.decode(ids, skip_special_tokens=True)`` (for byte-level BPE tokenizers;
    others as vLLM's detokenizer does), no piece holds U+FFFD that the whole decode does not,
    and each push decodes a window of at most about :data:`MAX_PENDING` tokens plus the new
    ones, never the whole reply. Bytes that never form a character (a model emitting
    garbage) are let out once :data:`MAX_PENDING` tokens wait, at a cut the next
    :data:`HOLD` tokens can no longer change.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode``, ``all_special_ids``).

    Examples:
        >>> d = Detokenizer(model.tokenizer)
        >>> pieces = [d.push([t]) for t in generated_ids]
        >>> text = "".join(pieces) + d.flush()
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.special = frozenset(tokenizer.all_special_ids) | {
            i for i, t in added.items() if getattr(t, "special", False)}
        self.ids: list[int] = []  # the ids pushed, special tokens left out
        self.decoded = 0  # characters decoded so far: the cost, linear in the reply
        self._prefix = 0  # start of the window
        self._read = 0  # end of the text already let out

    def _decode(self, lo: int, hi: int | None = None) -> str:
        text = self.tokenizer.decode(self.ids[lo:hi], skip_special_tokens=True)
        self.decoded += len(text)
        return text

    def push(self, ids: Iterable[int]) -> str:
        """Add ``ids``; return the text that became final (may be empty)."""
        self.ids += [int(i) for i in ids if int(i) not in self.special]
        if len(self.ids) == self._read:
            return ""
        before, after = self._decode(self._prefix, self._read), self._decode(self._prefix)
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            return self._move(len(self.ids), before, after)
        if len(self.ids) - self._read > MAX_PENDING:
            return self._cut(before, after)
        return ""

    def _move(self, read: int, before: str, text: str) -> str:
        """Let out ``text`` past ``before``; the window now starts at the old read offset."""
        self._prefix, self._read = self._read, read
        return text[len(before):]

    def _cut(self, before: str, after: str) -> str:
        """Too many tokens held back: let out the text up to a token the :data:`HOLD` tokens
        after it can no longer change (its decode is a prefix of the whole window's), keeping
        at least :data:`HOLD` tokens on either side (where the next window falls in step).
        A character spans at most four tokens: one of four cuts in a row is not inside one."""
        last = len(self.ids) - HOLD
        for read in range(last, max(self._read + HOLD, last - 3) - 1, -1):
            text = self._decode(self._prefix, read)
            if text.startswith(before) and after.startswith(text):
                return self._move(read, before, text)
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end), at the end."""
        before, after = self._decode(self._prefix, self._read), self._decode(self._prefix)
        self._prefix = self._read = len(self.ids)
        return after[len(before):]
