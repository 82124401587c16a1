"""A request's new text as its tokens arrive: pieces safe to send, and stop strings.

A piece is held back while the text ends in an incomplete character (U+FFFD from a split
UTF-8 sequence) or in what may be the start of a stop string, so a streamed answer never
sends text that a later stop string would cut off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


class TextTracker:
    """Decodes the generated ids; `update` says what new text may be sent and if a stop hit."""

    def __init__(self, decode: Decode, stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = tuple(s for s in stops if s)
        self.sent = 0  # characters of the text already handed out
        self.text = ""

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """(new piece to send, whether a stop string ended the answer) after `ids`."""
        self.text = self.decode(ids)
        cut = self._first_stop()
        if cut is not None:
            self.text = self.text[:cut]
            return self._take(cut), True
        return self._take(self._safe_end()), False

    def flush(self) -> str:
        """The text still held back, once the answer is over."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _first_stop(self) -> int | None:
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _safe_end(self) -> int:
        end = len(self.text.rstrip("\ufffd"))
        held = 0
        for stop in self.stops:  # a tail that may grow into a stop string waits
            for k in range(min(len(stop) - 1, end), 0, -1):
                if self.text[end - k : end] == stop[:k]:
                    held = max(held, k)
                    break
        return end - held
