"""Stop strings over streamed text: find a match split across deltas, never stream part of one.

Data flow: the detokenizer's text deltas go into `StopChecker.feed(delta)`. The checker keeps a
small held-back tail: the longest suffix of the text so far that is a proper prefix of some
stop string (so at most max stop length - 1 characters). Each feed searches held + delta for a
stop string that ends inside the new delta — a match can only start inside the held tail,
because anything earlier could not be the start of a stop string. With a match, the text up to
it (up to its end with include_stop_str_in_output) is released and the checker is finished;
without one, everything except the new held tail is released. `flush()` at finish releases
the held tail, which at that point cannot become a stop string any more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopCheck:
    """text: what may be streamed now. stop_str: the stop string that ended the text, or None."""

    text: str
    stop_str: str | None = None


class StopChecker:
    """Per completion: stop: the stop strings (non-empty); include_stop_str_in_output: keep the
    matched string at the end of the text instead of cutting it off."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._stop = tuple(stop)
        self._include = include_stop_str_in_output
        self._max_held = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""
        self.stop_str: str | None = None  # set once a stop string matched

    @property
    def held_text(self) -> str:
        """Text received but not yet released because it may begin a stop string."""
        return self._held

    def feed(self, delta: str) -> StopCheck:
        """Check new text; return what can be streamed and the stop string if one completed."""
        if self.stop_str is not None:
            return StopCheck("", self.stop_str)
        if not self._stop:
            return StopCheck(delta)
        buffer = self._held + delta
        match = self._find_first_match(buffer, len(self._held))
        if match is not None:
            start, stop_str = match
            self.stop_str = stop_str
            self._held = ""
            end = start + len(stop_str) if self._include else start
            return StopCheck(buffer[:end], stop_str)
        num_held = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - num_held :]
        return StopCheck(buffer[: len(buffer) - num_held])

    def flush(self) -> str:
        """At finish (EOS, length, abort): release the held-back tail."""
        held, self._held = self._held, ""
        return held

    def _find_first_match(self, buffer: str, num_old: int) -> tuple[int, str] | None:
        """The stop string that completes first in buffer[num_old:] (earliest end; at equal ends
        the one starting earlier), as (start index, string); None when none ends there."""
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self._stop:
            # Only occurrences ending inside the new text: ones within the held tail were
            # already ruled out by the previous feed.
            start = buffer.find(s, max(0, num_old - len(s) + 1))
            if start < 0:
                continue
            candidate = (start + len(s), start, s)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of a stop string."""
        for length in range(min(self._max_held, len(buffer)), 0, -1):
            tail = buffer[len(buffer) - length :]
            if any(len(s) > length and s.startswith(tail) for s in self._stop):
                return length
        return 0
