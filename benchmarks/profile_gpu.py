"""Kernel-time profile of engine steps: where a step's device time goes, by kernel and category.

Each case builds its batch through the public engine API (add_request / step / abort_request):
requests with the case's prompt lengths are queued and the engine steps until every one is
decoding; then `--warmup` steps run (compiles eager kernels), `--timed` steps are timed without
the profiler, and `--steps` steps run under `torch.profiler` (CPU + CUDA activities on a GPU,
CPU only on CPU). Dense cases (default `dummy:llama-3.1-8b`):
  b1 / b1_eager  one request decoding at ~150 tokens of context, CUDA graphs on (as served) / off
  decode400      400 requests decoding at ~400 tokens of context
  mixed          500 requests decoding + 5 new prompts of 220 tokens in every step (~1,600
                 tokens): before each step the 5 oldest requests are aborted and 5 prompts added
MoE models (e.g. `--model dummy:qwen3-30b-a3b --num-layers 24`, which fits one 80 GB GPU):
b1, decode64, decode256 (~400 context) and the same mixed step. `--small` scales every case
down (a few requests, short prompts) for the CPU smoke test.

Per case (printed, and in `<out>/profile_gpu.json`): engine.step() wall time (median over the
profiled steps, and over the timed steps without the profiler), device kernel time and kernel
count per batch (with async scheduling a step launches one batch, so per batch = per step), the
GPU time of the batch from the runner's CUDA events, the decode floor (bytes read / copy
bandwidth, decode-only cases), kernel time by category (CATEGORY_RULES in
benchmarks/kernel_profile.py) and the top 15 kernels. Kernels replayed from CUDA graphs are counted when CUPTI reports them (it does on
recent drivers; a graph case with only a handful of kernels per step means it did not). On CPU
the "kernels" are the aten ops, each with its self CPU time. `--traces` also writes a Chrome
trace per case (large files). The last printed lines are a compact table with the device name.

Run on a GPU machine, from the repo root (the working tree imported as `shardserve.*` without
installing it):
    mkdir -p /tmp/ns/shardserve && for d in cluster workers parallel; do
        ln -sfn "$PWD/$d" /tmp/ns/shardserve/$d; done
    PYTHONPATH=/tmp/ns python3 benchmarks/profile_gpu.py --out "$OUT"
    PYTHONPATH=/tmp/ns python3 benchmarks/profile_gpu.py --out "$OUT/moe" --model dummy:qwen3-30b-a3b --num-layers 24
CPU smoke: `python benchmarks/profile_gpu.py --device cpu --model dummy:tiny-llama --out /tmp/p --small`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from kernel_profile import (
    CATEGORIES,
    CATEGORY_RULES,
    MOE_ROUTING,
    SAMPLER_RANGE,
    activities,
    profiled_kernels,
    summarize,
)
from shardserve.workers.bench.device import copy_bandwidth, device_name
from shardserve.workers.bench.runs import decode_bytes_per_step
from shardserve.workers.bench.workload import Workload
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.models.dummy import DUMMY_SHAPES, dummy_config
from shardserve.workers.models.loader import DUMMY_PREFIX
from shardserve.workers.request import SamplingParams
from torch.profiler import profile, record_function

# Kernel events, categories (CATEGORY_RULES) and the per-step summary: benchmarks/kernel_profile.py.
_SEEDS = itertools.count()  # every batch of prompts its own seed: no prefix-cache hits across cases

@dataclass(frozen=True)
class Case:
    name: str
    decode_rows: int  # requests decoding in every profiled step
    context: int  # their mean context (tokens) during the profiled steps
    prefill_prompts: int = 0  # new prompts joining every step (mixed)
    prefill_len: int = 0
    graphs: bool = True  # CUDA graphs as the engine uses them by default


def default_cases(is_moe: bool, small: bool) -> list[Case]:
    if small:  # the CPU smoke: same case names, a few short requests
        rows = [("decode64", 4), ("decode256", 8)] if is_moe else [("decode400", 8)]
        eager = [] if is_moe else [Case("b1_eager", 1, 24, graphs=False)]
        return [Case("b1", 1, 24), *eager, *(Case(n, r, 40) for n, r in rows), Case("mixed", 8, 32, 2, 24)]
    if is_moe:
        return [Case("b1", 1, 150), Case("decode64", 64, 400), Case("decode256", 256, 400),
                Case("mixed", 500, 300, 5, 220)]
    return [Case("b1", 1, 150), Case("b1_eager", 1, 150, graphs=False), Case("decode400", 400, 400),
            Case("mixed", 500, 300, 5, 220)]


def with_num_layers(model: str, num_layers: int) -> str:
    """Register the dummy shape `<shape>-<n>l` (the named shape with n decoder layers) in the
    loader's shape table and return its model name; everything else about the shape is kept."""
    if not model.startswith(DUMMY_PREFIX):
        raise SystemExit("--num-layers applies to dummy:<shape> models only")
    shape = model[len(DUMMY_PREFIX):]
    base = dummy_config(shape).to_dict()
    base["num_hidden_layers"] = num_layers
    base.pop("layer_types", None)  # per-layer list: rebuilt for the new depth
    config_class = type(dummy_config(shape))
    name = f"{shape}-{num_layers}l"
    DUMMY_SHAPES[name] = lambda: config_class.from_dict(dict(base))
    return DUMMY_PREFIX + name


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    """The single-process engine's config from the command line (profile_tp.py adds its parallel sizes)."""
    on_cuda = args.device == "cuda"
    async_scheduling = {"auto": None, "on": True, "off": False}[args.async_scheduling]
    return EngineConfig(
        model=ModelConfig(model=model, dtype="bfloat16" if on_cuda else "auto", device=args.device,
                          quantization=args.quantization),
        cache=CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization,
                          cpu_kv_cache_bytes=(64 << 20) if args.small else (1 << 30)),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  async_scheduling=async_scheduling),
    )


def build_engine(args: argparse.Namespace, model: str) -> LLMEngine:
    return LLMEngine(engine_config(args, model))


def decode_floor_ms(engine: LLMEngine, rows: int, context: float, bandwidth: float, is_moe: bool) -> float:
    """Bytes a decode step must read / copy bandwidth (bench/runs.py's count). An MoE's expert
    weights count at the share of experts `rows` tokens touch under uniform routing,
    1 - (1 - k/E)^rows (the dummy routers are near uniform): an estimate, not a bound."""
    num_bytes = decode_bytes_per_step(engine, rows, context)
    if is_moe:
        hf_config = engine.loaded.hf_config
        num_experts = getattr(hf_config, "num_experts", 0) or hf_config.num_local_experts
        touched = 1 - (1 - hf_config.num_experts_per_tok / num_experts) ** rows
        expert_bytes = sum(p.numel() * p.element_size() for n, p in engine.runner.model.named_parameters()
                           if ".experts." in n)
        num_bytes -= expert_bytes * (1 - touched)
    return num_bytes / bandwidth * 1e3


def sync(engine: LLMEngine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


class CaseDriver:
    """Builds a case's batch through the engine API and keeps it steady step after step."""

    def __init__(self, engine: LLMEngine, case: Case, steps_ahead: int) -> None:
        self.engine, self.case = engine, case
        self.vocab_size = engine.loaded.hf_config.vocab_size
        self.ids: list[str] = []  # oldest first: the mixed case aborts from the front
        # Prompts start short of the target so the context is on target mid-profile.
        prompt_len = max(1, case.context - steps_ahead)
        self.max_tokens = max(1, min(4096, engine.max_model_len - max(prompt_len, case.prefill_len) - 1))
        self.add(case.decode_rows + case.prefill_prompts, prompt_len)

    def add(self, num: int, prompt_len: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=self.max_tokens, ignore_eos=True, final_only=True)
        seed = next(_SEEDS)
        for i, request in enumerate(Workload(num, prompt_len, 1, seed=seed).sample(self.vocab_size)):
            request_id = f"{self.case.name}-{seed}-{i}"
            self.engine.add_request(request_id, request.prompt_token_ids, params)
            self.ids.append(request_id)

    def wait_until_decoding(self, max_steps: int = 1000) -> None:
        """Step until every request has its first token (its prompt is done: it now decodes)."""
        requests = self.engine.scheduler.requests
        for _ in range(max_steps):
            if all(r in requests and requests[r].num_output_tokens >= 1 for r in self.ids):
                return
            self.engine.step()
        raise RuntimeError(f"{self.case.name}: requests still prefilling after {max_steps} steps")

    def before_step(self) -> None:
        """Mixed case: the oldest requests leave, as many fresh prompts join this step."""
        num = self.case.prefill_prompts
        if num:
            for request_id in self.ids[:num]:
                self.engine.abort_request(request_id)
            del self.ids[:num]
            self.add(num, self.case.prefill_len)

    def step(self) -> float:
        self.before_step()
        start = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - start

    def mean_context(self) -> float:
        requests = self.engine.scheduler.requests
        decoding = [requests[r].num_tokens for r in self.ids if r in requests and requests[r].num_output_tokens]
        return statistics.fmean(decoding) if decoding else 0.0

    def drain(self) -> None:
        for request_id in self.ids:
            self.engine.abort_request(request_id)
        while self.engine.has_unfinished_requests():
            self.engine.step()


class _RangedSampler:
    """The runner's sampler inside a profiler range, so its kernels can be told apart."""

    def __init__(self, sampler: Callable) -> None:
        self.sampler = sampler

    def __call__(self, *args, **kwargs):
        with record_function(SAMPLER_RANGE):
            return self.sampler(*args, **kwargs)


def run_case(engine: LLMEngine, case: Case, args: argparse.Namespace, is_moe: bool, bandwidth: float) -> dict:
    runner = engine.runner
    on_cuda = runner.device.type == "cuda"
    runner.set_cuda_graphs(case.graphs)
    driver = CaseDriver(engine, case, args.warmup + args.timed + args.steps // 2 + 2)
    preemptions = engine.stats().num_preemptions
    try:
        driver.wait_until_decoding()
        for _ in range(args.warmup):
            driver.step()
        times = runner.step_times
        times.clear()
        times.enabled = True
        unprofiled = [driver.step() for _ in range(args.timed)]
        sync(engine)
        gpu_event_s = list(times.gpu_s)
        times.clear()
        context = driver.mean_context()
        sampler, runner.sampler = runner.sampler, _RangedSampler(runner.sampler)
        try:
            with profile(activities=activities(on_cuda)) as prof:
                walls = [driver.step() for _ in range(args.steps)]
                sync(engine)  # the last launched batch's kernels finish inside the window
        finally:
            runner.sampler = sampler
            times.enabled = False
        rows, tokens = list(times.rows), list(times.tokens)
        counts = {"graph": times.graph_steps, "mixed_graph": times.mixed_graph_steps, "eager": times.eager_steps}
        context = (context + driver.mean_context()) / 2
    finally:
        driver.drain()
        runner.set_cuda_graphs(True)
    result = {**asdict(case), "cuda_graphs_used": on_cuda and case.graphs and runner.graphs is not None,
              "mean_context": context, "profiled_steps": args.steps, "batches": len(rows), "rows_per_batch": rows,
              "tokens_per_batch": tokens, "batch_kinds": counts,
              "preemptions": engine.stats().num_preemptions - preemptions,
              "step_wall_ms": statistics.median(walls) * 1e3,
              "step_wall_unprofiled_ms": statistics.median(unprofiled) * 1e3,
              "gpu_event_ms": statistics.median(gpu_event_s) * 1e3 if gpu_event_s else None,
              "floor_ms": None}
    if not case.prefill_prompts:  # decode only: every weight + the KV cache once per step
        result["floor_ms"] = decode_floor_ms(engine, case.decode_rows, context, bandwidth, is_moe)
    result.update(summarize(profiled_kernels(prof, on_cuda), len(rows), is_moe))
    result["trace"] = None
    if args.traces:
        result["trace"] = os.path.join(args.out, f"trace_{case.name}.json")
        prof.export_chrome_trace(result["trace"])
    return result


SHORT = {"gemm": "gemm", "attention": "attn", "moe": "moe", "norm": "norm", "rotary/kv-write": "rope/kv",
         "activation": "act", "sampling/logits": "sample", "communication": "comm", "memcpy/memset": "copy",
         "other": "other"}


def print_case(r: dict) -> None:
    tokens = statistics.fmean(r["tokens_per_batch"]) if r["tokens_per_batch"] else 0
    print(f"\n-- {r['name']}: {r['decode_rows']} decoding (context {r['mean_context']:.0f}) + {r['prefill_prompts']} "
          f"x {r['prefill_len']}-token prompts, {tokens:.0f} tokens/batch, graphs {r['cuda_graphs_used']}, "
          f"batches {r['batch_kinds']}, preemptions {r['preemptions']}")
    gpu = f"{r['gpu_event_ms']:.2f}" if r["gpu_event_ms"] is not None else "n/a"
    floor = f", floor {r['floor_ms']:.2f} ms" if r["floor_ms"] is not None else ""
    print(f"   step wall {r['step_wall_ms']:.2f} ms profiled / {r['step_wall_unprofiled_ms']:.2f} ms not; GPU events "
          f"{gpu} ms; kernels {r['kernel_ms_per_step']:.3f} ms in {r['kernels_per_step']:.0f} per step{floor}")
    total = r["kernel_ms_per_step"] or 1.0
    for category, ms in sorted(r["categories_ms_per_step"].items(), key=lambda kv: -kv[1]):
        if ms:
            print(f"   {category:<16} {ms:>9.3f} ms {ms / total:>6.1%}")
    print_top_kernels(r)


def print_top_kernels(r: dict) -> None:
    """The top-kernel table of a `summarize` result."""
    print(f"   {'top kernels':<70} {'category':>8} {'n/step':>7} {'mean us':>9} {'ms/step':>8} {'share':>6}")
    for k in r["top_kernels"]:
        name = k["name"] if len(k["name"]) <= 70 else k["name"][:67] + "..."
        print(f"   {name:<70} {SHORT[k['category']]:>8} {k['count_per_step']:>7.1f} {k['mean_us']:>9.1f} "
              f"{k['ms_per_step']:>8.3f} {k['share']:>6.1%}")


def print_table(summary: dict) -> None:
    print(f"\n==== {summary['device']} | {summary['model']} | async scheduling {summary['async_scheduling']} | "
          f"copy {summary['copy_bandwidth'] / 1e9:.0f} GB/s | ms per step")
    head = "".join(f"{SHORT[c]:>8}" for c in CATEGORIES)
    print(f"{'case':<10}{'rows':>5}{'tok':>6}{'wall':>8}{'kernel':>8}{'floor':>7}{'#kern':>6}{head}")
    for r in summary["cases"].values():
        tokens = statistics.fmean(r["tokens_per_batch"]) if r["tokens_per_batch"] else 0
        floor = f"{r['floor_ms']:>7.2f}" if r["floor_ms"] is not None else f"{'-':>7}"
        cats = "".join(f"{r['categories_ms_per_step'][c]:>8.3f}" for c in CATEGORIES)
        print(f"{r['name']:<10}{r['decode_rows'] + r['prefill_prompts']:>5}{tokens:>6.0f}{r['step_wall_ms']:>8.2f}"
              f"{r['kernel_ms_per_step']:>8.3f}{floor}{r['kernels_per_step']:>6.0f}{cats}")


def add_case_args(parser: argparse.ArgumentParser) -> None:
    """The model, engine limits and step counts (shared with profile_tp.py)."""
    parser.add_argument("--quantization", default=None, help="quantize at load (int8 | int4 | fp8 ...)")
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT", "profile_out"))
    parser.add_argument("--cases", default=None, help="comma-separated subset of the case names")
    parser.add_argument("--small", action="store_true", help="scaled-down cases (CPU smoke test)")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps once the batch is decoding")
    parser.add_argument("--timed", type=int, default=10, help="steps timed without the profiler")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per case")


def check_case_args(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for the smoke run")
    if args.steps < 1 or args.timed < 1:
        raise SystemExit("--steps and --timed must be >= 1")


def is_moe_model(hf_config) -> bool:
    return bool(getattr(hf_config, "num_experts", 0) or getattr(hf_config, "num_local_experts", 0))


def select_cases(wanted: str | None, default: list[Case], known: list[Case]) -> list[Case]:
    """`default`, or the `--cases` names (comma-separated) among `known`, in `known`'s order."""
    if not wanted:
        return default
    names = wanted.split(",")
    unknown = set(names) - {c.name for c in known}
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; this model has {[c.name for c in known]}")
    return [c for c in known if c.name in names]


def run_cases(cases: list[Case], run: Callable[[Case], dict], show: Callable[[dict], None], summary: dict,
              path: str) -> None:
    """Run, print and record every case; the JSON at `path` is rewritten per case, so a partial
    run keeps what it measured."""
    for case in cases:
        result = run(case)
        summary["cases"][case.name] = result
        show(result)
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(parser)
    parser.add_argument("--num-layers", type=int, default=None, help="override a dummy shape's decoder layers")
    parser.add_argument("--traces", action="store_true", help="write a Chrome trace per case (large)")
    args = parser.parse_args(argv)
    check_case_args(args)
    os.makedirs(args.out, exist_ok=True)
    model = with_num_layers(args.model, args.num_layers) if args.num_layers else args.model
    device = torch.device(args.device)
    name = device_name(device)
    bandwidth = copy_bandwidth(device, None if args.device == "cuda" else 1 << 26)
    start = time.perf_counter()
    engine = build_engine(args, model)
    startup_s = time.perf_counter() - start
    hf_config = engine.loaded.hf_config
    is_moe = is_moe_model(hf_config)
    known = default_cases(is_moe, args.small)
    cases = select_cases(args.cases, known, known)
    runner = engine.runner
    print(f"device {name}; torch {torch.__version__}; {model} ({hf_config.num_hidden_layers} layers); engine up in "
          f"{startup_s:.1f} s, {runner.num_blocks} KV blocks, graphs {runner.graphs is not None}", flush=True)
    summary: dict = {"device": name, "torch": torch.__version__, "model": model,
                     "num_layers": hf_config.num_hidden_layers, "is_moe": is_moe,
                     "async_scheduling": engine.async_scheduling, "copy_bandwidth": bandwidth,
                     "startup_s": startup_s, "num_kv_blocks": runner.num_blocks, "args": vars(args),
                     "category_rules": dict(CATEGORY_RULES), "moe_routing_rule": MOE_ROUTING, "cases": {}}
    # Warm-up: compiles the eager kernels of small shapes, and the first profiler session pays
    # the profiler's (CUPTI's) start-up, before any case is measured.
    warm = CaseDriver(engine, Case("warmup", 2, 16), 0)
    warm.wait_until_decoding()
    with profile(activities=activities(runner.device.type == "cuda")):
        warm.step()
    warm.drain()
    run_cases(cases, lambda case: run_case(engine, case, args, is_moe, bandwidth), print_case, summary,
              os.path.join(args.out, "profile_gpu.json"))
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()
