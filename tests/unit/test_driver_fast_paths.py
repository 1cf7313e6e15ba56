"""The driver's fast paths decide exactly what the general paths decide.

The KV cache manager grows a held block table in place and skips the general allocation path
(revived prefix hits, registration) for requests that already hold blocks; `get_block_ids`
and `cache_full_blocks` return early when nothing changed; the scheduler feeds a decode's one
token without slicing. `ReferenceKVCacheManager` and `_reference_fed_token_ids` below are the
general code those shortcuts replaced. Each workload runs twice, once with the shortcuts and
once with the references, through the engine's batch queue (InFlightBatches: synchronous,
pipeline micro-batches at D = 2 and 3, async scheduling), and every SchedulerOutput, every applied result and the
final pool must be the same. The workloads mix chunked prefills, decodes, prefix hits,
preemption and kv_cache_full (small pools), EOS / stop ids / max_tokens / max_model_len stops
and aborts (waiting, running and in flight).
The output processor's dirty-parent bookkeeping is checked against the order it replaced
(parents in the order they were added).
"""

from __future__ import annotations

import random

import pytest
from shardserve.workers.config import CacheConfig, SchedulerConfig
from shardserve.workers.engine import _are_ints
from shardserve.workers.inflight import InFlightBatches
from shardserve.workers.kv_cache.manager import NO_COMPUTED_BLOCKS, ComputedBlocks, KVCacheManager
from shardserve.workers.output_processor import OutputProcessor
from shardserve.workers.request import FinishReason, Request, SamplingParams
from shardserve.workers.scheduler.in_flight import PLACEHOLDER, InFlightRequests
from shardserve.workers.scheduler.scheduler import Scheduler
from shardserve.workers.step_types import ModelRunnerOutput

EOS = 999


class ReferenceKVCacheManager(KVCacheManager):
    """KVCacheManager with the general paths only (no in-place growth, no early returns)."""

    def get_block_ids(self, request_id: str, start: int = 0) -> tuple[int, ...]:
        return tuple(self._block_ids.get(request_id, ()))[start:]

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: ComputedBlocks = NO_COMPUTED_BLOCKS) -> bool:
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        request_id = request.request_id
        held = self._block_ids.get(request_id)
        if held is not None and computed.block_ids:
            raise ValueError(f"request {request_id!r} already holds blocks; computed blocks must be empty")
        held = held if held is not None else []
        num_tokens = request.num_computed_tokens + computed.num_computed_tokens + num_new_tokens
        num_new_blocks = max(0, self.num_blocks_for(num_tokens) - len(held) - len(computed.block_ids))
        num_revived = sum(1 for block_id in computed.block_ids if self.pool.blocks[block_id].ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        if request_id not in self._block_ids:
            self.pool.touch(computed.block_ids)
            self._num_registered[request_id] = len(computed.block_ids)
            if self.enable_prefix_caching:
                self._num_queried_tokens += request.num_tokens
                self._num_hit_tokens += computed.num_computed_tokens
        self._block_ids[request_id] = held + list(computed.block_ids) + self.pool.allocate(num_new_blocks)
        return True

    def cache_full_blocks(self, request: Request) -> int:
        request_id = request.request_id
        if not self.enable_prefix_caching or request_id not in self._block_ids:
            return 0
        block_ids = self._block_ids[request_id]
        num_full = min(request.num_computed_tokens // self.block_size, len(block_ids))
        num_registered = self._num_registered[request_id]
        if num_full <= num_registered:
            return 0
        hashes = self._full_block_hashes(request)
        for index in range(num_registered, num_full):
            self.pool.cache_block(block_ids[index], hashes[index])
        self._num_registered[request_id] = num_full
        return num_full - num_registered


def _reference_fed_token_ids(all_token_ids: list[int], start: int, num_new: int) -> tuple[int, ...]:
    token_ids = all_token_ids[start : start + num_new]
    if len(token_ids) < num_new:
        token_ids = token_ids + [PLACEHOLDER] * (num_new - len(token_ids))
    return tuple(token_ids)


def _sampled_token(request_id: str, seq_len: int) -> int:
    """The fake model: a fixed token per (request, position), EOS now and then."""
    value = (int(request_id[1:]) * 7919 + seq_len * 104729) % 1009
    return EOS if value < 12 else value % 997


def _events(seed: int, num_steps: int = 40) -> list[tuple[list[tuple], list[str]]]:
    """Per step: requests to add (id, prompt, params, priority) and ids to abort."""
    rng = random.Random(seed)
    shared = [rng.randrange(997) for _ in range(12)]
    events, added = [], []
    for _ in range(num_steps):
        adds = []
        for _ in range(rng.choice((0, 0, 1, 2, 3))):
            request_id = f"r{len(added)}"
            prompt = shared[: rng.choice((0, 4, 8, 12))] + [rng.randrange(997) for _ in range(rng.randint(1, 20))]
            max_tokens = rng.randint(1, 20)
            params = SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=rng.random() < 0.3,
                stop_token_ids=tuple(range(3, 997, 40)) if rng.random() < 0.2 else (), min_tokens=min(max_tokens, rng.choice((0, 0, 2))),
            )
            adds.append((request_id, prompt, params, rng.randint(0, 2)))
            added.append(request_id)
        aborts = [rng.choice(added)] if added and rng.random() < 0.15 else []
        events.append((adds, aborts))
    return events


class _Executor:
    """Runs each batch when it is submitted (like ranks, in order) and logs what it was sent."""

    def __init__(self, log: list) -> None:
        self.log = log

    def submit(self, sched):
        self.log.append(sched)
        return ModelRunnerOutput(sampled_token_ids={
            row.request_id: _sampled_token(row.request_id, row.seq_len) for row in sched.scheduled if row.sample})

    def collect(self, handle) -> ModelRunnerOutput:
        return handle  # the output itself


def _drive(kv: KVCacheManager, depth: int, async_scheduling: bool, policy: str, events, max_model_len: int = 40):
    """The engine's batch queue (InFlightBatches) over the scheduler; returns everything the run decided."""
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=24, policy=policy),
                          CacheConfig(block_size=4), kv, max_model_len,
                          max_batches_in_flight=depth, async_scheduling=async_scheduling)
    requests: dict[str, Request] = {}
    log: list = []
    batches = InFlightBatches(scheduler, _Executor(log), depth, async_scheduling)
    step = 0
    while step < len(events) or scheduler.has_unfinished() or batches:
        assert step < 2000, "the workload never drained"
        adds, aborts = events[step] if step < len(events) else ([], [])
        for request_id, prompt, params, priority in adds:
            request = Request(request_id, prompt, params, eos_token_id=EOS, arrival_time=float(step), priority=priority)
            requests[request_id] = request
            try:
                scheduler.add_request(request)
            except ValueError as error:
                log.append(("rejected", request_id, str(error)))
        batches.drop_later_results(aborts)
        scheduler.abort_requests(aborts)
        idle = batches.fill()
        if idle is not None:
            log.append(idle.sched)
            log.append([r.request_id for r in scheduler.update_from_output(idle.sched, idle.output)])
        done = batches.collect()
        if done is not None:
            advanced = scheduler.update_from_output(done.sched, done.output)
            log.append((batches.kept(done).request_ids, [r.request_id for r in advanced]))
            batches.drop_finished(advanced)
        step += 1
    finals = {rid: (r.output_token_ids, r.finish_reason, r.stop_reason, r.metrics.num_preemptions)
              for rid, r in requests.items()}
    return log, finals, kv.pool.free_block_ids(), scheduler.num_preemptions, kv.prefix_cache_stats


@pytest.mark.parametrize(("depth", "async_scheduling"), [(1, False), (2, False), (3, False), (2, True)])
@pytest.mark.parametrize(("policy", "num_blocks", "prefix_caching"),
                         [("fcfs", 12, True), ("priority", 10, True), ("fcfs", 64, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_paths_decide_like_the_general_paths(monkeypatch, depth, async_scheduling, policy, num_blocks,
                                                  prefix_caching, seed):
    events = _events(seed)
    fast = _drive(KVCacheManager(num_blocks, 4, prefix_caching), depth, async_scheduling, policy, events)
    monkeypatch.setattr(InFlightRequests, "fed_token_ids", staticmethod(_reference_fed_token_ids))
    general = _drive(ReferenceKVCacheManager(num_blocks, 4, prefix_caching), depth, async_scheduling, policy, events)
    assert fast == general
    log, finals, *_ = fast
    # The workload reaches the paths it is meant to cover.
    reasons = {reason for _, reason, _, _ in finals.values()}
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT}
    if num_blocks <= 12:
        assert fast[3] > 0, "no preemption: the pool is too large for this test"


def test_collect_reports_dirty_parents_in_the_order_they_were_added():
    processor = OutputProcessor(tokenizer=None)
    requests = {}
    for request_id, final_only in (("a", False), ("b", True), ("c", False), ("d", False)):
        params = SamplingParams(max_tokens=3, final_only=final_only)
        requests[request_id] = Request(request_id, [1, 2], params)
        processor.add(request_id, None, [1, 2], params, [requests[request_id]])
    assert not processor.has_pending()
    for request in (requests["d"], requests["b"], requests["a"]):  # advanced out of order
        request.append_output_token(7)
    processor.process(["d", "b", "a"], [requests["d"], requests["b"], requests["a"]], ModelRunnerOutput())
    assert processor.has_pending()
    # b is final_only and not finished: no snapshot; a before d, as added.
    assert [out.request_id for out in processor.collect()] == ["a", "d"]
    assert not processor.has_pending() and processor.collect() == []
    processor.abort("c")
    processor.abort("b")
    assert processor.has_pending()
    outputs = processor.collect()
    assert [(out.request_id, out.finished) for out in outputs] == [("b", True), ("c", True)]
    assert processor.num_finished == 2 and "b" not in processor and "a" in processor
    # A finished id can come back: it reports after the parents added before it.
    params = SamplingParams(max_tokens=3)
    again = Request("b", [3], params)
    processor.add("b", None, [3], params, [again])
    processor.abort("b")
    processor.abort("a")
    assert [out.request_id for out in processor.collect()] == ["a", "b"]


def test_prompt_id_check_and_sample_params_shortcuts():
    assert _are_ints([1, 2, 3]) and _are_ints(()) and _are_ints((0,))
    assert not _are_ints([1, True]) and not _are_ints([1.0]) and not _are_ints(["1"])
    params = SamplingParams(max_tokens=3, seed=5)
    assert params.for_sample(0) is params  # nothing to change
    assert params.for_sample(1) == SamplingParams(max_tokens=3, seed=6)
    several = SamplingParams(n=3, seed=5)
    assert [p.seed for p in (several.for_sample(i) for i in range(3))] == [5, 6, 7]
    assert all(p.n == 1 for p in (several.for_sample(i) for i in range(3)))
