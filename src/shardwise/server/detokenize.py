"""Token ids to text, one token at a time, so that the streamed deltas add up to the whole text exactly.

Decoding each token alone is wrong: byte-level tokenizers split one character over several tokens (an
emoji is often three or four), and SentencePiece ones decide a token's leading space from its
neighbours. So every step decodes the whole completion so far and emits the new suffix, holding back
text that is not final yet:

- a trailing U+FFFD replacement character: an incomplete UTF-8 sequence the next tokens complete;
- a trailing piece that could be the start of a stop string: if the string completes, none of it may
  have been sent.

The non-streamed response is built from the very same deltas, so streamed and non-streamed text are
equal by construction (and equal ``tokenizer.decode(all tokens)`` for every tokenizer whose decoded
text only grows at its end, which byte-level BPE ones like SmolLM2's do).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one completion, released in safe pieces as tokens arrive."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self.text = ""  # everything released so far
        self.stopped = False  # a stop string was found: text ends just before it

    def add(self, token: int) -> str:
        """Take one more token; return the text it makes final ('' while held back or after a stop)."""
        self._ids.append(token)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: release what was held back (a stop string found in it still ends the text)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        done = len(self.text)
        end = len(full)
        if not final:
            while end > done and full[end - 1] == REPLACEMENT:
                end -= 1
        hit = self._find_stop(full, done, end)
        if hit is not None:
            self.stopped = True
            end = hit
        elif not final:
            end -= self._partial_stop(full, done, end)
        delta = full[done:end] if end > done else ""
        self.text += delta
        return delta

    def _find_stop(self, full: str, done: int, end: int) -> int | None:
        """Where the first stop string starts in ``full[:end]``, looking only where a new match can be."""
        if not self._stop:
            return None
        start = max(0, done - max(len(s) for s in self._stop) + 1)
        hits = [i for i in (full.find(s, start, end) for s in self._stop) if i >= 0]
        return max(done, min(hits)) if hits else None

    def _partial_stop(self, full: str, done: int, end: int) -> int:
        """How many characters at the end of ``full[:end]`` begin some stop string (and must wait)."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, end - done), longest, -1):
                if full.endswith(s[:k], 0, end):
                    longest = k
                    break
        return longest
