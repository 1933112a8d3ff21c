"""Stop strings and streamed text: what part of a sequence's decoded text is final and may be sent.

Pure Python. The caller decodes the sequence's generated ids and feeds the whole text each step;
this object finds stop strings (also when one spans several tokens), trims them, and holds back the
tail that could still turn into a stop string or is an incomplete UTF-8 character.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder gives for the first bytes of a multi-byte character


class StreamText:
    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.stopped = False
        self._scanned = 0  # characters of `text` already searched for stop strings

    def feed(self, text: str) -> bool:
        """Take the whole decoded text so far; return True when a stop string has just matched."""
        if self.stopped:
            return True
        self.text = text
        first: int | None = None
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, min(self._scanned, len(text)) - longest + 1)
        for stop in self.stops:
            pos = text.find(stop, start)
            if pos != -1 and (first is None or pos < first):
                first = pos
        self._scanned = len(text)
        if first is not None:
            self.text = text[:first]
            self.stopped = True
        return self.stopped

    def release(self, final: bool = False) -> str:
        """Text that became final since the last call."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        end = max(end, self.sent)
        chunk = self.text[self.sent : end]
        self.sent = end
        return chunk

    def _held_back(self) -> int:
        text = self.text
        held = 0
        # An incomplete multi-byte character decodes to U+FFFD until its last byte arrives.
        while held < len(text) and text[len(text) - 1 - held] == REPLACEMENT:
            held += 1
        tail = text[: len(text) - held]
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:size]):
                    best = size
                    break
        return held + best
