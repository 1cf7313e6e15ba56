"""`shardserve bench latency|throughput`: our engine beside transformers, same process.

Prints the device, our figure, the transformers figure on the same prompts, the ratio; latency also
the bandwidth achieved vs the copy bandwidth measured in the run. Work: workers/bench/ (`latency
--speculative-method M [--draft-*]`: spec_runs.py); `bench serve`: cluster/bench_serve/.

Model parallelism, as `vllm bench`:
    --tensor-parallel-size/-tp N     ranks that split every layer (default 1)
    --pipeline-parallel-size/-pp N   stages that split the layers (default 1)
    --expert-parallel-size/-ep N     ranks of a stage that split the MoE experts; divides TP (default 1)
    --pipeline-micro-batches D       batches in flight under PP, in [PP, 2 x PP] (default PP)
e.g. `shardserve bench latency --model dummy:llama-3.1-8b --device cuda -tp 2 --batch-sizes 1,8`.
With TP x PP > 1 the engine runs TP x PP worker processes (one GPU each) and this process holds
no weights: latency reports the driver's wall-clock step time (per-step GPU events stay on the
ranks) and GB/s per GPU (bytes one GPU of each pipeline stage reads per step, summed over the
stages, from the model config); the transformers baseline runs afterwards on one device with
the whole model (it must fit), the single-device figure; throughput's cost counts every device.
A bad value (a size < 1, EP not dividing TP, micro-batches out of range, more ranks than GPUs,
a size the model cannot be split by: heads, layers, experts) is reported with the flag, the
field and its range, exit code 2, before any worker process starts.
"""

from __future__ import annotations

import argparse
import json
import sys

from shardserve.cluster.bench_serve.options import add_arguments as add_serve_arguments
from shardserve.workers.config import CPU_ACTIVATIONS, QUANTIZATION_METHODS, SPECULATIVE_METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="latency / throughput against transformers; serve: online load")
    sub = p.add_subparsers(dest="bench_kind", required=True)
    serve = sub.add_parser("serve", help="online load against OpenAI-compatible HTTP or our gRPC endpoints")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    for kind in ("latency", "throughput"):
        q = sub.add_parser(kind)
        q.add_argument("--model", default="default")
        q.add_argument("--dtype", default="auto")
        q.add_argument("--device", default="auto")
        q.add_argument("--quantization", default=None, choices=QUANTIZATION_METHODS,
                       help="weight quantization (ModelConfig.quantization)")
        q.add_argument("--quantization-group-size", type=int, default=128, help="inputs per scale for int4 at load")
        q.add_argument("--cpu-activations", default="auto", choices=CPU_ACTIVATIONS,
                       help="on CPU, how the kernels of weights kept quantized meet activations "
                            "(ModelConfig.cpu_activations; auto: int8 where layers run on them, else float)")
        q.add_argument("--input-len", type=int, default=128 if kind == "throughput" else 16)
        q.add_argument("--output-len", type=int, default=128)
        q.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
        q.add_argument("--json", default=None, help="also write the results to this JSON file")
        q.add_argument("--max-num-seqs", type=int, default=256)
        q.add_argument("--max-num-batched-tokens", type=int, default=2048)
        q.add_argument("--mode", default="continuous", choices=["continuous", "static"])
        q.add_argument("--min-admit-batch", type=int, default=1, help="admit waiting requests in bursts of this many")
        q.add_argument("--async-depth", type=int, default=2,
                       help="batches in flight under async scheduling, in [2, 4] (3: the driver a step further ahead)")
        q.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="tensor-parallel ranks (GPUs)")
        q.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="pipeline stages")
        q.add_argument("--expert-parallel-size", "-ep", type=int, default=1,
                       help="ranks of a stage that split the MoE experts (divides the TP size)")
        q.add_argument("--pipeline-micro-batches", type=int, default=None,
                       help="batches in flight under pipeline parallelism, in [PP, 2 x PP] (default PP)")
        if kind == "latency":
            q.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,8,32")
            q.add_argument("--speculative-method", default=None, choices=SPECULATIVE_METHODS,
                           help="run batch 1 on the repetitive tasks (workers/bench/spec_tasks.py) plain and with "
                                "this proposer, side by side: speedup and acceptance")
            q.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per step at most (k)")
            q.add_argument("--prompt-lookup-max", type=int, default=4, help="ngram: longest suffix matched")
            q.add_argument("--max-verify-tokens", type=int, default=128,
                           help="speculate only while running requests x (1 + k) stay at or below this")
            q.add_argument("--draft-model", default=None,
                           help="draft: the draft model (`default`, a folder, a .gguf file), e.g. the target itself")
            q.add_argument("--draft-quantization", default=None, choices=QUANTIZATION_METHODS,
                           help="draft: quantization of the draft model (a quantized copy of the target)")
            q.add_argument("--draft-num-layers", type=int, default=None,
                           help="draft: keep the first N decoder layers of the draft model (self-speculation)")
            q.add_argument("--draft-num-blocks", type=int, default=None,
                           help="draft: the draft's KV pool in blocks (default: the target's)")
            q.add_argument("--price-per-hour", type=float, default=None,
                           help="device price (USD per device-hour): adds the measured cost per 1M output tokens")
        else:
            q.add_argument("--num-requests", type=int, default=64)
            q.add_argument("--distribution", default="fixed", choices=["fixed", "lognormal"])
            q.add_argument("--sigma", type=float, default=0.8)
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--hf-batch-size", type=int, default=16)
            q.add_argument("--hf-num-requests", type=int, default=None,
                           help="run transformers on the first N requests only (it is slow); tokens/s compares")
            q.add_argument("--price-per-hour", type=float, default=2.5,
                           help="device price (USD per device-hour) for cost per token, aggregate and measured")
        q.set_defaults(func=run)


# Config field -> the flag that sets it, for error messages
FLAGS = {
    "tensor_parallel_size": "--tensor-parallel-size/-tp",
    "pipeline_parallel_size": "--pipeline-parallel-size/-pp",
    "expert_parallel_size": "--expert-parallel-size/-ep",
    "pipeline_micro_batches": "--pipeline-micro-batches",
    "async_depth": "--async-depth",
    "num_speculative_tokens": "--num-speculative-tokens",
    "prompt_lookup_max": "--prompt-lookup-max",
    "max_verify_tokens": "--max-verify-tokens",
    "draft_model": "--draft-model",
    "draft_quantization": "--draft-quantization",
    "draft_num_layers": "--draft-num-layers",
    "draft_num_blocks": "--draft-num-blocks",
    "gpu_hour_usd": "--price-per-hour",
    "cpu_hour_usd": "--price-per-hour",
}


def _flag_of(message: str) -> str | None:
    """The flag of the field a config error names first (`tensor_parallel_size` or `tensor-parallel size`)."""
    text = message.replace("-", "_").replace(" ", "_")
    found = [(text.find(field), flag) for field, flag in FLAGS.items() if field in text]
    return min(found)[1] if found else None


def run_serve(args: argparse.Namespace) -> int:
    from shardserve.cluster.bench_serve.cli import run as run_bench_serve

    return run_bench_serve(args)


def run(args: argparse.Namespace) -> int:
    from shardserve.workers.bench.cli_runs import BenchConfigError, run_latency_bench, run_throughput_bench

    try:
        result = run_latency_bench(args) if args.bench_kind == "latency" else run_throughput_bench(args)
    except BenchConfigError as exc:
        flag = _flag_of(str(exc))
        print(f"shardserve bench {args.bench_kind}: {f'{flag}: ' if flag else ''}{exc}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    sys.stdout.flush()
    return 0
