"""Speculative decoding in the real engine (embedded SmolLM2 on CPU): lossless, honoured, refused.

Greedy outputs with the n-gram proposer must equal the plain engine's token for token — alone,
with async scheduling on and off, beside requests that cannot speculate (penalties, logprobs, a
seed), under chunked prefill, preemption and prefix-cache hits — and the drafts must really have
been accepted (or the test proves nothing). Sampled outputs keep the target's distribution: a
two-sample chi-square test on 400 samples of the tokens speculation produces. Bad settings are
refused at start-up with the field and its range.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from shardserve.workers.bench.spec_tasks import TASKS
from shardserve.workers.config import SpeculativeConfig
from shardserve.workers.llm import LLM
from shardserve.workers.request import SamplingParams

MAX_TOKENS = 40
NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def _chat(llm: LLM, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM("default")


@pytest.fixture(scope="module")
def prompts(plain: LLM) -> list[str]:
    return [_chat(plain, text) for text in TASKS.values()]


@pytest.fixture(scope="module")
def want(plain: LLM, prompts: list[str]) -> list[tuple[int, ...]]:
    outs = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].token_ids for o in outs]


def _tokens(llm: LLM, prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list[tuple[int, ...]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def spec() -> LLM:
    """The n-gram engine with the defaults (async scheduling on), shared by the tests below."""
    return LLM("default", speculative=NGRAM)


def _assert_accepted(llm: LLM, before: int = 0) -> None:
    stats = llm.engine.stats().spec_decode
    assert stats.num_accepted_tokens - before > 10 and stats.num_spec_steps > 0, stats
    assert sum(stats.accepted_per_position) == stats.num_accepted_tokens


def test_ngram_greedy_equals_plain(spec, prompts, want) -> None:
    assert _tokens(spec, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS)) == want
    _assert_accepted(spec)
    assert spec.engine.stats().spec_decode.mean_accepted_length > 1.5


def test_ngram_greedy_equals_plain_synchronous(prompts, want) -> None:
    llm = LLM("default", speculative=NGRAM, async_scheduling=False)
    assert _tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS)) == want
    _assert_accepted(llm)


def _run_recording_logits(llm: LLM, prompt: str, as_decode: bool) -> tuple[tuple[int, ...], list[torch.Tensor], int]:
    """(greedy tokens, the logits of every step, verify steps run as decode rows) of one request,
    with the runner's verify-as-decode path on or off."""
    runner, model = llm.engine.runner, llm.engine.runner.model
    runner.set_verify_as_decode(as_decode)
    before = runner.step_times.verify_decode_steps
    logits: list[torch.Tensor] = []
    compute = model.compute_logits
    model.compute_logits = lambda hidden: logits.append(compute(hidden).float().clone()) or logits[-1]
    try:
        tokens = _tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=24))[0]
    finally:
        del model.compute_logits
        runner.set_verify_as_decode(True)
    return tokens, logits, runner.step_times.verify_decode_steps - before


def test_verify_steps_run_as_decode_rows_with_the_mixed_paths_logits(spec, prompts, want) -> None:
    """Batch 1: a verify step (last token + drafts) runs as one decode query per token (verify_decode.py);
    its tokens and every step's logits equal the mixed path's (the same step run as one extend query)."""
    tokens, logits, num_decode = _run_recording_logits(spec, prompts[0], as_decode=True)
    mixed_tokens, mixed_logits, mixed_decode = _run_recording_logits(spec, prompts[0], as_decode=False)
    assert tokens == mixed_tokens == want[0][:24]
    assert num_decode > 0 and mixed_decode == 0
    assert [t.shape for t in logits] == [t.shape for t in mixed_logits]
    assert any(t.shape[0] > 1 for t in logits), "no step verified drafts"
    for mine, theirs in zip(logits, mixed_logits, strict=True):
        torch.testing.assert_close(mine, theirs, atol=5e-4, rtol=1e-5)  # measured: 3e-5 at |logit| <= 32


def test_suffix_greedy_equals_plain_and_learns_across_requests(prompts, want) -> None:
    """The suffix proposer drafts from the request's own tokens and from earlier requests'
    outputs: the same tasks a second time accept more drafts than the first time."""
    llm = LLM("default", speculative={"method": "suffix", "num_speculative_tokens": 4})
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    assert _tokens(llm, prompts, greedy) == want
    first = llm.engine.stats().spec_decode.num_accepted_tokens
    assert _tokens(llm, prompts, greedy) == want
    second = llm.engine.stats().spec_decode.num_accepted_tokens - first
    assert second > first and second >= 0.5 * sum(len(w) for w in want), (first, second)


def test_requests_that_cannot_speculate_run_beside_ones_that_do(spec, plain, prompts, want) -> None:
    """A penalty, logprobs and a seed need per-token host state: those requests get no drafts,
    and share steps with requests that do; every output equals the plain engine's."""
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    others = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2),
              SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, seed=7)]
    batch = prompts + prompts
    before = spec.engine.stats().spec_decode.num_accepted_tokens
    got = spec.generate(batch, [greedy] * len(prompts) + others)
    expected = plain.generate(batch[len(prompts):], others)
    assert [o.outputs[0].token_ids for o in got[: len(prompts)]] == want
    for mine, theirs in zip(got[len(prompts):], expected, strict=True):
        assert mine.outputs[0].token_ids == theirs.outputs[0].token_ids
    assert got[len(prompts) + 1].outputs[0].logprobs is not None
    _assert_accepted(spec, before)


def test_requests_that_cannot_speculate_alone_keep_async_overlap(spec, plain, prompts) -> None:
    """Requests with logprobs or a seed alone keep two batches in flight (async scheduling), and
    their outputs equal the plain engine's; so does a speculating request with the n-gram proposer
    (its verify step overlaps the next, tests/spec/test_spec_overlap.py)."""
    others = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2),
              SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, seed=7)]
    spec.engine.batches.stats.max_in_flight = 0
    got = spec.generate(prompts[:2], others)
    assert spec.engine.batches.stats.max_in_flight == 2
    expected = plain.generate(prompts[:2], others)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.outputs[0].token_ids == theirs.outputs[0].token_ids
        assert mine.outputs[0].logprobs == theirs.outputs[0].logprobs
    spec.engine.batches.stats.max_in_flight = 0
    spec.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert spec.engine.batches.stats.max_in_flight == 2  # a host proposer's verify steps overlap too


def test_chunked_prefill_preemption_and_prefix_hits(prompts, want) -> None:
    """16-token prefill chunks, a KV pool too small for every request at once (preemption by
    recompute) and the same prompts twice (prefix-cache hits): still the plain engine's tokens."""
    llm = LLM("default", speculative=NGRAM, max_num_batched_tokens=16, num_blocks=24, block_size=16)
    got = _tokens(llm, prompts + prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert got == want + want
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the pool was meant to force preemption"
    assert stats.prefix_cache_hit_rate > 0
    assert stats.spec_decode.num_accepted_tokens > 0


def test_stops_inside_accepted_drafts(spec, plain, prompts) -> None:
    """max_tokens, a stop token and a stop string that fall inside a run of accepted drafts end the
    output exactly where the plain engine's ends."""
    lengths = [SamplingParams(temperature=0, max_tokens=n) for n in (1, 2, 3, 5, 9) for _ in prompts]
    batch = [p for _ in range(5) for p in prompts]
    assert _tokens(spec, batch, lengths) == _tokens(plain, batch, lengths)
    full = plain.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0].outputs[0]
    stop_id = full.token_ids[12]  # a token that speculation reaches inside a draft
    text = full.text
    stop_string = text[len(text) // 2 : len(text) // 2 + 4]  # ends inside the output, likely inside a draft
    stops = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_id]),
             SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop_string])]
    mine = [o.outputs[0] for o in spec.generate(prompts[:1] * 2, stops)]
    theirs = [o.outputs[0] for o in plain.generate(prompts[:1] * 2, stops)]
    assert mine[0].token_ids == theirs[0].token_ids and mine[0].token_ids[-1] == stop_id
    assert (mine[1].text, mine[1].token_ids, mine[1].stop_reason) == \
        (theirs[1].text, theirs[1].token_ids, theirs[1].stop_reason)


def _two_sample_chi2_p(a: Counter, b: Counter) -> float:
    """p-value of a chi-square test that two samples come from one distribution (rare bins pooled)."""
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
    rare = (sum(a.values()) - sum(a[k] for k in keys), sum(b.values()) - sum(b[k] for k in keys))
    table = [[a[k] for k in keys], [b[k] for k in keys]]
    if min(rare) > 0:
        table[0].append(rare[0])
        table[1].append(rare[1])
    if len(table[0]) < 2:  # one outcome only: the same distribution iff both samples have it
        return 1.0 if set(a) == set(b) else 0.0
    counts = torch.tensor(table, dtype=torch.float64)  # [2, bins]
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    df = counts.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


def test_sampled_outputs_keep_the_target_distribution(plain) -> None:
    """400 samples at temperature 1 from a prompt where drafts are accepted often: the tokens at
    output positions 2-4 (where speculation acts) are distributed as the plain engine's (seeded
    engines: the test is deterministic, and fails if the distribution moves)."""
    prompt = "1 2 3 4 5 6 7 8 1 2 3 4 5 6 7 8 1 2 3 4 5 6 7 8 1 2 3 4"
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=4, n=400)
    llm = LLM("default", speculative=NGRAM | {"max_verify_tokens": 4096}, max_num_seqs=400, seed=1)
    got = llm.generate([prompt], params)[0].outputs
    base = plain.generate([prompt], params)[0].outputs
    stats = llm.engine.stats().spec_decode
    assert stats.num_draft_tokens > 200 and stats.acceptance_rate > 0.2, stats
    for position in (1, 2, 3):
        a = Counter(o.token_ids[position] for o in got if len(o.token_ids) > position)
        b = Counter(o.token_ids[position] for o in base if len(o.token_ids) > position)
        assert _two_sample_chi2_p(a, b) > 1e-3, (position, a.most_common(5), b.most_common(5))
    pairs_a = Counter(o.token_ids[1:3] for o in got)
    pairs_b = Counter(o.token_ids[1:3] for o in base)
    assert _two_sample_chi2_p(pairs_a, pairs_b) > 1e-3


def test_adaptive_switch_turns_speculation_off_for_large_batches(prompts) -> None:
    """max_verify_tokens 10 with k 4: speculation only while at most 2 requests run."""
    llm = LLM("default", speculative=NGRAM | {"max_verify_tokens": 10})
    scheduler = llm.engine.scheduler
    seen = []
    schedule = scheduler.schedule

    def spy():
        out = schedule()
        seen.append((len(scheduler.running), out.num_draft_tokens))
        return out

    scheduler.schedule = spy
    llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (8, 16, MAX_TOKENS)])
    assert all(drafts == 0 for running, drafts in seen if running > 2)
    assert any(drafts > 0 for running, drafts in seen if running <= 2)


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer in [1, 16], got 0"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens must be an integer in [1, 16], got 17"),
    ({"method": "draft"}, "speculative method `draft` requires draft_model"),
    ({"method": "medusa"}, "speculative_method must be null or one of ngram, suffix, draft, got 'medusa'"),
    ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "prompt_lookup_max must be >= prompt_lookup_min = 5"),
    ({"method": "ngram", "max_verify_tokens": 0}, "max_verify_tokens must be >= 1, got 0"),
    ({"methd": "ngram"}, "unknown speculative option 'methd'"),
])
def test_bad_settings_are_refused_with_the_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        LLM("default", speculative=options)
    assert message in str(info.value)


def test_pipeline_parallel_is_refused() -> None:
    from shardserve.workers.config import EngineConfig, ParallelConfig

    with pytest.raises(ValueError, match="speculative decoding requires pipeline_parallel_size == 1, got 2"):
        EngineConfig(parallel=ParallelConfig(pipeline_parallel_size=2),
                     speculative=SpeculativeConfig(speculative_method="ngram"))


def test_yaml_section_reaches_the_engine() -> None:
    from shardserve.cluster.config import ConfigError, ServeConfig, parse_config

    section = {"name": "m", "source": "default", "speculative": {"method": "ngram", "num_speculative_tokens": 3}}
    config = ServeConfig.model_validate({"models": [section]})
    spec = config.models[0].to_engine_config().speculative
    assert spec.speculative_method == "ngram" and spec.num_speculative_tokens == 3
    with pytest.raises(ConfigError, match=r"models\[0\]\.speculative"):
        parse_config({"models": [section | {"speculative": {"method": "ngram", "num_speculative_tokens": 99}}]})
    assert math.isfinite(spec.suffix_min_probability)


def test_serve_flags_override_every_models_section(tmp_path) -> None:
    """`shardserve serve config.yaml --speculative-method suffix --num-speculative-tokens 6`."""
    import argparse

    from shardserve.cluster.commands import serve
    from shardserve.cluster.commands.engine_flags import given_engine_flags
    from shardserve.cluster.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - {name: a, source: default}\n"
                    "  - {name: b, source: default, speculative: {method: ngram, prompt_lookup_max: 5}}\n")
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", str(path), "--speculative-method", "suffix", "--num-speculative-tokens", "6"])
    flags = given_engine_flags(args)
    assert flags == {"speculative_method": "suffix", "num_speculative_tokens": 6}
    config = load_config(path, speculative={"method": "suffix", "num_speculative_tokens": 6})
    a, b = (m.to_engine_config().speculative for m in config.models)
    assert (a.speculative_method, a.num_speculative_tokens) == ("suffix", 6)
    assert (b.speculative_method, b.num_speculative_tokens, b.prompt_lookup_max) == ("suffix", 6, 5)
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        load_config(path, speculative={"num_speculative_tokens": 0})


def test_bench_latency_prints_the_speedup_beside_the_plain_run(tmp_path) -> None:
    """`shardserve bench latency --speculative-method ngram`: both engines on the three tasks, the
    same outputs, acceptance from the engine's statistics; a bad k exits 2 naming the flag."""
    import json

    from shardserve.cluster.cli import main

    path = tmp_path / "spec.json"
    assert main(["bench", "latency", "--speculative-method", "ngram", "--output-len", "12", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert [t["task"] for t in result["tasks"]] == list(TASKS)
    assert all(t["identical"] and t["plain"] > 0 and t["speculative"] > 0 for t in result["tasks"])
    # CPU time per output token beside the wall clock (robust to other tenants), and its ratio
    assert all(t["cpu_ms_per_token_plain"] > 0 and t["cpu_ms_per_token_speculative"] > 0
               and t["cpu_speedup"] == t["cpu_ms_per_token_plain"] / t["cpu_ms_per_token_speculative"]
               for t in result["tasks"])
    assert result["spec_decode"]["num_draft_tokens"] >= result["spec_decode"]["num_accepted_tokens"] > 0
    assert main(["bench", "latency", "--speculative-method", "ngram", "--num-speculative-tokens", "0"]) == 2
