"""ModelRunner: owns the model, its paged KV cache and the sampler on one device.

One call per engine step: `execute(scheduler_output)`
  1. updates the per-request state (new requests in, finished/preempted ones out),
  2. builds flat inputs + attention metadata (runner/inputs.py),
  3. runs the model over every scheduled token,
  4. computes logits only for the rows that need them — each sampling request's last token,
     and the prompt positions of requests that asked for prompt logprobs —
  5. samples all sampling rows in one vectorised call and returns a ModelRunnerOutput.
The runner keeps its own copy of each request's output ids (for penalties) and appends what
it samples; the scheduler does the same on its side, so nothing is re-sent per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from shardserve.workers.config import EngineConfig
from shardserve.workers.models.loader import LoadedModel
from shardserve.workers.request import SamplingParams
from shardserve.workers.runner.inputs import build_model_inputs
from shardserve.workers.runner.kv_budget import KVCacheSpec, allocate_kv_caches, determine_num_blocks
from shardserve.workers.runner.output import ModelRunnerOutput, TokenLogprobs
from shardserve.workers.sampling.logprobs import compute_prompt_logprobs
from shardserve.workers.sampling.metadata import SamplingMetadata
from shardserve.workers.sampling.sampler import Sampler
from shardserve.workers.scheduler.output import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, device: torch.device) -> None:
        self.model = loaded.model
        self.device = device
        self.block_size = config.cache.block_size
        self.eos_token_id = loaded.eos_token_ids[0] if loaded.eos_token_ids else None
        self.vocab_size = loaded.hf_config.vocab_size
        self.sampler = Sampler(self.vocab_size, seed=config.model.seed)
        spec = KVCacheSpec.of_model(self.model, self.block_size)
        self.kv_bytes_per_token = spec.bytes_per_block // self.block_size
        self.num_blocks = determine_num_blocks(spec, config, device, self._profile_forward)
        self.kv_caches = allocate_kv_caches(spec, self.num_blocks, device)
        self._requests: dict[str, _RequestState] = {}
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                    spec.bytes_per_block * self.num_blocks / 2**20)

    def _profile_forward(self, num_tokens: int) -> None:
        """One forward of `num_tokens` prompt tokens with no KV cache, to measure peak activations."""
        from shardserve.workers.scheduler.output import ScheduledRequest

        spec = KVCacheSpec.of_model(self.model, self.block_size)
        num_blocks = -(-num_tokens // self.block_size) + 1
        caches = allocate_kv_caches(spec, num_blocks, self.device)
        req = ScheduledRequest("profile", tuple([0] * num_tokens), 0, tuple(range(1, num_blocks)), True)
        sched = SchedulerOutput(new_requests=(), scheduled=(req,), num_batched_tokens=num_tokens)
        inputs = build_model_inputs(sched, self.block_size, self.device)
        with torch.inference_mode():
            hidden = self.model(inputs.input_ids, inputs.positions, caches, inputs.attn_metadata)
            self.model.compute_logits(hidden[-1:])
        del caches

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in (*sched.finished_request_ids, *sched.preempted_request_ids):
            self._requests.pop(request_id, None)
        for new in sched.new_requests:
            self._requests[new.request_id] = _RequestState(
                list(new.prompt_token_ids), list(new.output_token_ids), new.sampling_params
            )
        if sched.is_empty:
            return ModelRunnerOutput()

        inputs = build_model_inputs(sched, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_metadata)
        # [num_tokens, hidden_size]

        output = ModelRunnerOutput()
        self._prompt_logprobs(sched, hidden, output)

        sample_ids = [r.request_id for r in sched.scheduled if r.sample]
        if not sample_ids:
            return output
        rows = [row for r, row in zip(sched.scheduled, inputs.last_token_rows, strict=True) if r.sample]
        logits = self.model.compute_logits(hidden[rows])  # [num_sampling, vocab_size] float32
        states = [self._requests[i] for i in sample_ids]
        metadata = SamplingMetadata.build(
            params=[s.params for s in states],
            prompt_token_ids=[s.prompt_token_ids for s in states],
            output_token_ids=[s.output_token_ids for s in states],
            eos_token_id=self.eos_token_id,
            device=self.device,
        )
        sampled = self.sampler(logits, metadata)
        token_ids = sampled.token_ids.tolist()
        for request_id, state, token_id, logprobs in zip(sample_ids, states, token_ids, sampled.logprobs, strict=True):
            state.output_token_ids.append(token_id)
            output.sampled_token_ids[request_id] = token_id
            if logprobs is not None:
                output.logprobs[request_id] = logprobs
        return output

    def _prompt_logprobs(self, sched: SchedulerOutput, hidden: torch.Tensor, output: ModelRunnerOutput) -> None:
        """Logprobs of prompt token p+1 at each prompt position p this step's chunk covers."""
        row = 0
        for req in sched.scheduled:
            state = self._requests[req.request_id]
            top_n = state.params.prompt_logprobs
            num_prompt = len(state.prompt_token_ids)
            if top_n is not None and req.start_position < num_prompt:
                first = req.start_position
                last = min(req.seq_len, num_prompt - 1)  # the last prompt token predicts no prompt token
                entries: list[TokenLogprobs | None] = [None] if first == 0 else []
                if last > first:
                    logits = self.model.compute_logits(hidden[row : row + last - first])
                    targets = torch.tensor(state.prompt_token_ids[first + 1 : last + 1], device=self.device)
                    entries.extend(compute_prompt_logprobs(logits, targets, top_n))
                output.prompt_logprobs[req.request_id] = entries
            row += req.num_tokens
