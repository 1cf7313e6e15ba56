"""Cost metering on vs off, side by side on one engine: offline output tok/s with and without a price.

Why: issue 24's target "metrics and cost add no measurable slowdown: offline tok/s within 1 % with them
on". One engine (so one model load and one KV cache) runs the same seeded throughput workload
(`shardserve bench throughput`'s: workers/bench/workload.py) in the order off, on, off, on, ... so drift
over the run hits both; `engine.cost` is swapped between an unpriced CostMeter (record returns at once)
and a priced one (workers/cost.py), which is all a price changes in the engine. Prints each run's tok/s,
the medians, the ratio on / off, and for the priced runs how the requests' costs add up to busy time x
price (they must: 100.00 %).

Run on the GPU machine:
    python benchmarks/cost_ab.py --model dummy:llama-3.1-8b --device cuda --num-requests 1000
CPU smoke run: python benchmarks/cost_ab.py --model dummy:tiny-llama --device cpu --num-requests 16 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics

from shardserve.workers.bench.device import device_name
from shardserve.workers.bench.runs import run_throughput
from shardserve.workers.bench.workload import Workload
from shardserve.workers.config import EngineConfig, ModelConfig, SchedulerConfig
from shardserve.workers.cost import CostMeter
from shardserve.workers.engine import LLMEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=180)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--price-per-hour", type=float, default=2.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=args.model, device=args.device),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)))
    vocab_size = engine.loaded.hf_config.vocab_size
    workload = Workload(args.num_requests, args.input_len, args.output_len, "lognormal", 0.8,
                        max_len=engine.max_model_len // 2, seed=0)
    requests = workload.sample(vocab_size)
    # Warm-up: the whole workload once, uncounted (a first GPU run of it was 20 % slower: lazy
    # compilation and graph capture of its batch shapes).
    run_throughput(engine, requests)
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(args.rounds):
        for side in (("off", "on") if i % 2 == 0 else ("on", "off")):  # ABBA: drift hits both sides alike
            engine.cost = CostMeter(args.price_per_hour if side == "on" else None)
            result = run_throughput(engine, requests)
            runs[side].append(result.output_tokens_per_s)
            line = f"{side:>3}: {result.output_tokens_per_s:10.1f} output tok/s"
            if side == "on":
                stats = engine.cost.stats()
                line += (f"; requests' costs ${result.cost_usd:.6f} = {result.cost_usd / stats.cost_usd_total:.2%} of "
                         f"busy time x price; ${result.cost_usd / result.output_tokens * 1e6:.3f} per 1M output tokens")
            print(line, flush=True)
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    print(f"device {device_name(engine.loaded.device)}; model {engine.loaded.name}; median off {off:.1f}, "
          f"on {on:.1f} tok/s; on / off = {on / off:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "median_off": off, "median_on": on, "ratio": on / off}, f, indent=2)
    engine.shutdown()


if __name__ == "__main__":
    main()
