"""ModelRunner: owns the model, its paged KV cache and the sampler on one device.

One call per engine step, `execute(scheduler_output)` = `finish(launch(scheduler_output))`:
  1. the step's diffs go into the persistent batch (persistent_batch.py; sampling options in
     sampling_state.py): finished / preempted requests leave their rows, new ones take rows,
     block tables gain the blocks the scheduler just allocated;
  2. the tokens are laid out in row order (numpy) and uploaded with the block-table diffs in one
     pinned host-to-device copy (staging.py);
  3. the model runs: a decode step whose rows are 0..n-1 replays a decode CUDA graph
     (cuda_graphs.py), a verify step of decode rows and drafts only runs as one decode query per
     token (verify_decode.py), any other step a token-count graph (mixed_graphs.py), or eagerly (CPU,
     the MoE expert loop); a later pipeline stage receives the previous stage's activations and
     a stage before the last sends its own and returns;
  4. logits for the sampling rows (and prompt-logprob positions; a request with drafts samples at
     each of them too: `_verify`), SamplingMetadata built while the GPU is busy, one sampler call.
`launch` (1-4) never waits for the GPU and returns a `PendingStep`; `finish` waits for the ids
and builds the ModelRunnerOutput. Async scheduling launches N+1 before finishing N: the ids N
samples go to `last_sampled` ([max_rows], by persistent row; a verify row's draw after its last
draft) and N+1's PLACEHOLDER inputs are replaced from it on the device before the forward. A step sampling
penalty rows must be finished before the next launch (penalty histories need the ids on the host).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from shardserve.parallel.pipeline import recv_hidden, send_hidden
from shardserve.parallel.state import get_parallel_state
from shardserve.workers.attention.backend import get_attention_backend
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.config import EngineConfig
from shardserve.workers.models.loader import LoadedModel
from shardserve.workers.quant.cpu_kernels import decode_ops
from shardserve.workers.request import SamplingParams
from shardserve.workers.runner.cpu_activations import apply_cpu_activations
from shardserve.workers.runner.cuda_graphs import (
    DecodeGraphs,
    bucket_for,
    graph_batch_sizes,
    pad_decode_inputs,
)
from shardserve.workers.runner.inputs import build_model_inputs
from shardserve.workers.runner.kv_budget import KVCacheLayout, allocate_kv_caches, determine_num_blocks
from shardserve.workers.runner.mixed_graphs import MixedGraphs, pack_mixed_inputs, slots_for, token_buckets
from shardserve.workers.runner.persistent_batch import PersistentBatch, StepLayout
from shardserve.workers.runner.sampling_state import SamplingState
from shardserve.workers.runner.staging import PinnedStager
from shardserve.workers.runner.step_records import PendingStep, StepTimes, StepUploads
from shardserve.workers.runner.verify_decode import (
    decode_rows,
    eager_metadata,
    kv_budget_tokens,
    takes_decode_path,
    verify_graph_sizes,
)
from shardserve.workers.sampling.logprobs import compute_prompt_logprobs
from shardserve.workers.sampling.sampler import Sampler
from shardserve.workers.step_types import (
    ModelRunnerOutput,
    NewRequestData,
    PromptLogprobs,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)

logger = logging.getLogger(__name__)
GRAPH_RESERVE_MARGIN = 1.25  # capture-time pool vs the eager decode peak it is estimated from


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, device: torch.device,
                 use_cuda_graphs: bool = True) -> None:
        self.model = loaded.model
        self.device = device
        self.block_size = config.cache.block_size
        self.eos_token_id = loaded.eos_token_ids[0] if loaded.eos_token_ids else None
        self.vocab_size = loaded.hf_config.vocab_size
        self.sampler = Sampler(self.vocab_size, seed=config.model.seed)
        self.max_rows = config.scheduler.max_num_seqs
        # logits rows of a step at most: verify steps add up to max_verify_tokens (speculative decoding)
        speculative = config.speculative
        self.max_sample_rows = self.max_rows + (speculative.max_verify_tokens if speculative.enabled else 0)
        self.max_model_len = loaded.max_model_len
        state = get_parallel_state()
        self.is_first_stage, self.is_last_stage = state.is_first_pp_rank, state.is_last_pp_rank
        self.hidden_size = loaded.hf_config.hidden_size
        self.dtype = next(self.model.parameters()).dtype
        if device.type == "cuda" and hasattr(self.model, "set_attention_backend"):
            self.model.set_attention_backend(get_attention_backend("triton"))
        elif device.type == "cpu" and hasattr(self.model, "set_attention_backend") and decode_ops.ops() is not None:
            self.model.set_attention_backend(get_attention_backend("cpu"))  # fused C++ decode attention
            if hasattr(self.model, "use_cpu_lm_head"):
                self.model.use_cpu_lm_head()  # logits from the exact Q8_0 blocks of a GGUF head (cpu_head.py)
        # ModelConfig.cpu_activations as resolved on this model: float | int8 (cpu_activations.py)
        self.cpu_activations = apply_cpu_activations(self.model, config.model.cpu_activations, device)
        self.graph_sizes = graph_batch_sizes(self.max_rows)
        self.token_buckets = token_buckets(config.scheduler.max_num_batched_tokens)
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda" and not _syncs_in_forward(self.model)
        spec = KVCacheLayout.of_model(self.model, self.block_size)
        self.kv_bytes_per_token = spec.bytes_per_block // self.block_size
        # speculative decoding: verify steps of decode rows + drafts run as decode rows (verify_decode.py)
        self.verify_as_decode = speculative.enabled
        self.verify_kv_budget = kv_budget_tokens(self.model, self.kv_bytes_per_token)
        self.verify_graph_sizes = verify_graph_sizes(
            speculative.num_speculative_tokens, speculative.max_verify_tokens, self.max_rows) if speculative.enabled else []
        reserve = self._graph_reserve if self.use_cuda_graphs else None
        self.num_blocks = determine_num_blocks(spec, config, device, self._profile_forward, reserve)
        self.kv_caches = allocate_kv_caches(spec, self.num_blocks, device)
        max_blocks_per_row = -(-self.max_model_len // self.block_size) + 1
        self.batch = PersistentBatch(self.max_rows, max_blocks_per_row, self.block_size, device)
        self.sampling = SamplingState(self.max_rows, self.eos_token_id, device)
        max_tokens = config.scheduler.max_num_batched_tokens
        # + 3 rows' worth for the async uploads (placeholder index / rows, sample rows)
        self.stager = PinnedStager(4 * max_tokens + 7 * self.max_rows + 2 * max_blocks_per_row + 16, device)
        self.async_scheduling = config.use_async_scheduling
        # launch() of the next step may come before finish() of this one (worker/proc.py)
        self.overlaps_steps = self.async_scheduling or state.pp_size > 1
        # [max_rows] the last id sampled per persistent row (async scheduling only): the value
        # of a PLACEHOLDER input token, read on the device by the next launch
        self.last_sampled = torch.zeros(self.max_rows if self.async_scheduling else 0, dtype=torch.int64,
                                        device=device)
        self._num_launched = 0
        self._launch_start = 0.0  # perf_counter at the current launch() (StepTimes.prep_s)
        self._prompt_logprobs: dict[str, tuple[int, list[int]]] = {}  # request id -> (top-n, prompt)
        self.step_times = StepTimes()
        self.graphs: DecodeGraphs | None = None
        self.verify_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.graph_pool_bytes = 0
        self.use_mixed_graphs = self.use_cuda_graphs
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                    spec.bytes_per_block * self.num_blocks / 2**20)
        if self.use_cuda_graphs:
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        """Mixed-step graphs first (the largest activations), then decode (and verify-decode) graphs,
        in one pool."""
        table = self.batch.block_table_device
        hidden_in = None  # one static input buffer shared by every graph of a later pipeline stage
        if not self.is_first_stage:
            rows = max(self.token_buckets[-1], self.graph_sizes[-1], *self.verify_graph_sizes)
            hidden_in = torch.zeros(rows, self.hidden_size, dtype=self.dtype, device=self.device)
        self.mixed_graphs = MixedGraphs(self.model, self.kv_caches, table, self.token_buckets,
                                        self.max_model_len, self.device, hidden_in)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, table, self.graph_sizes, self.max_model_len,
                                   self.device, hidden_in)
        if self.verify_graph_sizes:
            self.verify_graphs = DecodeGraphs(self.model, self.kv_caches, table, self.verify_graph_sizes,
                                              self.max_model_len, self.device, hidden_in, gather_rows=True)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.mixed_graphs.capture(pool)
        self.graphs.capture(pool)
        if self.verify_graphs is not None:
            self.verify_graphs.capture(pool)
        torch.cuda.synchronize(self.device)
        self.graph_pool_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info("CUDA graphs: %d decode + %d verify-decode + %d mixed-step, pool %.1f MiB, captured in %.1f s",
                    len(self.graph_sizes), len(self.verify_graph_sizes), len(self.token_buckets),
                    self.graph_pool_bytes / 2**20,
                    time.perf_counter() - start)

    # ---- start-up: memory profile ---------------------------------------------------------------

    def _profile_forward(self, num_tokens: int, num_requests: int = 1, sample: bool = True) -> None:
        """One forward of `num_tokens` tokens split over `num_requests` fresh requests (no cache
        hit), then logits and a top-k/top-p sampling pass over up to max_num_seqs rows: the
        largest eager step's peak activation memory."""
        spec = KVCacheLayout.of_model(self.model, self.block_size)
        per_request = max(1, num_tokens // num_requests)
        blocks_each = -(-per_request // self.block_size)
        caches = allocate_kv_caches(spec, blocks_each * num_requests + 1, self.device)
        scheduled = tuple(
            ScheduledRequest(f"profile-{i}", tuple([0] * per_request), 0,
                tuple(range(1 + i * blocks_each, 1 + (i + 1) * blocks_each)), True)
            for i in range(num_requests)
        )
        sched = SchedulerOutput(new_requests=(), scheduled=scheduled, num_batched_tokens=per_request * num_requests)
        inputs = build_model_inputs(sched, self.block_size, self.device)
        hidden_in = None if self.is_first_stage else torch.zeros(
            per_request * num_requests, self.hidden_size, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            hidden = self.model(inputs.input_ids, inputs.positions, caches, inputs.attn_metadata, hidden_in)
            if sample and self.is_last_stage:
                num_rows = min(self.max_sample_rows, hidden.shape[0])
                logits = self.model.compute_logits(hidden[-num_rows:])
                rows = SamplingState(num_rows, None, self.device)
                for row in range(num_rows):
                    rows.add(row, SamplingParams(temperature=1.0, top_p=0.9), [], [])
                self.sampler(logits, rows.build(np.arange(num_rows)))
        del caches

    def _graph_reserve(self) -> int:
        """Bytes to keep free for the graphs' shared pool: the larger eager peak of the largest
        decode bucket and the largest mixed-step bucket (captures reuse the pool's free memory)."""
        largest_tokens = self.token_buckets[-1]
        shapes = [(self.graph_sizes[-1], self.graph_sizes[-1]),
                  (largest_tokens, slots_for(largest_tokens, self.max_rows))]
        peaks = []
        for num_tokens, num_requests in shapes:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._profile_forward(num_tokens, num_requests, sample=False)
            torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
        torch.cuda.empty_cache()
        return int(max(peaks) * GRAPH_RESERVE_MARGIN) + (64 << 20)

    # ---- one step -------------------------------------------------------------------------------

    def set_cuda_graphs(self, enabled: bool, mixed: bool | None = None) -> None:
        """Use (or bypass) the captured decode graphs and, separately if `mixed` is given, the
        mixed-step graphs; bypassed steps run eagerly (A/B runs)."""
        self.use_cuda_graphs = enabled and self.graphs is not None
        self.use_mixed_graphs = (enabled if mixed is None else mixed) and self.mixed_graphs is not None

    def set_verify_as_decode(self, enabled: bool) -> None:
        """Run decode-like verify steps as decode rows (the default with speculation) or, off, as
        mixed steps like any step with more than one token per request (A/B runs)."""
        self.verify_as_decode = enabled

    def _add(self, new: NewRequestData) -> None:
        row = self.batch.add(new.request_id)
        params = new.sampling_params
        self.sampling.add(row, params, list(new.prompt_token_ids), list(new.output_token_ids))
        if params.prompt_logprobs is not None:
            self._prompt_logprobs[new.request_id] = (params.prompt_logprobs, list(new.prompt_token_ids))

    def _remove(self, request_id: str) -> None:
        row = self.batch.row_of.get(request_id)
        if row is None:
            return
        self.sampling.clear(row)
        moved = self.batch.remove(request_id)
        if moved is not None:
            self.sampling.move(*moved)
            if self.async_scheduling:  # the moved request's pending token follows it
                src, dst = moved
                self.last_sampled[dst].copy_(self.last_sampled[src])
        self._prompt_logprobs.pop(request_id, None)

    def _graph_bucket(self, layout: StepLayout) -> int | None:
        if not self.use_cuda_graphs or not layout.is_decode_only or not layout.rows_are_prefix:
            return None
        return bucket_for(len(layout.requests), self.graph_sizes)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its sampled ids."""
        return self.finish(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> PendingStep:
        """Apply the step's diffs, upload, run the model and the sampler; never waits for the GPU."""
        start = self._launch_start = time.perf_counter()
        seq, self._num_launched = self._num_launched, self._num_launched + 1
        for request_id in (*sched.finished_request_ids, *sched.preempted_request_ids):
            self._remove(request_id)
        for new in sched.new_requests:
            self._add(new)
        if sched.is_empty:
            return PendingStep(ModelRunnerOutput(), seq)
        row_of = self.batch.row_of
        for req in sched.scheduled:
            self.batch.append_blocks(row_of[req.request_id], req.new_block_ids)
        layout = self.batch.layout(sched.scheduled)
        sample_mask = np.fromiter((r.sample for r in layout.requests), dtype=bool, count=len(layout.requests))
        sample_tokens = layout.query_start[1:][sample_mask] - 1  # [num_sampling] token rows
        sample_rows = layout.rows[sample_mask]
        drafts = None
        if sched.num_draft_tokens:
            sample_tokens, sample_rows, drafts = _verify_rows(layout, sample_mask)
        uploads = self._uploads(layout, sample_tokens, sample_rows, drafts)
        timing = self.step_times.enabled and self.device.type == "cuda"
        if self.step_times.enabled:
            self.step_times.rows.append(len(layout.requests))
            self.step_times.tokens.append(layout.num_tokens)
        events = None
        if timing:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        hidden_in = None
        if not self.is_first_stage:  # the previous stage's residual stream for this step's tokens
            hidden_in = recv_hidden(layout.num_tokens, self.hidden_size, self.dtype, self.device)
        hidden, device_views = self._forward(layout, uploads, hidden_in)  # [tokens or bucket, hidden]
        if not self.is_last_stage:
            # A graph's output buffer is rewritten by the next replay, possibly before the
            # asynchronous send has read it: send a copy of the real rows.
            send_hidden(hidden[: layout.num_tokens].clone())
            return PendingStep(ModelRunnerOutput(), seq)

        output = ModelRunnerOutput()
        if self._prompt_logprobs:
            self._compute_prompt_logprobs(layout, hidden, output)
        num_sampling = sample_tokens.size
        if num_sampling == 0:
            return PendingStep(output, seq)
        sample_index = device_views.get("sample_tokens")
        rows_hidden = hidden[:num_sampling] if sample_index is None else hidden.index_select(0, sample_index)
        logits = self.model.compute_logits(rows_hidden)  # [num_sampling, vocab_size], model dtype
        metadata = self.sampling.build(sample_rows)
        sampled = self.sampler(logits, metadata)
        if self.async_scheduling:  # the next launch may feed these ids as placeholders
            last = device_views.get("sample_last")  # a verify step: each request's draw after its last draft
            ids = sampled.token_ids if last is None else sampled.token_ids.index_select(0, last)
            self.last_sampled.index_copy_(0, device_views["sample_rows"], ids)
        self.sampling.count_sampled(sample_rows)
        if events is not None:
            events[1].record()
        ids = [r.request_id for r, s in zip(layout.requests, sample_mask.tolist(), strict=True) if s]
        pending = PendingStep(
            output, seq, sampled.token_ids, ids, sample_rows,
            logprobs=sampled.logprobs if metadata.max_num_logprobs is not None else None,
            has_penalties=self.sampling.has_penalties(sample_rows), timed=self.step_times.enabled, events=events,
            drafts=drafts,
        )
        if self.overlaps_steps and self.device.type == "cuda":  # finish() waits on an event, not a sync
            pending.host_token_ids = torch.empty(num_sampling, dtype=sampled.token_ids.dtype, pin_memory=True)
            pending.host_token_ids.copy_(sampled.token_ids, non_blocking=True)
            pending.copied = torch.cuda.Event()
            pending.copied.record()
        pending.host_s = time.perf_counter() - start
        return pending

    def finish(self, pending: PendingStep) -> ModelRunnerOutput:
        """Wait for a launched step's sampled ids and build its output (launch order)."""
        output = pending.output
        if pending.token_ids is None:
            return output
        start = time.perf_counter()
        if pending.copied is not None:
            assert pending.host_token_ids is not None
            pending.copied.synchronize()
            token_ids = pending.host_token_ids.tolist()
        else:
            token_ids = pending.token_ids.tolist()
        waited = time.perf_counter() - start
        assert pending.sample_rows is not None
        if pending.has_penalties:
            if self._num_launched != pending.seq + 1:
                # Rows may have moved and the next step sampled without these tokens.
                raise RuntimeError("a step that samples penalty rows must be finished before the next launch")
            self.sampling.record_tokens(pending.sample_rows, token_ids)
        if pending.drafts is not None:
            self._verify(pending, token_ids, output)
        else:
            output.sampled_token_ids.update(zip(pending.request_ids, token_ids, strict=True))
        if pending.logprobs is not None and pending.drafts is None:
            for request_id, logprobs in zip(pending.request_ids, pending.logprobs, strict=True):
                if logprobs is not None:
                    output.logprobs[request_id] = logprobs
        times = self.step_times
        if pending.timed:
            times.launch_s.append(pending.host_s)
            times.wait_s.append(waited)
            times.host_s.append(pending.host_s + time.perf_counter() - start - waited)
        if pending.events is not None:  # CUDA
            times.gpu_s.append(pending.events[0].elapsed_time(pending.events[1]) / 1e3)
            if times.last_end is not None:
                times.gap_s.append(times.last_end.elapsed_time(pending.events[0]) / 1e3)
            times.last_end = pending.events[1]
        return output

    def _verify(self, pending: PendingStep, token_ids: list[int], output: ModelRunnerOutput) -> None:
        """Each request's sampled token and accepted drafts from a speculative step's samples: the
        drafts are kept while the target drew them; its draw at the first other position (or after
        the last draft) is the sampled token (exact for deterministic drafts: speculator.py)."""
        assert pending.drafts is not None and pending.sample_rows is not None
        logprobs, position = pending.logprobs, 0
        for request_id, drafts in zip(pending.request_ids, pending.drafts, strict=True):
            num_drafts, accepted = len(drafts), 0
            while accepted < num_drafts and token_ids[position + accepted] == drafts[accepted]:
                accepted += 1
            output.sampled_token_ids[request_id] = token_ids[position + accepted]
            if num_drafts:
                output.accepted_draft_ids[request_id] = drafts[:accepted]
                self.sampling.num_outputs[pending.sample_rows[position]] += accepted
            elif logprobs is not None and logprobs[position] is not None:
                output.logprobs[request_id] = logprobs[position]
            position += num_drafts + 1

    def _uploads(self, layout: StepLayout, sample_tokens: np.ndarray, sample_rows: np.ndarray,
                 drafts: list[tuple[int, ...]] | None) -> StepUploads:
        uploads = StepUploads()
        if not np.array_equal(sample_tokens, np.arange(sample_tokens.size)):
            uploads.sample_tokens = sample_tokens
        if not self.async_scheduling:
            return uploads
        if drafts is not None:  # one entry per request (an index_copy_ with repeated rows keeps any of them)
            last = np.cumsum(np.fromiter((len(d) + 1 for d in drafts), dtype=np.int64, count=len(drafts))) - 1
            uploads.sample_last = last
            uploads.sample_rows = sample_rows[last]
        elif sample_rows.size:
            uploads.sample_rows = sample_rows
        placeholders = np.flatnonzero(layout.token_ids < 0)
        if placeholders.size:
            token_rows = layout.rows if layout.is_decode_only else np.repeat(layout.rows, np.diff(layout.query_start))
            uploads.placeholder_index = placeholders
            uploads.placeholder_rows = token_rows[placeholders]
        return uploads

    def _take_diffs(self, step_arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The block-table diffs (index, values) to ride with this step's upload of `step_arrays`.

        Diffs pile up between steps without bound (each abort that moves a row rewrites its whole
        table): when they do not fit beside the step's arrays in the staging buffer, they are
        uploaded and applied here first, in chunks, and the step's upload carries none."""
        index, values = self.batch.pending_diffs()
        room = self.stager.capacity - sum(int(a.size) for a in step_arrays)
        if 2 * index.size <= room:
            return index, values
        chunk = self.stager.capacity // 2
        for start in range(0, index.size, chunk):
            self.batch.apply_diffs(*self.stager.upload([index[start : start + chunk], values[start : start + chunk]]))
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty

    def _fill_placeholders(self, token_ids: torch.Tensor, views: dict[str, torch.Tensor]) -> None:
        """Replace placeholder input ids (uploaded, on the device) by the ids the previous step
        sampled for their rows; a no-op without placeholders."""
        index = views.get("placeholder_index")
        if index is not None:
            token_ids.index_copy_(0, index, self.last_sampled.index_select(0, views["placeholder_rows"]))

    def _forward(self, layout: StepLayout, uploads: StepUploads, hidden_in: torch.Tensor | None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Upload the step (with `uploads`) and run the model (from `hidden_in` on a later pipeline
        stage); returns hidden states and the device views of `uploads` by name."""
        num_rows = len(layout.requests)
        extra = uploads.arrays()
        if self.verify_as_decode and takes_decode_path(layout, self.verify_kv_budget):
            verified = self._forward_verify_decode(layout, uploads, extra, hidden_in)
            if verified is not None:
                return verified
        bucket = self._graph_bucket(layout)
        if bucket is not None:
            staged = pad_decode_inputs(layout.token_ids, layout.positions, layout.slot_mapping, layout.seq_lens, bucket)
            diff_index, diff_values = self._take_diffs([staged, *extra])
            index, values, inputs, *rest = self.stager.upload([diff_index, diff_values, staged.reshape(-1), *extra])
            views = uploads.bind(rest)
            self._fill_placeholders(inputs[:bucket], views)  # row 0 of [4, bucket]: the token ids
            self.batch.apply_diffs(index, values)
            assert self.graphs is not None
            self.step_times.graph_steps += 1
            replay_start = time.perf_counter()
            hidden = self.graphs.run(bucket, inputs.view(-1, bucket), hidden_in)
            if self.step_times.enabled:
                self.step_times.replay_s.append(time.perf_counter() - replay_start)
                self.step_times.prep_s.append(replay_start - self._launch_start)
            return hidden, views
        mixed = self.mixed_graphs
        token_bucket = mixed.bucket_for(layout.num_tokens) if mixed is not None and self.use_mixed_graphs else None
        if token_bucket is not None:
            assert mixed is not None
            staged = pack_mixed_inputs(layout.token_ids, layout.positions, layout.slot_mapping, layout.query_start,
                                       layout.seq_lens, layout.rows, token_bucket,
                                       slots_for(token_bucket, self.max_rows))
            diff_index, diff_values = self._take_diffs([staged, *extra])
            index, values, inputs, *rest = self.stager.upload([diff_index, diff_values, staged, *extra])
            views = uploads.bind(rest)
            self._fill_placeholders(inputs[:token_bucket], views)  # the token ids come first
            self.batch.apply_diffs(index, values)
            self.step_times.mixed_graph_steps += 1
            hidden = mixed.run(token_bucket, inputs, hidden_in)
            return hidden, views
        rows = [] if layout.rows_are_prefix else [layout.rows]
        step_arrays = [layout.token_ids, layout.positions, layout.slot_mapping, layout.query_start, layout.seq_lens,
                       *rows, *extra]
        uploaded = self.stager.upload([*self._take_diffs(step_arrays), *step_arrays])
        index, values, token_ids, positions, slots, query_start, seq_lens = uploaded[:7]
        views = uploads.bind(uploaded[7 + len(rows):])
        self._fill_placeholders(token_ids, views)
        self.batch.apply_diffs(index, values)
        table = self.batch.block_table_device
        block_tables = table[:num_rows] if not rows else table.index_select(0, uploaded[7])
        query_lens = np.diff(layout.query_start)
        metadata = AttentionMetadata(
            num_tokens=layout.num_tokens,
            num_requests=num_rows,
            query_start_loc=query_start,
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=slots,
            max_query_len=int(query_lens.max()),
            max_seq_len=int(layout.seq_lens.max()),
            query_lens_cpu=query_lens.tolist(),
            seq_lens_cpu=layout.seq_lens.tolist(),
        )
        self.step_times.eager_steps += 1
        hidden = self.model(token_ids, positions, self.kv_caches, metadata, hidden_in)
        return hidden, views

    def _forward_verify_decode(self, layout: StepLayout, uploads: StepUploads, extra: list[np.ndarray],
                               hidden_in: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """A decode-like verify step as one decode query per token (verify_decode.py): a verify
        graph, or eagerly without graphs; None (the caller takes the mixed path) when graphs are on
        and no verify graph fits."""
        seq_lens, rows = decode_rows(layout)
        times = self.step_times
        if self.use_cuda_graphs:
            graphs = self.verify_graphs
            bucket = bucket_for(layout.num_tokens, graphs.sizes) if graphs is not None else None
            if bucket is None:
                return None
            assert graphs is not None
            staged = pad_decode_inputs(layout.token_ids, layout.positions, layout.slot_mapping, seq_lens, bucket,
                                       rows)
            if staged.size + sum(a.size for a in extra) > self.stager.capacity:
                return None
            diff_index, diff_values = self._take_diffs([staged, *extra])
            index, values, inputs, *rest = self.stager.upload([diff_index, diff_values, staged.reshape(-1), *extra])
            views = uploads.bind(rest)
            self._fill_placeholders(inputs[:bucket], views)  # row 0 of [5, bucket]: the token ids
            self.batch.apply_diffs(index, values)
            times.graph_steps += 1
            times.verify_decode_steps += 1
            return graphs.run(bucket, inputs.view(-1, bucket), hidden_in), views
        step_arrays = [layout.token_ids, layout.positions, layout.slot_mapping, rows, *extra]
        if sum(a.size for a in step_arrays) > self.stager.capacity:
            return None
        uploaded = self.stager.upload([*self._take_diffs(step_arrays), *step_arrays])
        index, values, token_ids, positions, slots, rows_device = uploaded[:6]
        views = uploads.bind(uploaded[6:])
        self._fill_placeholders(token_ids, views)
        self.batch.apply_diffs(index, values)
        block_tables = self.batch.block_table_device.index_select(0, rows_device)  # [T, max_blocks]
        metadata = eager_metadata(layout, slots, positions, block_tables)
        times.eager_steps += 1
        times.verify_decode_steps += 1
        return self.model(token_ids, positions, self.kv_caches, metadata, hidden_in), views

    def _compute_prompt_logprobs(self, layout: StepLayout, hidden: torch.Tensor, output: ModelRunnerOutput) -> None:
        """Logprobs of prompt token p+1 at each prompt position p this step's chunk covers."""
        for i, req in enumerate(layout.requests):
            entry = self._prompt_logprobs.get(req.request_id)
            if entry is None:
                continue
            top_n, prompt = entry
            if req.start_position >= len(prompt):
                continue
            row = int(layout.query_start[i])
            first = req.start_position
            last = min(req.seq_len, len(prompt) - 1)  # the last prompt token predicts no prompt token
            entries: list[TokenLogprobs | None] = [None] if first == 0 else []
            if last > first:
                logits = self.model.compute_logits(hidden[row : row + last - first])
                targets = torch.tensor(prompt[first + 1 : last + 1], device=self.device)
                entries.extend(compute_prompt_logprobs(logits, targets, top_n))
            # entries[0] is prompt position 0 (None) or, past the first chunk, first + 1.
            output.prompt_logprobs[req.request_id] = PromptLogprobs(0 if first == 0 else first + 1, entries)


def _verify_rows(layout: StepLayout, sample_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ...]]]:
    """Sampling positions of a step with drafts: a sampling request with d drafts samples at its
    last d + 1 query tokens. Returns (token rows, persistent rows, drafts per sampling request).
    A loop over the requests: speculation runs only while requests x (1 + k) <= max_verify_tokens,
    so there are few, and a handful of list appends costs less than numpy's per-call overhead."""
    ends, rows = layout.query_start[1:].tolist(), layout.rows.tolist()
    token_rows: list[int] = []
    sample_rows: list[int] = []
    drafts: list[tuple[int, ...]] = []
    for request, end, row, sample in zip(layout.requests, ends, rows, sample_mask.tolist(), strict=True):
        if not sample:
            continue
        num_drafts = request.num_drafts
        token_rows.extend(range(end - 1 - num_drafts, end))
        sample_rows.extend([row] * (num_drafts + 1))
        drafts.append(request.token_ids[len(request.token_ids) - num_drafts:] if num_drafts else ())
    return np.array(token_rows, dtype=np.int64), np.array(sample_rows, dtype=np.int64), drafts


def _syncs_in_forward(model: torch.nn.Module) -> bool:
    """Models whose forward reads device values on the host (the MoE expert loop on CPU or with
    the fused kernels off) cannot be captured; the fused-MoE path on CUDA can."""
    return any(getattr(m, "syncs_in_forward", False) for m in model.modules())
