"""Incremental detokenization with stop strings: token ids in, text deltas out.

Text is released only when it is final: a byte-level token may end inside a UTF-8 character
(decoded as U+FFFD until the next token completes it), and text that could be the start of a stop
string is held back until the next token shows whether the stop string follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


class TextStream:
    """Feed token ids one at a time; `push` returns the new final text and whether a stop string
    ended the sequence (the stop string itself is never released)."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already in self.text
        self._read = 0
        self.text = ""  # all decoded text so far, including held-back text
        self._released = 0  # len of self.text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text now safe to show."""
        if self.stopped:
            return ""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """The sequence ended without a stop string: release everything held back."""
        if self.stopped:
            return ""
        tail = self._decode(self._ids[self._prefix :])
        done = self._decode(self._ids[self._prefix : self._read])
        self.text += tail[len(done) :]  # an incomplete character shows as U+FFFD, as HF does
        self._read = len(self._ids)
        out = self.text[self._released :]
        self._released = len(self.text)
        return out

    def _release(self) -> str:
        cut = self._find_stop()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            out = self.text[self._released :]
            self._released = len(self.text)
            return out
        safe = len(self.text) - self._held_back()
        out = self.text[self._released : safe]
        self._released = max(self._released, safe)
        return out

    def _find_stop(self) -> int | None:
        """Index of the earliest stop string in the text not yet released (plus its overlap)."""
        if not self._stop:
            return None
        longest = max(len(s) for s in self._stop)
        start = max(0, self._released - longest + 1)
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
