"""`shardserve bench latency --speculative-method M`: batch-1 decode with speculation beside the plain engine.

Data flow: the same engine config is built twice, without and with `speculative` (method, k,
...). Each engine warms up on one short request, then runs each task of spec_tasks.py alone
(batch 1, greedy, up to --output-len tokens, stopping at EOS as a user's request would). Method
`suffix` gets a repeated-task trace (SuffixDecoding's setting: agentic / repetitive traffic where
the same tasks come back): both engines first run every task once, unmeasured, as the earlier
requests whose outputs the suffix cache holds, then run them again measured. Per task:
decode tokens/s = (output tokens - 1) / (last token time - first token time), both engines; the
speedup is their ratio. Wall time is meaningless on a loaded machine, so each task's CPU time
(time.process_time, prefill included) per output token is printed beside it, and its ratio. The speculating engine's statistics give the acceptance rate (accepted /
proposed draft tokens) and the mean accepted length (tokens per verify step per request). The
outputs must be identical (greedy): the table says so per task. Method `draft` takes --draft-model,
--draft-quantization, --draft-num-layers and --draft-num-blocks (SpeculativeConfig's draft_* fields).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, replace

import torch
from shardserve.workers.bench.device import device_name
from shardserve.workers.bench.spec_tasks import task_prompts
from shardserve.workers.config import EngineConfig, SpeculativeConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams


class SpecStartupError(ValueError):
    """The speculating engine refused to start (e.g. a draft model with another vocabulary)."""


def speculative_config(args: argparse.Namespace) -> SpeculativeConfig:
    return SpeculativeConfig(speculative_method=args.speculative_method,
                             num_speculative_tokens=args.num_speculative_tokens,
                             prompt_lookup_max=args.prompt_lookup_max, max_verify_tokens=args.max_verify_tokens,
                             draft_model=getattr(args, "draft_model", None),
                             draft_quantization=getattr(args, "draft_quantization", None),
                             draft_num_layers=getattr(args, "draft_num_layers", None),
                             draft_num_blocks=getattr(args, "draft_num_blocks", None))


def repeats_tasks(spec: SpeculativeConfig) -> bool:
    """Does the bench give this method a repeated-task trace (each task seen once before it is measured)?"""
    return spec.speculative_method == "suffix"


def _run_tasks(engine: LLMEngine, prompts: dict[str, list[int]], output_len: int, repeat: bool) -> dict[str, dict]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, final_only=True)
    _generate(engine, "warmup", prompts[next(iter(prompts))][:16], SamplingParams(temperature=0.0, max_tokens=8))
    if repeat:  # the earlier requests of the trace: the same tasks, unmeasured
        for name, prompt in prompts.items():
            _generate(engine, f"{name}-earlier", prompt, params)
    results = {}
    for name, prompt in prompts.items():
        cpu_start = time.process_time()
        final = _generate(engine, name, prompt, params)
        cpu_s = time.process_time() - cpu_start
        metrics = final.metrics
        tokens = final.outputs[0].token_ids
        span = (metrics.last_token_time or 0) - (metrics.first_token_time or 0)
        results[name] = {"output_tokens": len(tokens), "token_ids": list(tokens),
                         "decode_tokens_per_s": (len(tokens) - 1) / span if span > 0 else float("nan"),
                         "cpu_ms_per_token": cpu_s * 1e3 / max(1, len(tokens))}
    return results


def _generate(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams):
    engine.add_request(request_id, prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    assert final is not None
    return final


def run_speculative_bench(config: EngineConfig, args: argparse.Namespace) -> dict:
    spec = speculative_config(args)
    runs, stats = {}, None
    for label, engine_config in (("plain", config), ("speculative", replace(config, speculative=spec))):
        try:
            engine = LLMEngine(engine_config)
        except ValueError as exc:  # start-up refusals (a draft model's vocabulary, size, layers)
            raise SpecStartupError(str(exc)) from exc
        try:
            prompts = task_prompts(engine.tokenizer, engine.loaded.hf_config.vocab_size)
            runs[label] = _run_tasks(engine, prompts, args.output_len, repeats_tasks(spec))
            device = device_name(engine.loaded.device)
            if label == "speculative":
                stats = engine.stats().spec_decode
        finally:
            engine.shutdown()
            # Free its KV pool before the next engine sizes its own from the card's memory (a GPU
            # pool is most of the card; peak memory would count the old one and leave no room).
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    assert stats is not None
    rows = []
    print(f"\n{'task':<12} {'tokens':>7} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'same output':>12} "
          f"{'CPU ms/tok plain':>17} {'spec':>6} {'CPU speedup':>12}")
    for name, plain in runs["plain"].items():
        fast = runs["speculative"][name]
        speedup = fast["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
        cpu_speedup = plain["cpu_ms_per_token"] / fast["cpu_ms_per_token"]
        same = fast["token_ids"] == plain["token_ids"]
        rows.append({"task": name, "plain": plain["decode_tokens_per_s"], "speculative": fast["decode_tokens_per_s"],
                     "speedup": speedup, "output_tokens": plain["output_tokens"], "identical": same,
                     "cpu_ms_per_token_plain": plain["cpu_ms_per_token"],
                     "cpu_ms_per_token_speculative": fast["cpu_ms_per_token"], "cpu_speedup": cpu_speedup})
        print(f"{name:<12} {plain['output_tokens']:>7} {plain['decode_tokens_per_s']:>12.1f} "
              f"{fast['decode_tokens_per_s']:>11.1f} {speedup:>7.2f}x {'yes' if same else 'NO':>12} "
              f"{plain['cpu_ms_per_token']:>17.1f} {fast['cpu_ms_per_token']:>6.1f} {cpu_speedup:>11.2f}x")
    mean = statistics.geometric_mean([r["speedup"] for r in rows])
    cpu_mean = statistics.geometric_mean([r["cpu_speedup"] for r in rows])
    draft = (f" (draft {spec.draft_model}" + (f", {spec.draft_num_layers} layers" if spec.draft_num_layers else "")
             + (f", {spec.draft_quantization}" if spec.draft_quantization else "") + ")") if spec.draft_model else ""
    trace = ", repeated-task trace (each task seen once before)" if repeats_tasks(spec) else ""
    print(f"speculative {spec.speculative_method}{draft}{trace}, k = {spec.num_speculative_tokens}: speedup {mean:.2f}x "
          f"(geometric mean), acceptance {stats.acceptance_rate:.0%}, mean accepted length "
          f"{stats.mean_accepted_length:.2f} tokens per verify step; CPU-time speedup {cpu_mean:.2f}x (the "
          f"process's CPU time per output token, prefill included; robust to other tenants); device: {device}")
    return {"device": device, "model": config.model.model, "speculative": asdict(spec), "tasks": rows,
            "repeated_task_trace": repeats_tasks(spec),
            "speedup_geomean": mean, "cpu_speedup_geomean": cpu_mean, "spec_decode": asdict(stats) | {"acceptance_rate": stats.acceptance_rate,
                                                                      "mean_accepted_length": stats.mean_accepted_length}}
