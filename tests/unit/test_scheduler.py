"""Scheduler driven by the fake runner of conftest.py: continuous and static batching, the token
budget and chunked prefill, preemption by recompute, priority, stops, aborts and prefix hits,
and batches in flight (pipeline parallelism: several schedule() calls before their results).
Every scenario ends with no leaked KV block."""

from collections import deque
from dataclasses import replace

import pytest
from shardserve.workers.request import FinishReason, RequestStatus
from shardserve.workers.scheduler.scheduler import KV_CACHE_FULL, Scheduler
from shardserve.workers.step_types import ModelRunnerOutput

EOS = 999  # the fake model (conftest.py) never samples ids >= 997 itself


def rows(output):
    return {row.request_id: row for row in output.scheduled}


def new_ids(output):
    return [new.request_id for new in output.new_requests]


def prompt(start, length):
    return list(range(start, start + length))


def test_continuous_batching_admits_while_others_decode(make_harness, make_request, reference_output):
    harness = make_harness()
    a = make_request("a", prompt(10, 6), max_tokens=6)
    harness.add(a)
    first, _ = harness.step()
    assert new_ids(first) == ["a"] and rows(first)["a"].num_tokens == 6 and rows(first)["a"].sample
    harness.step()
    b = make_request("b", prompt(50, 5), max_tokens=3)
    harness.add(b)
    mixed, updated = harness.step()
    assert new_ids(mixed) == ["b"]
    assert [row.request_id for row in mixed.scheduled] == ["a", "b"]  # the decode row first
    assert rows(mixed)["a"].num_tokens == 1 and rows(mixed)["b"].num_tokens == 5
    assert {request.request_id for request in updated} == {"a", "b"}
    assert a.metrics.first_scheduled_time is not None and b.metrics.first_token_time is not None
    harness.run()
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 6)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 3)
    assert a.finish_reason is FinishReason.LENGTH and a.metrics.num_generation_tokens == 6
    harness.assert_no_leak()


def test_chunked_prefill_respects_budget_and_mixes_with_decodes(make_harness, make_request, reference_output):
    harness = make_harness(max_num_batched_tokens=8)
    a = make_request("a", prompt(1, 4), max_tokens=6)
    harness.add(a)
    harness.step()
    b = make_request("b", prompt(100, 20), max_tokens=2)
    harness.add(b)
    chunks = []
    while b.num_output_tokens == 0:
        output, _ = harness.step()
        assert rows(output)["a"].num_tokens == 1  # a keeps decoding every step
        assert output.num_batched_tokens == 1 + rows(output)["b"].num_tokens
        chunks.append(
            (rows(output)["b"].start_position, rows(output)["b"].num_tokens, rows(output)["b"].sample)
        )
    assert chunks == [(0, 7, False), (7, 7, False), (14, 6, True)]
    harness.run()
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 2)
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 6)
    harness.assert_no_leak()


def test_chunking_disabled_schedules_prompts_whole_or_waits(make_harness, make_request, reference_output):
    harness = make_harness(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8"):
        harness.add(make_request("too-long", prompt(0, 9)))
    a = make_request("a", prompt(1, 6), max_tokens=3)
    harness.add(a)
    harness.step()
    b = make_request("b", prompt(40, 8), max_tokens=2)
    c = make_request("c", prompt(60, 5), max_tokens=2)
    harness.add(b, c)
    # a's decode takes 1 of 8 tokens, so b (8) cannot go whole, and c may not overtake it.
    while a.num_output_tokens < 3:
        output, _ = harness.step()
        assert [row.request_id for row in output.scheduled] == ["a"]
    output, _ = harness.step()
    assert rows(output)["b"].num_tokens == 8 and rows(output)["b"].start_position == 0
    assert "c" not in rows(output)  # 8 + 5 > 8
    harness.run()
    assert all(row.num_tokens in (1, 5, 6, 8) for output in harness.outputs for row in output.scheduled)
    assert c.output_token_ids == reference_output(c.prompt_token_ids, 2)
    harness.assert_no_leak()


def test_max_num_seqs_limits_running_requests(make_harness, make_request, reference_output):
    harness = make_harness(max_num_seqs=2)
    requests = [make_request(f"r{i}", prompt(10 * i, 3), max_tokens=2 + i) for i in range(4)]
    harness.add(*requests)
    first, _ = harness.step()
    assert new_ids(first) == ["r0", "r1"]
    assert harness.scheduler.num_running == 2 and harness.scheduler.num_waiting == 2
    second, _ = harness.step()  # r0 finished after 2 tokens at the end of this step
    assert new_ids(second) == [] and requests[0].is_finished
    third, _ = harness.step()
    assert new_ids(third) == ["r2"] and third.finished_request_ids == ("r0",)
    harness.run()
    for i, request in enumerate(requests):
        assert request.output_token_ids == reference_output(request.prompt_token_ids, 2 + i)
    harness.assert_no_leak()


def test_min_admit_batch_admits_waiting_requests_in_bursts(make_harness, make_request, reference_output):
    harness = make_harness(max_num_seqs=4, min_admit_batch=2)
    # r0 finishes first, r1 one step later: r4 and r5 may only join once both slots are free.
    requests = [make_request(f"r{i}", prompt(10 * i, 3), max_tokens=[2, 3, 9, 9, 4, 4][i]) for i in range(6)]
    harness.add(*requests)
    first, _ = harness.step()
    assert new_ids(first) == ["r0", "r1", "r2", "r3"]
    admitted_at = {}
    step = 1
    while harness.scheduler.has_unfinished():
        output, _ = harness.step()
        step += 1
        for request_id in new_ids(output):
            admitted_at[request_id] = step
    assert requests[1].metrics.first_token_time is not None
    assert admitted_at["r4"] == admitted_at["r5"], admitted_at  # one burst, not one at a time
    for request in requests:
        assert request.output_token_ids == reference_output(request.prompt_token_ids, request.sampling_params.max_tokens)
    harness.assert_no_leak()


def test_min_admit_batch_never_starves_a_lone_waiter(make_harness, make_request, reference_output):
    harness = make_harness(max_num_seqs=4, min_admit_batch=3)
    long = make_request("long", prompt(1, 3), max_tokens=12)
    short = make_request("short", prompt(20, 3), max_tokens=2)
    harness.add(long)
    harness.step()
    harness.add(short)  # 3 slots are free and only one request waits: it joins at once
    output, _ = harness.step()
    assert new_ids(output) == ["short"]
    harness.run()
    assert short.output_token_ids == reference_output(short.prompt_token_ids, 2)
    harness.assert_no_leak()


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preemption_by_recompute_resumes_with_same_tokens(
    make_harness, make_request, reference_output, enable_prefix_caching
):
    # 5 usable blocks of 4 tokens; each request grows to 16 tokens = 4 blocks.
    harness = make_harness(num_blocks=6, enable_prefix_caching=enable_prefix_caching)
    a = make_request("a", prompt(1, 8), max_tokens=8)
    b = make_request("b", prompt(30, 8), max_tokens=8)
    harness.add(a, b)
    harness.step()  # both prefill: 4 blocks used, both sampled a 9th token
    output, _ = harness.step()  # a takes the last block; b cannot grow and is the last admitted
    assert output.preempted_request_ids == ("b",)
    assert list(rows(output)) == ["a"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_output_tokens == 1 and harness.scheduler.num_waiting == 1
    harness.run()
    resumed = [new for out in harness.outputs for new in out.new_requests if new.request_id == "b"][-1]
    assert resumed.output_token_ids == (reference_output(b.prompt_token_ids, 1)[0],)
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 8)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 8)
    assert b.metrics.num_preemptions == 1 and a.metrics.num_preemptions == 0
    assert harness.scheduler.num_preemptions == 1 and harness.scheduler.stats().num_preemptions == 1
    harness.assert_no_leak()


def test_lone_request_that_outgrows_the_pool_finishes_kv_cache_full(
    make_harness, make_request, reference_output
):
    harness = make_harness(num_blocks=4)  # 3 usable blocks = 12 tokens
    with pytest.raises(ValueError, match="needs 4 KV blocks; the pool has 3"):
        harness.add(make_request("huge", prompt(0, 13)))
    a = make_request("a", prompt(1, 8), max_tokens=10)
    harness.add(a)
    finished = []
    for _ in range(20):  # bounded: a request that keeps preempting itself would loop forever
        _, updated = harness.step()
        finished += [request for request in updated if request.is_finished]
        if not harness.scheduler.has_unfinished():
            break
    assert finished == [a]
    assert a.finish_reason is FinishReason.LENGTH and a.stop_reason == KV_CACHE_FULL
    # Tokens 9..12 fit the 12 slots; the 13th needs a 4th block.
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 5)
    assert harness.outputs[-1].finished_request_ids == ("a",)
    harness.assert_no_leak()


def test_priority_policy_admits_by_priority_then_arrival(make_harness, make_request):
    harness = make_harness(max_num_seqs=1, policy="priority")
    requests = [
        make_request("low", prompt(1, 3), max_tokens=1, priority=5),
        make_request("high-late", prompt(2, 3), max_tokens=1, priority=0),
        make_request("mid", prompt(3, 3), max_tokens=1, priority=1),
        make_request("high-early", prompt(4, 3), max_tokens=1, priority=0, arrival_time=0.5),
    ]
    harness.add(*requests)
    harness.run()
    admitted = [request_id for output in harness.outputs for request_id in new_ids(output)]
    assert admitted == ["high-early", "high-late", "mid", "low"]
    harness.assert_no_leak()


@pytest.mark.parametrize(("policy", "victim", "survivor"), [("fcfs", "b", "a"), ("priority", "a", "b")])
def test_preemption_victim_choice(make_harness, make_request, reference_output, policy, victim, survivor):
    harness = make_harness(num_blocks=4, policy=policy)  # 3 usable blocks
    a = make_request("a", prompt(1, 5), max_tokens=4, priority=5)
    harness.add(a)
    harness.step()  # a: 5 prompt tokens in 2 blocks
    b = make_request("b", prompt(20, 4), max_tokens=3, priority=0)
    harness.add(b)
    harness.step()  # a decodes, b admitted into the last block
    output, _ = harness.step()  # b's 5th token needs a block: none is free
    # fcfs evicts the last admitted (b itself); priority the largest priority value (a, which
    # was already scheduled this step and gives its token back to the budget).
    assert output.preempted_request_ids == (victim,)
    assert list(rows(output)) == [survivor] and output.num_batched_tokens == 1
    harness.run()
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 4)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 3)
    harness.assert_no_leak()


def test_priority_victim_scheduled_earlier_gives_back_its_tokens(
    make_harness, make_request, reference_output
):
    harness = make_harness(num_blocks=5, policy="priority")  # 4 usable blocks
    a = make_request("a", prompt(1, 5), max_tokens=6, priority=5)
    harness.add(a)
    harness.step()
    b = make_request("b", prompt(20, 4), max_tokens=3, priority=0)
    c = make_request("c", prompt(40, 3), max_tokens=3, priority=1)
    harness.add(b, c)
    harness.step()  # a decodes; b and c take the last two blocks
    # Two tokens per step from now on (the config is frozen; the scheduler reads it every step).
    harness.scheduler.config = replace(harness.scheduler.config, max_num_batched_tokens=2)
    output, _ = harness.step()
    # a is scheduled first, then b cannot grow: a is the victim and returns its token, so c
    # still fits the 2-token budget.
    assert output.preempted_request_ids == ("a",)
    assert sorted(rows(output)) == ["b", "c"] and output.num_batched_tokens == 2
    harness.run()
    for request, num_tokens in ((a, 6), (b, 3), (c, 3)):
        assert request.output_token_ids == reference_output(request.prompt_token_ids, num_tokens)
    harness.assert_no_leak()


def test_static_mode_admits_nothing_until_batch_done(make_harness, make_request, reference_output):
    harness = make_harness(max_num_seqs=2, max_num_batched_tokens=6, mode="static")
    a = make_request("a", prompt(1, 5), max_tokens=2)
    b = make_request("b", prompt(20, 5), max_tokens=6)
    c = make_request("c", prompt(40, 3), max_tokens=2)
    harness.add(a, b, c)
    first, _ = harness.step()
    # The batch is a and b; b's prefill spills into the next step under the 6-token budget.
    assert new_ids(first) == ["a", "b"] and rows(first)["b"].num_tokens == 1
    d = make_request("d", prompt(60, 3), max_tokens=2)
    harness.add(d)
    while not b.is_finished:
        output, _ = harness.step()
        assert not {"c", "d"} & set(rows(output))  # even after a finished, nobody joins
    assert a.is_finished
    output, _ = harness.step()
    assert new_ids(output) == ["c", "d"]
    harness.run()
    for request, num_tokens in ((a, 2), (b, 6), (c, 2), (d, 2)):
        assert request.output_token_ids == reference_output(request.prompt_token_ids, num_tokens)
    harness.assert_no_leak()


@pytest.mark.parametrize(
    ("params", "script", "expected_output", "reason", "stop_reason"),
    [
        ({}, [5, EOS, 7], [5, EOS], FinishReason.STOP, None),
        ({"ignore_eos": True, "max_tokens": 3}, [5, EOS, 7], [5, EOS, 7], FinishReason.LENGTH, None),
        ({"stop_token_ids": (7,)}, [5, 7, 8], [5, 7], FinishReason.STOP, 7),
        ({"min_tokens": 3, "stop_token_ids": (7,)}, [EOS, 7, EOS, 9], [EOS, 7, EOS], FinishReason.STOP, None),
        ({"max_tokens": 3}, [], None, FinishReason.LENGTH, None),
    ],
)
def test_token_level_stops(
    make_harness, make_request, reference_output, params, script, expected_output, reason, stop_reason
):
    params = {"max_tokens": 10, **params}
    harness = make_harness(script={"r": script})
    request = make_request("r", prompt(1, 5), eos_token_id=EOS, **params)
    harness.add(request)
    harness.run()
    expected = (
        expected_output if expected_output is not None else reference_output(request.prompt_token_ids, 3)
    )
    assert request.output_token_ids == expected
    assert request.finish_reason is reason and request.stop_reason == stop_reason
    harness.assert_no_leak()


def test_max_model_len_stops_and_bounds_prompt(make_harness, make_request):
    harness = make_harness(max_model_len=10)
    with pytest.raises(ValueError, match=r"prompt length must be in \[1, max_model_len=10\], got 11"):
        harness.add(make_request("long", prompt(0, 11)))
    with pytest.raises(ValueError, match="got 0"):
        harness.add(make_request("empty", []))
    request = make_request("r", prompt(1, 8), max_tokens=16)
    harness.add(request)
    with pytest.raises(ValueError, match="already in the scheduler"):
        harness.add(make_request("r", prompt(1, 8)))
    harness.run()
    assert request.num_tokens == 10 and request.finish_reason is FinishReason.LENGTH
    harness.assert_no_leak()


def test_abort_waiting_running_and_in_flight_requests(make_harness, make_request):
    harness = make_harness(max_num_seqs=2, max_num_batched_tokens=8)
    running = make_request("running", prompt(1, 4), max_tokens=20)
    prefilling = make_request("prefilling", prompt(30, 20), max_tokens=20)
    waiting = make_request("waiting", prompt(60, 4), max_tokens=20)
    harness.add(running, prefilling, waiting)
    harness.step()
    assert prefilling.num_computed_tokens == 4 and harness.kv.get_block_ids("prefilling")
    harness.scheduler.abort_requests(["waiting", "prefilling", "unknown"])
    harness.scheduler.abort_requests(["waiting"])  # idempotent
    assert waiting.finish_reason is FinishReason.ABORT and prefilling.status is RequestStatus.FINISHED
    output, _ = harness.step()
    assert output.finished_request_ids == ("prefilling",)  # the runner never saw "waiting"
    # Abort between schedule() and update_from_output(): the step's result is dropped.
    in_flight = harness.scheduler.schedule()
    harness.scheduler.finish_request("running", FinishReason.STOP, stop_reason="</s>")
    assert harness.scheduler.update_from_output(in_flight, harness.runner.execute(in_flight)) == []
    assert running.stop_reason == "</s>" and running.finish_reason is FinishReason.STOP
    assert harness.scheduler.schedule().finished_request_ids == ("running",)
    harness.assert_no_leak()


def test_missing_sampled_token_is_reported(make_harness, make_request):
    harness = make_harness()
    harness.add(make_request("r", prompt(1, 3)))
    output = harness.scheduler.schedule()
    with pytest.raises(RuntimeError, match="no sampled token for request 'r'"):
        harness.scheduler.update_from_output(output, ModelRunnerOutput())


def test_prefix_cache_hits_across_sequential_requests(make_harness, make_request, reference_output):
    harness = make_harness(block_size=4)
    system = prompt(200, 16)
    requests = [make_request(f"r{i}", system + prompt(10 * i, 3), max_tokens=3) for i in range(3)]
    for request in requests:
        harness.add(request)
        harness.run()
    for request in requests:
        assert request.output_token_ids == reference_output(request.prompt_token_ids, 3)
    starts = [row.start_position for out in harness.outputs for row in out.scheduled if row.num_tokens > 1]
    assert starts == [0, 16, 16]  # later requests compute only their own suffix
    assert [request.num_cached_tokens for request in requests] == [0, 16, 16]
    assert requests[2].metrics.num_cached_prompt_tokens == 16
    # 3 lookups of 19 tokens each, 2 x 16 hit.
    assert harness.scheduler.stats().prefix_cache_hit_rate == pytest.approx(32 / 57)
    harness.assert_no_leak()


def test_same_prompt_samples_share_blocks(make_harness, make_request, reference_output):
    harness = make_harness(block_size=4)
    first = make_request("s0", prompt(1, 9), max_tokens=4)
    harness.add(first)
    harness.step()
    second = make_request("s1", prompt(1, 9), max_tokens=4)
    harness.add(second)
    harness.step()
    shared = harness.kv.get_block_ids("s0")[:2]
    assert harness.kv.get_block_ids("s1")[:2] == shared
    assert [harness.kv.pool.blocks[block_id].ref_cnt for block_id in shared] == [2, 2]
    assert 0 < harness.scheduler.stats().kv_cache_usage < 1
    harness.run()
    assert first.output_token_ids == second.output_token_ids == reference_output(first.prompt_token_ids, 4)
    harness.assert_no_leak()


# ---- batches in flight (pipeline parallelism) ---------------------------------------------------


def pipelined(harness, depth=2):
    """The harness with a scheduler that allows `depth` batches in flight (before any request)."""
    old = harness.scheduler
    harness.scheduler = Scheduler(old.config, old.cache_config, old.kv, old.max_model_len, max_batches_in_flight=depth)
    return harness


def run_pipelined(harness, depth=2, max_steps=1000):
    """The engine's batch queue: schedule and run batches until `depth` are in flight (or nothing
    more can be scheduled), then apply the oldest. The fake runner runs each batch when it is
    submitted, in order, like the ranks. Returns the sizes of the batches submitted."""
    scheduler, runner = harness.scheduler, harness.runner
    in_flight = deque()
    sizes = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished() and not in_flight:
            return sizes
        while len(in_flight) < depth:
            busy = {row.request_id for output, _ in in_flight for row in output.scheduled}
            output = scheduler.schedule()
            assert not busy & set(rows(output)), "a request was scheduled twice while in flight"
            assert not busy & set(output.preempted_request_ids), "an in-flight request was preempted"
            result = runner.execute(output)  # also hands the runner its drops
            if output.is_empty:
                scheduler.update_from_output(output, result)
                break
            in_flight.append((output, result))
            sizes.append(len(output.scheduled))
            harness.outputs.append(output)
        if in_flight:
            scheduler.update_from_output(*in_flight.popleft())
    raise AssertionError(f"requests still unfinished after {max_steps} steps: {scheduler.requests}")


def test_in_flight_requests_are_skipped_and_batches_split_evenly(make_harness, make_request, reference_output):
    harness = pipelined(make_harness())
    requests = [make_request(f"r{i}", prompt(10 * i, 3 + i), max_tokens=6) for i in range(4)]
    harness.add(*requests)
    scheduler = harness.scheduler
    first = scheduler.schedule()  # 4 waiting, 2 batches in flight at most: 2 per batch
    assert list(rows(first)) == ["r0", "r1"] and all(r in scheduler.in_flight for r in ("r0", "r1"))
    second = scheduler.schedule()
    assert list(rows(second)) == ["r2", "r3"] and len(scheduler.in_flight) == 4
    assert scheduler.schedule().is_empty  # everything is in flight
    scheduler.update_from_output(first, harness.runner.execute(first))
    scheduler.update_from_output(second, harness.runner.execute(second))
    assert len(scheduler.in_flight) == 0
    third = scheduler.schedule()  # 4 running decodes: 2 per batch, in admission order
    assert list(rows(third)) == ["r0", "r1"] and all(row.num_tokens == 1 for row in third.scheduled)
    assert list(rows(scheduler.schedule())) == ["r2", "r3"]


def test_pipelined_run_gives_undisturbed_tokens(make_harness, make_request, reference_output):
    harness = pipelined(make_harness(max_num_batched_tokens=8))
    requests = [make_request(f"r{i}", prompt(7 * i, n), max_tokens=5) for i, n in enumerate((3, 20, 5, 9, 2))]
    harness.add(*requests)
    sizes = run_pipelined(harness)
    for request in requests:
        assert request.output_token_ids == reference_output(request.prompt_token_ids, 5)
    # 5 requests, 2 batches in flight: no batch ever holds more than 3.
    assert max(sizes) <= 3
    harness.assert_no_leak()


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_pipelined_preemption_never_picks_an_in_flight_request(make_harness, make_request, reference_output, policy):
    # 7 usable blocks of 4 tokens; 4 requests that grow to 16 tokens (4 blocks) each.
    harness = pipelined(make_harness(num_blocks=8, policy=policy))
    requests = [make_request(f"r{i}", prompt(20 * i, 6), max_tokens=10, priority=i % 2) for i in range(4)]
    harness.add(*requests)
    run_pipelined(harness)  # asserts no in-flight request is ever preempted
    assert harness.scheduler.num_preemptions > 0
    for request in requests:
        assert request.output_token_ids == reference_output(request.prompt_token_ids, 10)
    harness.assert_no_leak()


def test_abort_in_flight_frees_blocks_when_its_batch_returns(make_harness, make_request, reference_output):
    harness = pipelined(make_harness())
    a = make_request("a", prompt(1, 6), max_tokens=10)
    b = make_request("b", prompt(40, 5), max_tokens=4)
    harness.add(a, b)
    scheduler, runner, kv = harness.scheduler, harness.runner, harness.kv
    batch_a = scheduler.schedule()
    batch_b = scheduler.schedule()
    assert list(rows(batch_a)) == ["a"] and list(rows(batch_b)) == ["b"]
    result_a = runner.execute(batch_a)
    scheduler.abort_requests(["a"])
    assert a.status is RequestStatus.FINISHED and a.finish_reason is FinishReason.ABORT
    assert kv.get_block_ids("a"), "blocks of an in-flight request were freed before its batch returned"
    # A new request with the same id waits until the old one's blocks are free.
    again = make_request("a", prompt(80, 3), max_tokens=3)
    harness.add(again)
    blocked = scheduler.schedule()
    assert blocked.is_empty and blocked.finished_request_ids == ("a",)
    runner.execute(blocked)
    free_before = kv.num_free_blocks
    assert scheduler.update_from_output(batch_a, result_a) == []  # the aborted result is dropped
    assert not kv.get_block_ids("a") and kv.num_free_blocks == free_before + 2
    scheduler.update_from_output(batch_b, runner.execute(batch_b))
    run_pipelined(harness)
    assert again.output_token_ids == reference_output(again.prompt_token_ids, 3)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 4)
    harness.assert_no_leak()
