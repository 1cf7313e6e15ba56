"""The overlapped verify step (issue 23): under async scheduling a host proposer's verify batch N is
not applied before N+1 is scheduled; N+1 feeds a PLACEHOLDER for N's bonus token plus drafts guessed
past it, and a rejection in N drops N+1's result for that request and rolls it back.

A tiny dummy Llama made to copy a cycle of ids (3 of them differ from the prompt's list, so n-gram
drafts are accepted and then rejected there in the first cycle) keeps it fast and gives both
outcomes. Greedy outputs (ids, finish reasons) must equal the plain synchronous engine's with
requests that finish inside accepted drafts (max_tokens, a stop id, a stop string), n = 2, chunked
prefill, prefix-cache hits, preemption and an abort while a request is scheduled ahead; every
run ends with no KV block held; the overlap itself and the roll-backs are observed, not assumed.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from shardserve.workers.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from shardserve.workers.engine import LLMEngine
from shardserve.workers.kv_cache.manager import KVCacheManager
from shardserve.workers.models.loader import load_model
from shardserve.workers.request import FinishReason, Request, SamplingParams
from shardserve.workers.scheduler.in_flight import PLACEHOLDER
from shardserve.workers.scheduler.scheduler import Scheduler
from shardserve.workers.spec.ngram import NgramProposer
from shardserve.workers.spec.speculator import Speculator
from shardserve.workers.step_types import ModelRunnerOutput

K = 4


@pytest.fixture(scope="module")
def copy_model():
    """(loaded tiny Llama that writes `cycle` (24 ids) over and over, prompts): each prompt repeats
    the cycle with 3 ids changed 3 times, so the first cycle written rejects drafts 3 times."""
    cpu = torch.device("cpu")
    loaded = load_model(ModelConfig(model="dummy:tiny-llama", device="cpu", dtype="float32"), cpu, torch.float32)
    tokenizer = load_model(ModelConfig(model="default", device="cpu"), cpu, torch.float32, weights=False).tokenizer
    loaded = replace(loaded, tokenizer=tokenizer)
    rng = random.Random(0)
    ids = rng.sample(range(3, loaded.hf_config.vocab_size), 30)
    cycle = ids[:24]
    with torch.no_grad():  # next token = f(input token): cycle[i] -> cycle[i + 1]
        for name, module in loaded.model.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module.weight.zero_()
        embedding = loaded.model.model.embed_tokens.weight
        head = embedding.detach().clone() * 0.1
        for i, token in enumerate(cycle):
            head[cycle[(i + 1) % len(cycle)]] = embedding[token]
        loaded.model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    lists = [list(cycle), list(cycle)]  # the prompts' lists: the cycle with 3 ids changed
    for i in range(3):
        lists[0][5 + 7 * i] = ids[24 + i]
        lists[1][2 + 7 * i] = ids[27 + i]
    prompts = [lists[0] * 3, lists[1][7:] + lists[1] * 2]
    return loaded, prompts, cycle


def _engine(loaded, spec: bool, async_scheduling: bool, num_blocks: int = 128, **scheduler: object) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(model="dummy:tiny-llama", device="cpu", dtype="float32"),
        cache=CacheConfig(num_blocks=num_blocks, block_size=16),
        scheduler=SchedulerConfig(async_scheduling=async_scheduling, **scheduler),
        speculative=SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=K) if spec
        else SpeculativeConfig(),
    )
    return LLMEngine(config, loaded=loaded)


class Trace:
    """The executor's submits and collects in order: a submit while a batch with drafts is still
    uncollected is an overlapped verify step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.in_flight: list[bool] = []  # per uncollected batch, oldest first: it has drafts
        self.overlapped = self.verify_batches = 0
        self.roll_backs = 0
        executor, in_flight = engine.executor, engine.scheduler.in_flight
        submit, collect, roll_back = executor.submit, executor.collect, in_flight.roll_back

        def traced_submit(sched):
            self.overlapped += any(self.in_flight)
            self.in_flight.append(sched.num_draft_tokens > 0)
            self.verify_batches += sched.num_draft_tokens > 0
            return submit(sched)

        def traced_collect(handle):
            self.in_flight.pop(0)
            return collect(handle)

        def traced_roll_back(request_id):
            self.roll_backs += in_flight.num_batches(request_id) > 0
            roll_back(request_id)

        executor.submit, executor.collect, in_flight.roll_back = traced_submit, traced_collect, traced_roll_back


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
         abort: str | None = None) -> dict[str, list[tuple[tuple[int, ...], FinishReason | None]]]:
    """Every request to the end: per id, (token ids, finish reason) of each completion. `abort`:
    aborted at the first step after which it has a verify batch in flight and a later batch ahead."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    results, aborted = {}, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = [(o.token_ids, o.finish_reason) for o in out.outputs]
            assert out.request_id != aborted or out.finished, "an aborted request streamed on"
        if abort is not None and abort not in results and engine.scheduler.in_flight.num_batches(abort) >= 2:
            engine.abort_request(abort)
            aborted, abort = abort, None
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.num_usable_blocks, "KV blocks leaked"
    return results


def _requests(prompts: list[list[int]], cycle: list[int]) -> dict[str, tuple[list[int], SamplingParams]]:
    greedy = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)
    return {
        "long": (prompts[0], greedy),
        "other": (prompts[1], replace(greedy, max_tokens=53)),
        # ends on an id the n-gram drafts carry (cycle[12], 2nd cycle): inside accepted drafts
        "stop_id": (prompts[0], replace(greedy, stop_token_ids=[cycle[12]], min_tokens=20)),
        "max_tokens": (prompts[1], replace(greedy, max_tokens=31)),  # mid-cycle: inside a verify step
        "n2": (prompts[0], replace(greedy, n=2, max_tokens=40)),
    }


@pytest.mark.parametrize("depth", [2, 3])
def test_overlapped_verify_equals_plain(copy_model, depth: int) -> None:
    loaded, prompts, cycle = copy_model
    requests = _requests(prompts, cycle)
    want = _run(_engine(loaded, spec=False, async_scheduling=False), requests)
    engine = _engine(loaded, spec=True, async_scheduling=True, async_depth=depth, max_num_batched_tokens=32)
    trace = Trace(engine)
    got = _run(engine, requests)
    assert got == want
    assert want["stop_id"][0][1] is FinishReason.STOP and len(want["stop_id"][0][0]) < 70
    assert want["max_tokens"][0][1] is FinishReason.LENGTH
    stats = engine.stats().spec_decode
    assert stats.num_accepted_tokens > 100 and stats.mean_accepted_length > 2, stats
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # some drafts were rejected ...
    assert trace.roll_backs > 3  # ... while a later batch held the request: rolled back
    assert trace.overlapped > 0.8 * trace.verify_batches, (trace.overlapped, trace.verify_batches)
    # prefix-cache hits on blocks written by overlapped steps: the same requests again
    before = engine.kv_manager.prefix_cache_stats.hit_rate
    assert _run(engine, {f"again-{k}": v for k, v in requests.items()}) == {f"again-{k}": v for k, v in want.items()}
    assert engine.kv_manager.prefix_cache_stats.hit_rate > before


def test_synchronous_speculation_and_draft_free_async_agree(copy_model) -> None:
    """The same requests with speculation under synchronous scheduling: equal outputs, no overlap."""
    loaded, prompts, cycle = copy_model
    requests = _requests(prompts, cycle)
    want = _run(_engine(loaded, spec=False, async_scheduling=True), requests)
    engine = _engine(loaded, spec=True, async_scheduling=False)
    trace = Trace(engine)
    assert _run(engine, requests) == want
    assert trace.overlapped == 0 and trace.verify_batches > 10


def test_stop_string_and_abort_while_ahead(copy_model) -> None:
    loaded, prompts, cycle = copy_model
    text = loaded.tokenizer.decode(cycle[8:10])
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    requests = {"victim": (prompts[0], greedy), "stays": (prompts[1], greedy),
                "stop_str": (prompts[0], replace(greedy, stop=[text]))}
    want = _run(_engine(loaded, spec=False, async_scheduling=False), requests, abort=None)
    engine = _engine(loaded, spec=True, async_scheduling=True, async_depth=3)  # 2 batches left in flight
    got = _run(engine, requests, abort="victim")
    assert got["victim"][0][1] is FinishReason.ABORT and len(got["victim"][0][0]) < 60
    assert got["victim"][0][0] == want["victim"][0][0][: len(got["victim"][0][0])]
    assert got["stays"] == want["stays"] and got["stop_str"] == want["stop_str"]
    assert want["stop_str"][0][1] is FinishReason.STOP


def test_preemption_with_overlapped_verify(copy_model) -> None:
    """A KV pool too small for every request at once: requests not in flight are preempted and
    recomputed; outputs still equal the plain engine's."""
    loaded, prompts, cycle = copy_model
    greedy = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    requests = {f"r{i}": (prompts[i % 2], greedy) for i in range(4)}
    want = _run(_engine(loaded, spec=False, async_scheduling=False, num_blocks=64), requests)
    engine = _engine(loaded, spec=True, async_scheduling=True, num_blocks=24)
    assert _run(engine, requests) == want
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().spec_decode.num_accepted_tokens > 50


def test_roll_back_accounting() -> None:
    """Scheduler level: N (1 + 2 drafts) in flight, N+1 feeds a PLACEHOLDER at the bonus position;
    N keeps 1 draft: N+1's share is void, r is scheduled again from its accepted length with its
    known token, and N+1's return is dropped (no token appended, its tokens not counted)."""
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_prefix_caching=True)
    speculator = Speculator(SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=2),
                            NgramProposer(1, 2), async_scheduling=True)
    scheduler = Scheduler(SchedulerConfig(async_scheduling=True), CacheConfig(block_size=4), kv, 64,
                          max_batches_in_flight=2, async_scheduling=True, speculator=speculator)
    request = Request("r", [5, 6, 7, 5, 6], SamplingParams(temperature=0, max_tokens=20), eos_token_id=None)
    scheduler.add_request(request)
    prefill = scheduler.schedule()
    scheduler.update_from_output(prefill, ModelRunnerOutput(sampled_token_ids={"r": 7}))  # tokens 5 6 7 5 6 7
    verify = scheduler.schedule()  # [7, 5, 6]: drafts from the n-gram "6 7" -> "5 6"
    (row,) = verify.scheduled
    assert row.token_ids == (7, 5, 6) and row.num_drafts == 2 and row.start_position == 5
    ahead = scheduler.schedule()  # r ahead: the bonus token's PLACEHOLDER at position 8 (+ guessed drafts)
    (ahead_row,) = ahead.scheduled
    assert ahead_row.token_ids[0] == PLACEHOLDER and ahead_row.start_position == 8
    # N keeps draft 5, rejects 6 (the target drew 9 there): r has 5 6 7 5 6 7 5 9, 7 computed
    advanced = scheduler.update_from_output(
        verify, ModelRunnerOutput(sampled_token_ids={"r": 9}, accepted_draft_ids={"r": (5,)}))
    assert advanced == [request] and request.all_token_ids[-2:] == [5, 9] and request.num_computed_tokens == 7
    assert scheduler.in_flight.take_rolled_back() == {"r": 1} and scheduler.in_flight.num_batches("r") == 0
    again = scheduler.schedule()  # from the accepted length, the known token, while N+1 is still in flight
    (again_row,) = again.scheduled
    assert again_row.start_position == 7 and again_row.token_ids[0] == 9
    assert scheduler.update_from_output(ahead, ModelRunnerOutput(sampled_token_ids={"r": 1})) == []  # dropped
    assert request.all_token_ids[-1] == 9 and request.num_computed_tokens == 7
    assert scheduler.in_flight.num_batches("r") == 1
    assert speculator.stats.num_drafts == 1 and speculator.stats.num_accepted_tokens == 1  # applied results only


def test_ngram_drafts_past_tokens_in_flight_continue_a_loop() -> None:
    """A match at distance p continues with period p past the context's end: a 2-token loop gets
    full drafts, also past 3 unknown tokens (which it guesses and skips)."""
    proposer = NgramProposer(1, 2)
    tokens = [9, 4, 7, 4, 7, 4, 7]
    assert proposer.propose("r", tokens, 1, 4) == [4, 7, 4, 7]
    assert proposer.propose("r", tokens, 1, 3, num_unknown=3) == [7, 4, 7]
    assert proposer.propose("s", [9, 4, 7, 1, 2], 1, 2) == []  # no earlier occurrence of 2 or 1 2
