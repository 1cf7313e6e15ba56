"""One completion's text as the engine streams it: token ids in, safe text deltas out.

Data flow: the engine keeps one `CompletionTextStream` per completion. Each step it calls
`append(new_token_ids)`: the ids go through the `IncrementalDetokenizer` (whole characters only),
the resulting text through the `StopChecker` (stop strings cut, partial stop strings held back),
and a `TextDelta` comes back: the text to emit now and, when a stop string matched, which one
(the engine then finishes the request with FinishReason.STOP and stop_reason = that string).
When the request finishes any other way (EOS, stop id, length, abort) the engine calls
`flush()` once and emits what it returns; `text` is always the concatenation of everything
returned so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shardserve.workers.output.detokenizer import IncrementalDetokenizer
from shardserve.workers.output.stop import StopChecker
from shardserve.workers.request import SamplingParams


@dataclass(frozen=True)
class TextDelta:
    """text: new text to stream this step (may be ""). stop_str: the stop string that finished
    the completion this step, else None."""

    text: str
    stop_str: str | None = None


class CompletionTextStream:
    """Detokenizer + stop strings of one completion, configured from its SamplingParams
    (stop, include_stop_str_in_output, skip_special_tokens)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._stop = StopChecker(params.stop, params.include_stop_str_in_output)
        self._chunks: list[str] = []
        self._finished = False

    @property
    def text(self) -> str:
        """All text streamed so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def stop_str(self) -> str | None:
        return self._stop.stop_str

    def append(self, token_ids: Sequence[int]) -> TextDelta:
        """Feed this step's output ids. After a stop string matched, further ids add nothing."""
        if self._finished:
            return TextDelta("", self._stop.stop_str)
        check = self._stop.feed(self._detokenizer.append(token_ids))
        self._finished = check.stop_str is not None
        self._chunks.append(check.text)
        return TextDelta(check.text, check.stop_str)

    def flush(self) -> TextDelta:
        """At finish: release the detokenizer's and the stop checker's held-back text. A stop
        string can still complete here (in the detokenizer's last characters)."""
        if self._finished:
            return TextDelta("", self._stop.stop_str)
        self._finished = True
        check = self._stop.feed(self._detokenizer.flush())
        text = check.text + ("" if check.stop_str is not None else self._stop.flush())
        self._chunks.append(text)
        return TextDelta(text, check.stop_str)
