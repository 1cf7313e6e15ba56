"""CPU time of a prefill, one thread: the embedded SmolLM2 kept packed, dense path vs row kernels.

From `DENSE_FROM_ROWS` rows with float activations the Q4 / Q8 kernels dequantize W block by block into
a scratch and run GEMMs (workers/quant/cpu_kernels/__init__.py, `dense_linear`); the alternative is the
row kernels for every row (DENSE_FROM_ROWS set past the prompt). Each mode, interleaved `--rounds`
times in one process, runs `generate` with max_tokens 1 on prompts of `--lens` token ids (prefix
caching off, one warm-up each) and is charged its process CPU time (`time.process_time`), which other
tenants' load barely moves. Prints min and median ms per length and mode.
    python benchmarks/cpu_prefill.py --lens 16,64,512 --rounds 4 [--cpu-activations int8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", default="16,64,512")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cpu-activations", default="float", choices=["float", "int8"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    from shardserve.workers.llm import LLM
    from shardserve.workers.quant import cpu_kernels
    from shardserve.workers.request import SamplingParams

    llm = LLM("default", device="cpu", dtype="float32", enable_prefix_caching=False, quantization="gguf",
              cpu_activations=args.cpu_activations)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    dense_from = cpu_kernels.DENSE_FROM_ROWS
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for mode in ("dense", "rows"):
            cpu_kernels.DENSE_FROM_ROWS = dense_from if mode == "dense" else 1 << 30
            for n in (int(v) for v in args.lens.split(",")):
                ids = [(i * 7919 + r) % 40000 + 100 for i in range(n)]
                llm.generate(ids, params)
                start = time.process_time()
                llm.generate(ids, params)
                times.setdefault((mode, n), []).append((time.process_time() - start) * 1e3)
    cpu_kernels.DENSE_FROM_ROWS = dense_from
    print(f"SmolLM2 Q4_1 kept packed, {args.cpu_activations} activations, 1 thread, ms of CPU per prefill")
    for (mode, n), values in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  {n:5d} tokens  {mode:5s}  min {min(values):8.1f}  median {statistics.median(values):8.1f}")


if __name__ == "__main__":
    main()
