"""One device call: quantized decode and offline throughput beside bf16 on one GPU (issue 22's figures).

Data flow: (1) `quant_kernels.py --check` runs in a subprocess (every quantized kernel against
its dequantized reference at Llama-3.1-8B shapes) and, unless skipped, its timing table. (2) For
each method (bf16 = none, int4 g128, int8, fp8; all quantized at load from the same seeded dummy
weights of `dummy:llama-3.1-8b`) one engine is built, warmed up, and measured: batch-1 and
batch-64 decode (16-token prompts, 256 new tokens, the same requests as gpu_bench.py) and the
offline workload (`--num-requests` lognormal requests, medians 200 / 180, sigma 0.8). Weight
bytes per decode step are the bytes the model's parameters and packed runtimes hold, so the
batch-1 figure is also shown as % of the copy-bandwidth floor measured here. (3) A greedy check:
each quantized engine's first tokens on 4 prompts beside bf16's (agreement count; random
weights make this a smoke check, quality is `shardserve eval perplexity`'s job). The vLLM figures
of the same shapes come from `vllm_bench.py --quantization awq|fp8` in the same lease. Full
logs and a JSON go to $OUT; the last lines are the table with the device name. `--split-report FILE`
(`quant_kernels.py --sweep-splitk --json FILE`, run just before on the same card): its best tiles go into
splitk.SPLIT_TABLE and its cut-overs into packed.DEQUANT_MIN_ROWS / tinygemm.TINY_MAX_ROWS for this run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import torch
from shardserve.workers.bench.device import copy_bandwidth, device_name
from shardserve.workers.bench.runs import run_engine, run_latency, run_throughput
from shardserve.workers.bench.workload import Workload
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine


def kernel_script(out_dir: str, extra: list[str]) -> str:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_kernels.py")
    proc = subprocess.run([sys.executable, script, *extra], capture_output=True, text=True)
    name = "quant_kernels" + "".join(a.strip("-") for a in extra if a.startswith("--"))
    with open(os.path.join(out_dir, f"{name}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
    return "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"


def weight_bytes(engine: LLMEngine) -> int:
    """Bytes of every parameter and packed quantized runtime (read once per decode step)."""
    model = engine.loaded.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    seen: set[int] = set()
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        runtime = getattr(method, "runtime", None) or getattr(method, "packed", None)  # packed: MoE experts
        if runtime is None:
            continue
        stack = [runtime]
        while stack:
            obj = stack.pop()
            if isinstance(obj, torch.Tensor):
                if obj.data_ptr() not in seen:
                    seen.add(obj.data_ptr())
                    total += obj.numel() * obj.element_size()
            elif isinstance(obj, tuple | list):
                stack.extend(obj)
            elif callable(obj) and getattr(obj, "__closure__", None):  # a runtime lambda: its captured packing
                stack.extend(c.cell_contents for c in obj.__closure__)
            elif hasattr(obj, "packed"):  # cuda.py's KernelRuntime
                stack.append(obj.packed)
            elif hasattr(obj, "__dict__") and not callable(obj):
                stack.extend(vars(obj).values())
    return total


def build(model: str, method: str | None, max_num_seqs: int) -> tuple[LLMEngine, float]:
    config = EngineConfig(
        model=ModelConfig(model=model, dtype="bfloat16", device="cuda", quantization=method),
        cache=CacheConfig(gpu_memory_utilization=0.9),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=8192),
    )
    start = time.perf_counter()
    engine = LLMEngine(config)
    return engine, time.perf_counter() - start


def greedy_tokens(engine: LLMEngine, vocab_size: int) -> list[tuple[int, ...]]:
    finals = run_engine(engine, Workload(4, 24, 16, seed=5).sample(vocab_size))
    return [tuple(f.outputs[0].token_ids) for f in finals]


SWEEP_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def apply_split_report(path: str) -> dict:
    """What the engine would run with the sweep's tiles and cut-overs pasted in (splitk_sweep.py's JSON)."""
    from shardserve.workers.quant.kernels import packed, splitk, tinygemm
    from shardserve.workers.quant.kernels.splitk import SplitTiles

    with open(path) as f:
        report = json.load(f)
    report = report.get("sweep", {}).get("splitk", report)  # quant_kernels.py --sweep-splitk wraps it
    dequant_from, tiny_max = [], 0
    for method, by_rows in report.items():
        bits = 4 if method == "int4" else 8
        layer: dict[int, dict[str, float]] = {}
        for rows, shapes in by_rows.items():
            for shape, row in shapes.items():
                if "best_tiles" in row:
                    args = [int(v) for v in row["best_tiles"].split("(", 1)[1].rstrip(")").split(",")]
                    splitk.SPLIT_TABLE[(bits, int(rows), *SWEEP_SHAPES[shape])] = SplitTiles(*args)
                for key in ("best", "dequant", "tinygemm"):
                    if row.get(key) is not None:
                        layer.setdefault(int(rows), {}).setdefault(key, 0.0)
                        layer[int(rows)][key] += row[key]
        whole = {m: c for m, c in layer.items() if "best" in c and "dequant" in c}
        dequant_from += [m for m, c in sorted(whole.items()) if c["dequant"] < c["best"]][:1]
        if method == "int4":
            tiny_max = max([m for m, c in whole.items() if c.get("tinygemm", float("inf")) < c["best"]], default=0)
    packed.DEQUANT_MIN_ROWS = min(dequant_from, default=max(splitk.SWEEP_ROWS) + 1)
    tinygemm.TINY_MAX_ROWS = max(1, tiny_max)  # one row: torch's kernel beats the plane GEMV (not swept)
    applied = {"tiles": len(splitk.SPLIT_TABLE), "DEQUANT_MIN_ROWS": packed.DEQUANT_MIN_ROWS,
               "TINY_MAX_ROWS": tinygemm.TINY_MAX_ROWS}
    print(f"split report applied: {applied}", flush=True)
    return applied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--methods", default="none,int4,int8,fp8")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--skip", nargs="*", default=[], choices=["check", "kernels", "latency", "throughput"])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--split-report", help="splitk_sweep.py's JSON: its tiles and cut-overs for this run")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    name, bandwidth = device_name(device), copy_bandwidth(device)
    print(f"device {name}; torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    summary: dict = {"device": name, "copy_bandwidth": bandwidth, "args": vars(args), "methods": {}}
    if args.split_report:
        summary["split_report"] = apply_split_report(args.split_report)
    if "check" not in args.skip:
        summary["kernel_check"] = kernel_script(args.out, ["--check"])
    if "kernels" not in args.skip:
        summary["kernel_timing"] = kernel_script(args.out, ["--json", os.path.join(args.out, "kernels.json")])
    reference: list | None = None
    for method in args.methods.split(","):
        quant = None if method == "none" else method
        row: dict = {}
        try:
            engine, startup = build(args.model, quant, args.max_num_seqs)
        except Exception as exc:  # report and go on with the other methods
            print(f"{method}: engine failed: {exc!r}", flush=True)
            summary["methods"][method] = {"error": repr(exc)}
            continue
        vocab = engine.loaded.hf_config.vocab_size
        row["startup_s"], row["weight_bytes"] = startup, weight_bytes(engine)
        tokens = greedy_tokens(engine, vocab)
        if reference is None:
            reference = tokens
        row["greedy_agree"] = sum(a == b for a, b in zip(tokens, reference, strict=True))
        if "latency" not in args.skip:
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                result = asdict(run_latency(engine, Workload(batch_size, 16, 256, seed=batch_size).sample(vocab),
                                            bandwidth))
                row[f"b{batch_size}"] = result["decode_tokens_per_s"]
                if batch_size == 1:
                    row["b1_floor_pct"] = 100 * row["weight_bytes"] / result["step_time_s"] / bandwidth
                print(f"{method} b{batch_size}: {result['decode_tokens_per_s']:.1f} tok/s", flush=True)
        if "throughput" not in args.skip:
            workload = Workload(args.num_requests, 200, 180, "lognormal", 0.8, max_len=engine.max_model_len // 2)
            row["offline"] = asdict(run_throughput(engine, workload.sample(vocab)))["output_tokens_per_s"]
            print(f"{method} offline: {row['offline']:.0f} out tok/s", flush=True)
        summary["methods"][method] = row
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "quant_gpu.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{name}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, {args.model}")
    print(f"{'method':8} {'weights GB':>10} {'b1 tok/s':>9} {'% floor':>8} {'b64 tok/s':>10} {'offline':>9} {'greedy':>7}")
    for method, row in summary["methods"].items():
        if "error" in row:
            print(f"{method:8} error: {row['error'][:80]}")
            continue
        print(f"{method:8} {row['weight_bytes'] / 1e9:10.2f} {row.get('b1', float('nan')):9.1f} "
              f"{row.get('b1_floor_pct', float('nan')):8.1f} {row.get('b64', float('nan')):10.0f} "
              f"{row.get('offline', float('nan')):9.0f} {row['greedy_agree']:>5}/4")


if __name__ == "__main__":
    main()
