"""Scheduler test harness: a fake model runner that stores token ids in paged 'KV blocks'.

Data flow: `Harness.step()` calls `schedule()`, hands the SchedulerOutput to `FakeRunner`, and
feeds its ModelRunnerOutput to `update_from_output()`. The fake runner keeps per-request state
the way the real one does (created from NewRequestData, dropped on finished/preempted ids),
writes each fed token into its block slot, reads the whole context back through the block
table, and samples `next_token(context)`. A wrong block table, a prefix hit on the wrong block
or a shared block overwritten by another request therefore shows up as a context mismatch,
and a resumed request produces exactly the tokens of an undisturbed run. After every step the
harness checks the scheduler's invariants (budget, max_num_seqs, reference counts).
"""

from __future__ import annotations

import pytest
from shardserve.workers.config import CacheConfig, SchedulerConfig
from shardserve.workers.kv_cache.block_pool import NULL_BLOCK_ID
from shardserve.workers.kv_cache.manager import KVCacheManager
from shardserve.workers.request import Request, SamplingParams
from shardserve.workers.scheduler.scheduler import Scheduler
from shardserve.workers.step_types import ModelRunnerOutput, SchedulerOutput

VOCAB_SIZE = 997  # sampled ids stay below 997, so ids >= 997 (tests use EOS = 999) only come from scripts


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context."""
    return (sum((index + 1) * token for index, token in enumerate(context)) + 7 * len(context)) % VOCAB_SIZE


def reference_output(prompt: list[int], num_tokens: int) -> list[int]:
    """Tokens an undisturbed greedy run of the fake model produces."""
    context = list(prompt)
    for _ in range(num_tokens):
        context.append(next_token(context))
    return context[len(prompt) :]


class FakeRunner:
    def __init__(self, block_size: int, num_blocks: int, script: dict[str, list[int]] | None = None) -> None:
        self.block_size = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.tokens: dict[str, list[int]] = {}  # request id -> prompt + outputs, as the runner knows them
        self.script = script or {}  # request id -> forced output tokens, in order
        self.num_prompt_tokens: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}  # request id -> its block table, rebuilt from the diffs

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in output.finished_request_ids + output.preempted_request_ids:
            self.tokens.pop(request_id, None)
            self.blocks.pop(request_id, None)
        for new in output.new_requests:
            assert new.request_id not in self.tokens, f"{new.request_id} sent twice"
            self.tokens[new.request_id] = list(new.prompt_token_ids) + list(new.output_token_ids)
            self.num_prompt_tokens[new.request_id] = len(new.prompt_token_ids)
            self.blocks[new.request_id] = []
        for row in output.scheduled:  # write every row's K/V first, like a layer's cache write
            tokens = self.tokens[row.request_id]
            assert list(row.token_ids) == tokens[row.start_position : row.seq_len]
            blocks = self.blocks[row.request_id]
            blocks.extend(row.new_block_ids)  # tables only grow: the runner keeps the whole one
            assert NULL_BLOCK_ID not in blocks
            assert len(blocks) * self.block_size >= row.seq_len
            for offset, token in enumerate(row.token_ids):
                position = row.start_position + offset
                self.kv[blocks[position // self.block_size]][position % self.block_size] = token
        sampled: dict[str, int] = {}
        for row in output.scheduled:
            tokens = self.tokens[row.request_id]
            blocks = self.blocks[row.request_id]
            context = [self.kv[blocks[p // self.block_size]][p % self.block_size] for p in range(row.seq_len)]
            assert context == tokens[: row.seq_len], f"{row.request_id}: KV blocks hold the wrong tokens"
            assert row.sample == (row.seq_len == len(tokens))
            if row.sample:
                num_outputs = len(tokens) - self.num_prompt_tokens[row.request_id]
                forced = self.script.get(row.request_id, [])
                token = forced[num_outputs] if num_outputs < len(forced) else next_token(context)
                tokens.append(token)
                sampled[row.request_id] = token
        return ModelRunnerOutput(sampled_token_ids=sampled)


class Harness:
    def __init__(self, scheduler: Scheduler, runner: FakeRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.kv = scheduler.kv
        self.outputs: list[SchedulerOutput] = []

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        output = self.scheduler.schedule()
        updated = self.scheduler.update_from_output(output, self.runner.execute(output))
        self.outputs.append(output)
        self.check_invariants(output)
        return output, updated

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps: {self.scheduler.requests}")

    def check_invariants(self, output: SchedulerOutput) -> None:
        config = self.scheduler.config
        ids = [row.request_id for row in output.scheduled]
        assert len(ids) == len(set(ids)) <= config.max_num_seqs
        assert output.num_batched_tokens == sum(row.num_tokens for row in output.scheduled)
        assert output.num_batched_tokens <= config.max_num_batched_tokens
        assert self.scheduler.num_running <= config.max_num_seqs
        # Every block's reference count equals the number of running requests holding it.
        holders = [0] * self.kv.pool.num_blocks
        for request in self.scheduler.running:
            for block_id in self.kv.get_block_ids(request.request_id):
                holders[block_id] += 1
        assert [block.ref_cnt for block in self.kv.pool.blocks] == holders
        assert self.kv.num_free_blocks == sum(1 for count in holders[1:] if count == 0)

    def assert_no_leak(self) -> None:
        assert not self.scheduler.has_unfinished()
        assert self.scheduler.num_running == 0 and self.scheduler.num_waiting == 0
        assert self.kv.num_free_blocks == self.kv.pool.num_blocks - 1
        assert all(block.ref_cnt == 0 for block in self.kv.pool.blocks)


@pytest.fixture
def make_harness():
    def make(
        num_blocks: int = 64,
        block_size: int = 4,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 64,
        enable_chunked_prefill: bool = True,
        policy: str = "fcfs",
        mode: str = "continuous",
        max_model_len: int = 1024,
        enable_prefix_caching: bool = True,
        script: dict[str, list[int]] | None = None,
        min_admit_batch: int = 1,
    ) -> Harness:
        cache_config = CacheConfig(
            block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching
        )
        scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            policy=policy,
            mode=mode,
            min_admit_batch=min_admit_batch,
        )
        kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        scheduler = Scheduler(scheduler_config, cache_config, kv, max_model_len)
        return Harness(scheduler, FakeRunner(block_size, num_blocks, script))

    return make


@pytest.fixture
def make_request():
    arrivals = iter(range(1, 1_000_000))

    def make(
        request_id: str,
        prompt: list[int],
        max_tokens: int = 4,
        priority: int = 0,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        **params,
    ) -> Request:
        # Arrival times are explicit and increasing so ordering never depends on the clock.
        arrival = float(next(arrivals)) if arrival_time is None else arrival_time
        return Request(
            request_id,
            prompt,
            SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
            eos_token_id=eos_token_id,
            arrival_time=arrival,
            priority=priority,
        )

    return make


@pytest.fixture(name="reference_output")
def reference_output_fixture():
    return reference_output
