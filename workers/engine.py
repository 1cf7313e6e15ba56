"""LLMEngine: the step loop — schedule → submit → collect → update → outputs. No tensors here.

    add_request(id, prompt, params)  → validated, tokenized, queued (n > 1 becomes n requests)
    step()                           → batches.fill(): scheduler.schedule() → executor.submit()
                                       → batches.collect(): the oldest batch's output
                                       → scheduler.update_from_output() → outputs.process()
                                       → list[RequestOutput] of every request that advanced
    abort_request(id)                → blocks freed at once; a final ABORT output next step
    score(prompt)                    → [tokens - 1, vocab] log-probs of the prompt's own tokens
                                       (one prefill, no sampling; workers/runner/scoring.py)

InFlightBatches (inflight.py) owns the batches in flight: depth 1 (synchronous), 2+ (async: the
host applies batch N while the device runs N+1) or P pipeline stages; outputs equal the
synchronous engine's in every mode; a batch that had to be applied before the next was scheduled
(speculating, penalties) gets its outputs built after the next leaves. Samples of one prompt (n > 1) share its KV blocks: the others
join once the first one's prompt is computed. Speculative decoding rides the same loop (the
scheduler's Speculator, workers/spec/, adds drafts; the runner verifies them). The AsyncEngine
(async_engine.py) runs this loop on a thread. The executor (workers/worker/executor.py) runs the
model in this process at world size 1 (`self.runner`), else on TP x PP worker processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from itertools import repeat

import torch
from shardserve.parallel.options import set_kernel_options
from shardserve.workers.config import EngineConfig
from shardserve.workers.cost import CostMeter
from shardserve.workers.env_overrides import apply_env_overrides
from shardserve.workers.heap import freeze_startup_heap, thaw_heap
from shardserve.workers.inflight import BatchResult, InFlightBatches
from shardserve.workers.kv_cache.manager import KVCacheManager
from shardserve.workers.launch import make_executor
from shardserve.workers.models.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from shardserve.workers.models.tp_fit import check_tensor_parallel
from shardserve.workers.output_processor import OutputProcessor
from shardserve.workers.protocol import EngineStats, ModelInfo, QueueFullError
from shardserve.workers.request import FinishReason, Request, RequestOutput, SamplingParams
from shardserve.workers.runner.model_runner import ModelRunner
from shardserve.workers.runner.scoring import score_tokens
from shardserve.workers.scheduler.scheduler import Scheduler
from shardserve.workers.spec.factory import check_proposer, make_proposer
from shardserve.workers.spec.proposer import TargetModel
from shardserve.workers.spec.speculator import Speculator
from shardserve.workers.stats import ThroughputMeter
from shardserve.workers.step_types import SchedulerOutput
from shardserve.workers.worker.executor import Executor, LocalExecutor

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, progress: bool = False) -> None:
        config = apply_env_overrides(config)  # environment A/B overrides (env_overrides.py), once; the ranks get this config
        set_kernel_options(config.parallel.kernel_options())  # this process's kernels (a world of one)
        self.config = config
        device = resolve_device(config.model.device)
        dtype = resolve_dtype(config.model.dtype, device)
        self.cost = CostMeter.for_engine(config.cost, config.parallel.world_size, device.type)  # workers/cost.py
        torch.manual_seed(config.model.seed)
        if config.parallel.world_size > 1:
            self.loaded = loaded or load_model(config.model, device, dtype, weights=False)  # weights live in the workers
        else:
            self.loaded = loaded or load_model(config.model, device, dtype, progress=progress)
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = self.loaded.max_model_len
        if config.model.max_model_len is not None:
            self.max_model_len = min(self.max_model_len, config.model.max_model_len)
        check_tensor_parallel(self.loaded.hf_config, config.parallel.tensor_parallel_size)  # before the ranks start
        if config.speculative.enabled and config.parallel.world_size > 1:  # refuse a bad draft before the ranks start
            check_proposer(config.speculative, config.model, self.loaded)
        self.executor: Executor = make_executor(config, self.loaded, device)
        self.num_blocks = self.executor.num_blocks
        # ModelConfig.cpu_activations as the runner(s) resolved it (auto -> float | int8): the config
        # this engine reports, and the one a draft model's engine starts from (spec/draft.py)
        resolved = self.executor.cpu_activations
        logger.info("%s: cpu_activations %s -> %s", self.loaded.name, config.model.cpu_activations, resolved)
        self.config = config = replace(config, model=replace(config.model, cpu_activations=resolved))
        self.eos_token_id = self.loaded.eos_token_ids[0] if self.loaded.eos_token_ids else None
        self.kv_manager = KVCacheManager(
            self.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.async_scheduling = config.use_async_scheduling  # only with P = 1
        # P (or ParallelConfig.pipeline_micro_batches) under pipeline parallelism,
        # SchedulerConfig.async_depth (2 by default) under async scheduling
        self.max_batches_in_flight = config.scheduler.async_depth if self.async_scheduling \
            else config.parallel.pipeline_depth
        # A synchronous speculating step (the draft model's) gives up async scheduling's overlap,
        # which only a GPU has to lose.
        backoff = self.async_scheduling and device.type == "cuda"
        self.speculator = None
        if config.speculative.enabled:  # a draft model (spec/draft.py) needs the target's config and model
            target = TargetModel(config, self.loaded, self.num_blocks, engine_factory=type(self))
            try:
                proposer = make_proposer(config.speculative, target)
            except BaseException:  # a draft refused at start-up: the worker ranks already run, stop them
                self.executor.shutdown()
                raise
            self.speculator = Speculator(config.speculative, proposer, backoff, self.async_scheduling)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.kv_manager, self.max_model_len,
                                   max_batches_in_flight=self.max_batches_in_flight,
                                   async_scheduling=self.async_scheduling, speculator=self.speculator)
        self.outputs = OutputProcessor(self.tokenizer)
        self.meter = ThroughputMeter()
        self.batches = InFlightBatches(self.scheduler, self.executor, self.max_batches_in_flight,
                                      self.async_scheduling)
        # parent id -> samples 1..n-1 waiting for sample 0's prompt to be computed
        self._held_samples: dict[str, list[Request]] = {}
        self._first_sample: dict[str, Request] = {}
        freeze_startup_heap()  # full GC passes skip the start-up heap (workers/heap.py)

    # ---- requests in -------------------------------------------------------------------

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt must be a list of token ids: this model has no tokenizer")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        if isinstance(prompt, (list, tuple)) and _are_ints(prompt):
            return list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        check_queue: bool = False,
    ) -> None:
        """Validate and queue a request; raises ValueError naming the bad field.

        `check_queue` (the serving path): refuse the request when the waiting queue has no room
        (`check_admission`); the offline API queues everything it is given."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if request_id in self.outputs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self.tokenize(prompt)
        self._validate_prompt(token_ids)
        vocab_size = self.loaded.hf_config.vocab_size
        bad = next((i for i, t in enumerate(token_ids) if not 0 <= t < vocab_size), None)
        if bad is not None:  # the message names one id, never the whole prompt
            raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {token_ids[bad]} at position {bad}")
        bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
        if bad is not None:  # min_tokens masks these ids in the logits: one past the vocabulary would fault
            raise ValueError(f"stop_token_ids must be in [0, {vocab_size}), got {bad}")
        if check_queue:
            self.check_admission(token_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        text = prompt if isinstance(prompt, str) else None
        samples = [
            Request(
                request_id if params.n == 1 else f"{request_id}#{i}",
                token_ids,
                params.for_sample(i),
                eos_token_id=self.eos_token_id,
                arrival_time=arrival,
                priority=priority,
                prompt=text,
                parent_id=request_id,
                sample_index=i,
            )
            for i in range(params.n)
        ]
        self.outputs.add(request_id, text, token_ids, params, samples)
        self.scheduler.add_request(samples[0])
        if len(samples) > 1:
            self._first_sample[request_id] = samples[0]
            self._held_samples[request_id] = samples[1:]

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must contain at least 1 token, got an empty prompt")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens; it must be at most max_model_len - 1 = "
                f"{self.max_model_len - 1} tokens to leave room for output"
            )
        block_size = self.config.cache.block_size
        needed = -(-(len(token_ids) + 1) // block_size)
        if needed > self.num_blocks - 1:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens but the KV cache holds at most "
                f"{(self.num_blocks - 1) * block_size - 1}; raise the KV cache budget"
            )

    def score(self, prompt: str | Sequence[int], num_targets: int | None = None) -> torch.Tensor:
        """Full-vocabulary log-probs of a prompt's own tokens: [num_targets, vocab_size] float32,
        row i the model's distribution over token len - num_targets + i given all tokens before it
        (num_targets defaults to len - 1: every token but the first).

        One chunked prefill through the model and the paged KV cache (workers/runner/scoring.py),
        no sampling; the blocks come from the engine's pool and are freed before it returns, so it
        may run between steps beside running requests. In-process engines only (world size 1)."""
        token_ids = self.tokenize(prompt)
        vocab_size = self.loaded.hf_config.vocab_size
        if len(token_ids) < 2:
            raise ValueError(f"prompt to score must have at least 2 tokens, got {len(token_ids)}")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt to score is {len(token_ids)} tokens; it must be at most max_model_len = "
                             f"{self.max_model_len}")
        bad = next((i for i, t in enumerate(token_ids) if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {token_ids[bad]} at position {bad}")
        num_targets = len(token_ids) - 1 if num_targets is None else num_targets
        if not 1 <= num_targets <= len(token_ids) - 1:
            raise ValueError(f"num_targets must be in [1, {len(token_ids) - 1}] (prompt tokens - 1), got {num_targets}")
        pool = self.kv_manager.pool
        num_blocks = self.kv_manager.num_blocks_for(len(token_ids))
        if num_blocks > pool.num_free_blocks:
            raise ValueError(f"prompt to score needs {num_blocks} KV blocks, {pool.num_free_blocks} are free now; "
                             "score a shorter prompt or raise the KV cache budget")
        if not isinstance(self.executor, LocalExecutor):
            raise ValueError("score runs the model in the engine's process: tensor_parallel_size and "
                             "pipeline_parallel_size must be 1")
        block_ids = pool.allocate(num_blocks)
        try:
            return score_tokens(self.executor.runner, token_ids, block_ids, num_targets,
                                self.config.scheduler.max_num_batched_tokens)
        finally:
            pool.free(reversed(block_ids))

    def abort_request(self, request_id: str) -> None:
        """Abort a request and all its samples; unknown or finished ids are ignored."""
        for sample in self._held_samples.pop(request_id, []):
            self.outputs.finish_sample(sample, FinishReason.ABORT)
        self._first_sample.pop(request_id, None)
        sample_ids = self.outputs.sample_ids(request_id)
        # Its in-flight batches' results will come back after the output is gone: ignore them then.
        self.batches.drop_later_results(sample_ids)
        self.scheduler.abort_requests(sample_ids)
        self.outputs.abort(request_id)

    # ---- the step ----------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self._held_samples) or self.outputs.has_pending()
                or bool(self.batches))

    def step(self) -> list[RequestOutput]:
        """Schedule → submit → collect the oldest batch → update the scheduler → build outputs."""
        self._fill()
        batch = self.batches.collect()
        if batch is not None:
            advanced = self.scheduler.update_from_output(batch.sched, batch.output)
            if self.batches.refill_before_outputs or batch.needs_sync:
                # Pipeline stages, or a batch that held the queue (speculating, penalties): the next
                # batch leaves first, so the device runs it while the host detokenizes this one.
                idle = self._fill(build_idle=False)
                self._build_outputs(batch, advanced)
                if idle is not None:
                    self._build_outputs(*idle)
            else:
                self._build_outputs(batch, advanced)
        self._release_held_samples()
        return self.outputs.collect()

    def _fill(self, build_idle: bool = True) -> tuple[BatchResult, list[Request]] | None:
        """Submit batches until the queue is full; a schedule with nothing to run is applied at once
        (the scheduler may have finished requests in it: kv_cache_full) and its outputs built, or,
        without `build_idle`, returned with its finished requests for the caller to build."""
        idle = self.batches.fill()
        if idle is None:
            return None
        applied = idle, self.scheduler.update_from_output(idle.sched, idle.output)
        if not build_idle:
            return applied
        self._build_outputs(*applied)
        return None

    def _build_outputs(self, batch: BatchResult, advanced: list[Request]) -> None:
        """Build the outputs of an applied batch; finish the requests that hit a stop string."""
        batch = self.batches.kept(batch)
        self.meter.record(
            num_prompt_tokens=_num_prompt_tokens(batch.sched),
            num_generation_tokens=len(batch.output.sampled_token_ids),
        )
        self.cost.record(batch.sched.scheduled, self.outputs)  # workers/cost.py
        for request_id, stop_string in self.outputs.process(batch.request_ids, advanced, batch.output):
            self.batches.drop_later_results([request_id])  # already in later batches: drop those results
            self.scheduler.finish_request(request_id, FinishReason.STOP, stop_reason=stop_string)
        self.batches.drop_finished(advanced)

    def _release_held_samples(self) -> None:
        for parent_id in list(self._held_samples):
            first = self._first_sample[parent_id]
            if first.num_computed_tokens >= first.num_prompt_tokens or first.is_finished:
                for sample in self._held_samples.pop(parent_id):
                    self.scheduler.add_request(sample)
                del self._first_sample[parent_id]

    @property
    def runner(self) -> ModelRunner:
        """The in-process ModelRunner (single-process engines only)."""
        if not isinstance(self.executor, LocalExecutor):
            raise AttributeError("this engine runs its model in worker processes: it has no in-process runner")
        return self.executor.runner

    def shutdown(self) -> None:
        """Stop the worker processes, if any, and the draft model's engine (idempotent)."""
        self.executor.shutdown()
        if self.speculator is not None:
            self.speculator.close()
        thaw_heap()

    # ---- introspection -----------------------------------------------------------------

    def num_waiting(self) -> int:
        return self.scheduler.num_waiting + sum(len(v) for v in self._held_samples.values())

    def check_admission(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Refuse a request the waiting queue has no room for: ValueError if it can never fit,
        QueueFullError (retry later) if it does not fit now. Counts n samples and prompt tokens."""
        limits = self.config.scheduler
        if params.n > limits.max_queue_len:
            raise ValueError(f"n must be <= scheduler.max_queue_len = {limits.max_queue_len}, got {params.n}")
        if len(prompt_token_ids) > limits.max_queue_tokens:
            raise ValueError(
                f"prompt is {len(prompt_token_ids)} tokens; it must be at most scheduler.max_queue_tokens = "
                f"{limits.max_queue_tokens}"
            )
        num_waiting = self.num_waiting()
        if num_waiting + params.n > limits.max_queue_len:
            raise QueueFullError(
                f"queue full: {num_waiting} of {limits.max_queue_len} waiting samples taken "
                f"(scheduler.max_queue_len), this request needs {params.n}; retry later"
            )
        num_tokens = self.scheduler.num_waiting_prompt_tokens
        if num_tokens + len(prompt_token_ids) > limits.max_queue_tokens:
            raise QueueFullError(
                f"queue full: {num_tokens} of {limits.max_queue_tokens} waiting prompt tokens taken "
                f"(scheduler.max_queue_tokens), this request needs {len(prompt_token_ids)}; retry later"
            )

    def stats(self) -> EngineStats:
        prompt_rate, generation_rate = self.meter.rates()
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.num_waiting(),
            kv_cache_usage=self.kv_manager.usage,
            prefix_cache_hit_rate=self.kv_manager.prefix_cache_stats.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_per_s=prompt_rate,
            generation_tokens_per_s=generation_rate,
            num_finished=self.outputs.num_finished,
            total_prompt_tokens=self.meter.total_prompt_tokens,
            total_generation_tokens=self.meter.total_generation_tokens,
            num_batches_in_flight=len(self.batches),
            max_batches_in_flight=self.batches.stats.max_in_flight,
            spec_decode=self.speculator.stats.snapshot() if self.speculator is not None else None,
            cost=self.cost.stats(),
            cpu_activations=self.config.model.cpu_activations,
        )

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.loaded.name, self.max_model_len, self.loaded.hf_config.vocab_size)


def _are_ints(values: Sequence) -> bool:
    """Every value is an int and none is a bool (an int subclass); map() keeps the per-token
    loop in C, which matters for prompts of thousands of tokens."""
    return all(map(isinstance, values, repeat(int))) and not any(map(isinstance, values, repeat(bool)))


def _num_prompt_tokens(sched: SchedulerOutput) -> int:
    """The meter's prompt tokens of a batch: every token it feeds except each sampling row's
    last one (that one counts as generation)."""
    return sum(len(r.token_ids) - r.sample for r in sched.scheduled)
