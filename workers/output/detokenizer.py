"""Incremental detokenization: one completion's new token ids -> the text they add.

Data flow: the engine creates one `IncrementalDetokenizer` per completion with the prompt ids
(their last few tokens seed the decode window) and calls `append(new_ids)` each step; it
returns the text delta. Token strings are kept only for a short window [prefix_offset:]: each
call decodes tokens[prefix_offset:read_offset] (text already emitted, there only so the
tokenizer's merging and spacing rules see the same context) and tokens[prefix_offset:], and
emits the difference. While the decoded tail ends with U+FFFD the last tokens are an incomplete
UTF-8 sequence (byte-level BPE splits emoji and CJK characters), so nothing is emitted and the
window grows until the character completes. This is the algorithm of Hugging Face's
TextStreamer and vLLM's detokenize_incrementally; each call costs O(window), not O(output).
`flush()` at finish emits whatever is still held back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens that seed the window: enough for the tokenizer's cleanup rules around the first
# output token (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
INITIAL_DETOKENIZATION_OFFSET = 5

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decode one completion's output ids incrementally without ever splitting a character.

    tokenizer: a Hugging Face tokenizer (`convert_ids_to_tokens`, `convert_tokens_to_string`,
    `all_special_ids`, `len()`). prompt_token_ids: the prompt, for context only (its text is not
    emitted). skip_special_tokens: drop special tokens (EOS, chat markers) from the text.
    Ids outside the tokenizer's vocabulary (a model's padded vocabulary) add no text.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_len = len(tokenizer)
        self._skipped_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        context = self._to_tokens(prompt_token_ids[-(INITIAL_DETOKENIZATION_OFFSET + 2) :])
        # Token strings from prefix_offset on; earlier ones are never needed again and are dropped.
        self._tokens: list[str] = context
        self._read_offset = len(context)  # tokens before this are already emitted (or prompt)
        self._prefix_offset = max(len(context) - INITIAL_DETOKENIZATION_OFFSET, 0)
        self._chunks: list[str] = []  # emitted deltas, joined lazily by `text`
        self.num_tokens = 0  # output ids appended so far, special and out-of-vocabulary included

    def _to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        kept = [t for t in token_ids if 0 <= t < self._vocab_len and t not in self._skipped_ids]
        if not kept:
            return []
        tokens = self._tokenizer.convert_ids_to_tokens(kept)
        # Slow tokenizers may return None for ids they do not know: treat them as empty.
        return [t if t is not None else "" for t in tokens]

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the deltas)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def num_pending_tokens(self) -> int:
        """Tokens decoded but held back (an incomplete character at the end)."""
        return len(self._tokens) - self._read_offset

    def append(self, token_ids: Sequence[int]) -> str:
        """Add this step's output ids; return the complete text they add ("" while held back)."""
        self.num_tokens += len(token_ids)
        self._tokens.extend(self._to_tokens(token_ids))
        return self._emit(final=False)

    def flush(self) -> str:
        """At finish: emit what is held back. An incomplete character at the very end shows as
        U+FFFD, as `tokenizer.decode` of the same ids would show it."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._tokens):
            return ""
        window = self._tokens[self._prefix_offset :]
        num_prefix = self._read_offset - self._prefix_offset
        prefix_text = self._tokenizer.convert_tokens_to_string(window[:num_prefix]) if num_prefix else ""
        new_text = self._tokenizer.convert_tokens_to_string(window)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            if final:  # nothing printable came of the pending tokens
                self._read_offset = len(self._tokens)
            return ""
        delta = new_text[len(prefix_text) :]
        # The emitted tokens become the next call's prefix context; older ones are dropped.
        del self._tokens[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._chunks.append(delta)
        return delta
