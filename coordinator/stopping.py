"""When a conversation stops: a stop string in its text, its token budget, or end of sequence."""

from __future__ import annotations

import codecs


class StopMatcher:
    """Finds stop strings in streamed text; holds back what could still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        self._text += piece
        cut = min((i for i in (self._text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._text = self._text[:cut]
            out, self._sent = self._text[self._sent :], cut
            return out, True
        hold = 0 if final else self._holdback()
        end = len(self._text) - hold
        out, self._sent = self._text[self._sent : end], max(self._sent, end)
        return out, False

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._text)), best, -1):
                if self._text.endswith(stop[:k]):
                    best = k
                    break
        return best


class Stopping:
    """One conversation's stopping rules, fed the bytes it commits: decodes them to text, holds back what
    may become a stop string, and says why it finished ('length' until a stop string or the end)."""

    def __init__(self, stops: tuple[str, ...], max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        self.finish = "length"
        self._matcher = StopMatcher(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a piece may end inside a character

    @property
    def text(self) -> str:
        """The text so far, cut before the stop string that ended it."""
        return self._matcher.text

    def done(self, generated: int) -> bool:
        return generated >= self.max_new_tokens or self.finish != "length"

    def room(self, generated: int) -> int:
        """Tokens the conversation may still add."""
        return self.max_new_tokens - generated

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """(text that may be sent now, whether a stop string ended the conversation)."""
        text, stopped = self._matcher.feed(self._decoder.decode(piece))
        if stopped:
            self.finish = "stop"
        return text, stopped

    def end(self) -> None:
        """End of sequence (after the pieces fed), unless a stop string came first."""
        self.finish = "stop"

    def flush(self) -> str:
        """What was held back, at the end: the undecoded tail and any prefix of a stop string."""
        if self._matcher.stopped:
            return ""
        tail, _ = self._matcher.feed(self._decoder.decode(b"", final=True), final=True)
        return tail
