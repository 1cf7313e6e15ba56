"""Shared helpers of the multi-process tests: tiny checkpoints, engine runs, comparisons.

`write_checkpoint(name, folder)` saves a tiny random Hugging Face model (safetensors) of one of
the shapes below, shaped to stress sharding: a vocab that does not divide the TP padding, fewer
KV heads than TP ranks (replication), 4 layers to split across stages, MoE layers with expert
counts that split across EP ranks. `generate(config, prompts)` runs an LLMEngine (in-process or
multi-process, whatever `config.parallel` says) to completion with greedy sampling and top-20
logprobs of every sampled and prompt position, and `assert_same_outputs` checks two runs give
identical tokens and logprobs within `atol`. `engine_config` pins `cpu_activations: float`: int8
activations round each row to int8, so the ulp-level summation-order differences between a sharded
and a whole matmul can flip a rounding and move logprobs by ~1e-2 (measured 3e-4 to 3e-2 on the
quantized cases), far past `atol`; exactness of the sharding is a float property.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

COMMON = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=512, initializer_range=0.1,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
NUM_LOGPROBS = 20


def tiny_config(name: str) -> PretrainedConfig:
    if name == "llama":  # vocab 250: padded to 256 at TP 2; 1 KV head: replicated at TP 2; tied head
        return LlamaConfig(**COMMON, vocab_size=250, num_hidden_layers=4, num_key_value_heads=1,
                           intermediate_size=128, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    if name == "qwen3":
        return Qwen3Config(**COMMON, vocab_size=256, num_hidden_layers=4, num_key_value_heads=2, head_dim=32,
                           intermediate_size=128, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
    if name == "mixtral":
        return MixtralConfig(**COMMON, vocab_size=256, num_hidden_layers=2, num_key_value_heads=2,
                             intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                             tie_word_embeddings=False, architectures=["MixtralForCausalLM"])
    if name == "qwen3_moe":  # 6 experts: 3 per EP rank; layer 1 is dense
        return Qwen3MoeConfig(**COMMON, vocab_size=256, num_hidden_layers=2, num_key_value_heads=2,
                              intermediate_size=96, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                              norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
                              tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"])
    raise ValueError(f"unknown tiny model {name!r}")


def write_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    """A perturbed random HF model saved with save_pretrained (safetensors) into `folder`."""
    torch.manual_seed(seed)
    config = tiny_config(name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # norms not 1, so a misloaded tensor shows
    model.save_pretrained(folder)
    return folder


def engine_config(model: Path | str, tp: int = 1, pp: int = 1, ep: int = 1, **parallel: object) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=str(model), dtype="float32", device="cpu", cpu_activations="float"),
        cache=CacheConfig(block_size=4, num_blocks=64),
        parallel=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, expert_parallel_size=ep,
                                collective_timeout_s=60.0, step_timeout_s=120.0, **parallel),
    )


def make_prompts(vocab_size: int, lengths: tuple[int, ...] = (5, 11, 23), seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"p{i}": [rng.randrange(vocab_size) for _ in range(n)] for i, n in enumerate(lengths)}


@dataclass(frozen=True)
class RunResult:
    token_ids: dict[str, tuple[int, ...]]
    logprobs: dict[str, list[dict[int, float]]]  # per sampled position: token -> logprob
    prompt_logprobs: dict[str, list[dict[int, float]]]


def run_engine(engine: LLMEngine, prompts: dict[str, list[int]], max_tokens: int = 8,
               logprobs: bool = True) -> RunResult:
    """Greedy, ignore_eos; with `logprobs`, the top-NUM_LOGPROBS of every sampled and prompt position."""
    num = NUM_LOGPROBS if logprobs else None
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=num, prompt_logprobs=num)
    for request_id, token_ids in prompts.items():
        engine.add_request(request_id, token_ids, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1, "KV blocks leaked"
    return RunResult(
        token_ids={k: v.outputs[0].token_ids for k, v in finals.items()},
        logprobs={k: [{t: lp.logprob for t, lp in pos.items()} for pos in v.outputs[0].logprobs or []]
                  for k, v in finals.items()},
        prompt_logprobs={k: [{t: lp.logprob for t, lp in pos.items()} for pos in v.prompt_logprobs or [] if pos]
                         for k, v in finals.items()},
    )


def generate(config: EngineConfig, prompts: dict[str, list[int]], max_tokens: int = 8) -> RunResult:
    engine = LLMEngine(config)
    try:
        return run_engine(engine, prompts, max_tokens)
    finally:
        engine.shutdown()


def single_process(config: EngineConfig) -> EngineConfig:
    return replace(config, parallel=ParallelConfig())


def _assert_close_positions(name: str, want: list[dict[int, float]], got: list[dict[int, float]], atol: float) -> None:
    assert len(want) == len(got), f"{name}: {len(got)} positions, expected {len(want)}"
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        common = set(w) & set(g)
        # Top-20 sets may differ only by near-ties at the boundary.
        assert len(common) >= NUM_LOGPROBS - 1, f"{name}[{i}]: top tokens differ: {sorted(w)} vs {sorted(g)}"
        worst = max(abs(w[t] - g[t]) for t in common)
        assert worst <= atol, f"{name}[{i}]: logprobs differ by {worst:.3g} > {atol}"


def assert_same_outputs(want: RunResult, got: RunResult, atol: float = 1e-4) -> None:
    assert got.token_ids == want.token_ids, f"tokens differ:\n{got.token_ids}\nexpected\n{want.token_ids}"
    for request_id in want.token_ids:
        _assert_close_positions(f"{request_id} logprobs", want.logprobs[request_id], got.logprobs[request_id], atol)
        _assert_close_positions(f"{request_id} prompt logprobs", want.prompt_logprobs[request_id],
                                got.prompt_logprobs[request_id], atol)


def spawn_ranks(fn: object, world_size: int, tp: int, pp: int, ep: int | None = None,
                timeout_s: float = 120.0) -> list[object]:
    """Run `fn(state) -> result` on world_size gloo ranks (init_parallel each); results by rank.

    `fn` must be importable (a module-level function) since ranks are spawned processes.
    """
    import multiprocessing as mp

    from shardserve.workers.worker.executor import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world_size, tp, pp, ep, port, queue), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    try:
        results = dict(queue.get(timeout=timeout_s) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    errors = [r for r in results.values() if isinstance(r, str) and r.startswith("Traceback")]
    assert not errors, "\n".join(errors)
    return [results[r] for r in range(world_size)]


def _rank_main(fn, rank: int, world_size: int, tp: int, pp: int, ep: int | None, port: int, queue) -> None:
    import traceback

    from shardserve.parallel.state import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    try:
        state = init_parallel(rank, world_size, tp, pp, ep, master_port=port, backend="gloo", timeout_s=60)
        queue.put((rank, fn(state)))
        destroy_parallel()
    except Exception:
        queue.put((rank, traceback.format_exc()))
