"""DraftModelProposer: drafts by running a smaller model greedily — a nested engine of our own.

Data flow: at start-up the draft's config is read without weights (vocabulary and layer count are
checked against the target's hf_config and tokenizer, which the engine's process holds at any TP),
its weights come on the target's device in the target's dtype — the target's own modules when the
draft is the target itself at TP 1 (self_draft.py: no second copy), else loaded (`draft_quantization`
applied by the loader) — and `draft_num_layers` keeps the first L decoder layers, the final norm and
the LM head (self-speculation). Its KV pool is checked against the device's free memory and a second
LLMEngine (workers/engine.py: scheduler, paged KV cache with prefix caching, runner; TP 1, synchronous)
is built around it. `propose_batch` adds one greedy request per target request (prompt = its tokens so
far, max_tokens = its k) and steps the nested engine until all finish: one batch, one draft step per
position; the prefix cache makes each call incremental (only the tail since the last call is
prefilled); nothing is held per request between calls. Under TP > 1 the draft still runs at TP 1 in
the engine's (driver's) process, on its device: the scheduler there asks for drafts before it
schedules the verify step, so a draft on the ranks would add a round trip per step and need every rank
to run it (TP-sharding a small draft buys little). Reusing our own engine rather than a second library
keeps one model code path, one KV cache and one quantization story for target and draft.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import psutil
import torch
from shardserve.workers.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from shardserve.workers.models.loader import LoadedModel, load_model
from shardserve.workers.request import SamplingParams
from shardserve.workers.runner.kv_budget import KVCacheLayout
from shardserve.workers.spec.proposer import DraftQuery, Proposer, TargetModel
from shardserve.workers.spec.self_draft import (
    parameter_bytes,
    shared_view,
    shares_target_weights,
    truncate_layers,
)

logger = logging.getLogger(__name__)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
GIB = float(1 << 30)
FREE_MEMORY_SHARE = 0.8  # of the free memory a default-sized draft KV pool may take (the rest: activations)


class DraftModelProposer(Proposer):
    batched = True

    def __init__(self, config: SpeculativeConfig, target: TargetModel) -> None:
        model_config = draft_model_config(config, target.config.model, target.loaded)
        device, dtype = target.loaded.device, target.loaded.dtype
        header = check_draft(config, target.config.model, target.loaded)
        num_layers = config.draft_num_layers
        self.shares_target_weights = shares_target_weights(model_config, target.config.model, target.loaded)
        if self.shares_target_weights:
            loaded = replace(header, model=shared_view(target.loaded.model))
        else:
            loaded = load_draft_weights(model_config, device, dtype)
        if num_layers is not None:
            loaded = truncate_layers(loaded, num_layers)
        logger.info("draft %s: %.1f MiB of weights of its own (%s the target's)", loaded.name,
                    parameter_bytes(loaded.model, exclude=target.loaded.model) / 2**20,
                    "sharing" if self.shares_target_weights else "not sharing")
        num_blocks = kv_pool_blocks(config.draft_num_blocks, target, loaded)
        engine_config = draft_engine_config(model_config, target, num_blocks)
        # No tokenizer: the draft's outputs are token ids only (no detokenizing per step).
        self.engine = target.engine_factory(engine_config, loaded=replace(loaded, tokenizer=None))
        self.max_model_len = self.engine.max_model_len
        self._ids = itertools.count()

    def propose(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, max_tokens: int,
                num_unknown: int = 0) -> list[int]:
        if num_unknown:  # the draft runs on accepted tokens only (its engine's KV follows them)
            raise ValueError("the draft model proposes after accepted tokens only: num_unknown must be 0")
        return self.propose_batch([DraftQuery(request_id, token_ids, num_prompt_tokens, max_tokens)])[0]

    def propose_batch(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        """Greedy drafts for every query, run as one batch in the nested engine."""
        engine = self.engine
        greedy_ids: dict[str, int] = {}  # nested request id -> query index
        for index, query in enumerate(queries):
            room = self.max_model_len - len(query.token_ids)
            max_tokens = min(query.max_tokens, room)
            if max_tokens <= 0:
                continue  # past the draft's context length: no drafts
            draft_id = f"{query.request_id}/{next(self._ids)}"
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, final_only=True)
            try:
                engine.add_request(draft_id, query.token_ids, params)
            except ValueError:
                continue  # a context the draft's pool cannot hold: no drafts for it
            greedy_ids[draft_id] = index
        drafts: list[list[int]] = [[] for _ in queries]
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in greedy_ids:
                    drafts[greedy_ids[out.request_id]] = list(out.outputs[0].token_ids)
        return drafts

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        """Nothing to free: every call runs to completion; its blocks stay in the prefix cache (LRU)."""

    def close(self) -> None:
        self.engine.shutdown()


def check_draft(config: SpeculativeConfig, target_model: ModelConfig, target: LoadedModel) -> LoadedModel:
    """The checks that need no weights, on the target's header (config and tokenizer; the engine
    runs them before it starts the target's ranks, the proposer again): the draft's vocabulary and
    layer count. Returns the draft's header (LoadedModel without a model)."""
    assert config.draft_model is not None  # SpeculativeConfig refuses method draft without it
    model_config = draft_model_config(config, target_model, target)
    header = load_model(model_config, target.device, target.dtype, weights=False)
    check_vocabulary(header, target)
    check_num_layers(config.draft_num_layers, header.hf_config)
    return header


def draft_model_config(config: SpeculativeConfig, model: ModelConfig, loaded: LoadedModel) -> ModelConfig:
    """The draft's weights on the target's device in the target's dtype (`model`, `loaded`: the target's).
    cpu_activations follows the target's as its engine resolved it: `float` stays float (a draft over the
    target's own layers must not switch them), `int8` becomes `auto` (int8 wherever the draft has layers
    on the quantized CPU kernels, as the target's shared layers already are; float for float weights)."""
    return ModelConfig(
        model=config.draft_model, dtype=_DTYPE_NAMES.get(loaded.dtype, "auto"), device=str(loaded.device),
        seed=model.seed, quantization=config.draft_quantization,
        quantization_group_size=model.quantization_group_size, gguf_cache_dir=model.gguf_cache_dir,
        cpu_activations="float" if model.cpu_activations == "float" else "auto")


def draft_engine_config(model_config: ModelConfig, target: TargetModel, num_blocks: int) -> EngineConfig:
    """The nested engine's config: the target's KV block size and batch limits; TP 1, synchronous
    steps, no speculation of its own."""
    cache = target.config.cache
    scheduler = target.config.scheduler
    parallel = replace(target.config.parallel, tensor_parallel_size=1, pipeline_parallel_size=1,
                       expert_parallel_size=1, pipeline_layer_partition=None, pipeline_micro_batches=None)
    return EngineConfig(
        model=model_config,
        cache=CacheConfig(block_size=cache.block_size, num_blocks=num_blocks, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=scheduler.max_num_seqs,
                                  max_num_batched_tokens=scheduler.max_num_batched_tokens,
                                  enable_chunked_prefill=True, async_scheduling=False),
        parallel=parallel,
    )


def check_vocabulary(draft: LoadedModel, target: LoadedModel) -> None:
    """Draft token ids must mean what they mean to the target: the same vocabulary size and, where
    both have a tokenizer, the same token -> id map."""
    draft_size, target_size = draft.hf_config.vocab_size, target.hf_config.vocab_size
    if draft_size != target_size:
        raise ValueError(f"draft_model {draft.name!r} has a vocabulary of {draft_size} tokens, the target "
                         f"{target.name!r} one of {target_size}: a draft must share the target's tokenizer")
    if draft.tokenizer is not None and target.tokenizer is not None \
            and draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ValueError(f"draft_model {draft.name!r} has another tokenizer than the target {target.name!r} "
                         f"(same size, {draft_size}, different token ids): a draft must share the target's tokenizer")


def check_num_layers(num_layers: int | None, hf_config: Any) -> None:
    total = int(hf_config.num_hidden_layers)
    if num_layers is not None and not 1 <= num_layers <= total:
        raise ValueError(f"draft_num_layers must be in [1, {total}] (the draft model's num_hidden_layers), "
                         f"got {num_layers}")


def load_draft_weights(model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    try:
        return load_model(model_config, device, dtype)
    except torch.OutOfMemoryError as error:
        raise ValueError(f"draft model {model_config.model!r} does not fit on {device}: its weights could not be "
                         f"allocated ({error}); pick a smaller draft_model or draft_quantization") from None


def kv_pool_blocks(requested: int | None, target: TargetModel, loaded: LoadedModel) -> int:
    """The draft's KV pool in blocks: `requested` if the device's free memory (after the draft's
    weights) holds it; null = the target's block count, or what FREE_MEMORY_SHARE of the free memory
    holds if less (a GPU the target's pool already fills), at least one full-length context."""
    device, block_size = loaded.device, target.config.cache.block_size
    per_block = KVCacheLayout.of_model(loaded.model, block_size).bytes_per_block
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    hint = "lower cache.gpu_memory_utilization to leave it room, or " if device.type == "cuda" else ""
    if requested is not None:
        if requested * per_block > free:
            raise ValueError(f"the draft model does not fit: its KV pool of {requested} blocks needs "
                             f"{requested * per_block / GIB:.2f} GiB, {free / GIB:.2f} GiB of {device} memory are "
                             f"free after its weights; {hint}lower speculative.draft_num_blocks")
        return requested
    num_blocks = int(free * FREE_MEMORY_SHARE) // per_block
    if num_blocks >= target.num_blocks:
        return target.num_blocks
    needed = -(-min(target.loaded.max_model_len, loaded.max_model_len) // block_size) + 1
    if num_blocks < needed:
        raise ValueError(f"the draft model does not fit: {free / GIB:.2f} GiB of {device} memory are free after "
                         f"its weights, room for {num_blocks} KV blocks of {per_block} bytes, fewer than one "
                         f"full-length context needs ({needed}); {hint}pick a smaller draft")
    return num_blocks
