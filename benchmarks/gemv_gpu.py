"""Batch-1 projections on the GPU: cuBLAS vs the PDL matrix-vector kernel, per TP shard shape.

What it answers: does `parallel/kernels/decode_linear.py` (weights read before the PDL wait)
beat cuBLAS where the engine would use it, and which tiles should it use? Each case is one
Llama-3.1-8B projection as one TP rank holds it (TP 1 / 2 / 4: qkv, o_proj, gate_up with the
SiLU-and-mul, down_proj), one row, bf16. A case runs as the engine runs it: a CUDA
graph of L pairs `rmsnorm (a PDL kernel) -> projection`, each pair with its own copy of the
weight (L copies are >= 400 MB, so nothing stays in L2), replayed 20 times; the time per pair
minus the time of the norms alone is the projection's time. Variants: cuBLAS (+ the
SiLU-and-mul kernel for gate_up), ours with the engine's tiles (the card's table or
default_tiles), ours with PDL off, and a tile sweep (best printed; `--write-tiles` saves the
winners as a table for parallel/kernels/gemv_tiles/). Beside each: the floor, bytes / the copy bandwidth measured in this run.

Before timing, every variant's output is checked against the torch reference (exit status 1 if
any is off by more than a bf16 tolerance).

Run: `python benchmarks/gemv_gpu.py [--tp 1 2 4] [--sweep [--write-tiles tiles.json]]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch
import torch.nn.functional as F
from shardserve.parallel.kernels.decode_linear import GemvTiles, decode_linear, tiles_for, tiles_key
from shardserve.parallel.kernels.rmsnorm import rmsnorm
from shardserve.parallel.options import DEFAULT_KERNEL_OPTIONS, KernelOptions, set_kernel_options
from shardserve.workers.bench.device import copy_bandwidth, device_name, replay_ms
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.activation import silu_and_mul

HIDDEN, INTER, Q_SIZE, KV_SIZE = 4096, 14336, 4096, 1024
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
MIN_BYTES = 400 << 20
failures: list[str] = []


def shapes(tp: int) -> list[tuple[str, int, int, bool]]:
    """(name, N rows of W, K, silu_mul) of one TP rank's projections."""
    return [("qkv", (Q_SIZE + 2 * KV_SIZE) // tp, HIDDEN, False), ("o_proj", HIDDEN, Q_SIZE // tp, False),
            ("gate_up", 2 * INTER // tp, HIDDEN, True), ("down", HIDDEN, INTER // tp, False)]


def chain_ms(project, x: torch.Tensor, weights: list[torch.Tensor], norm_w: torch.Tensor, pdl: bool) -> float:
    """GPU ms per replay of a graph of len(weights) pairs norm -> project(normed, W_i)."""
    set_kernel_options(KernelOptions(pdl=pdl))  # what parallel.pdl installs on a rank
    try:
        def body():
            for w in weights:
                normed, _ = rmsnorm(x, norm_w, 1e-5)
                if project is not None:
                    project(normed, w)

        body()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
    finally:
        set_kernel_options(DEFAULT_KERNEL_OPTIONS)
    return replay_ms(graph)


def check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    tol = 2e-2 * max(1.0, ref.float().abs().max().item())
    if err > tol:
        failures.append(f"{name}: max error {err:.3g} > {tol:.3g}")


def sweep_tiles() -> list[GemvTiles]:
    return [GemvTiles(*t) for t in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8), (1, 3))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sweep", action="store_true", help="time every tile of sweep_tiles too")
    parser.add_argument("--write-tiles", help="write the best tiles of the sweep as a tiles table (parallel.gemv_tiles)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth(DEV)
    print(f"device: {device_name(DEV)}; copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
    torch.manual_seed(0)
    totals: dict[tuple[int, str], float] = {}
    best_tiles: dict[str, list[int]] = {}
    for tp in args.tp:
        for name, n, k, silu in shapes(tp):
            nbytes = n * k * 2
            copies = max(4, min(64, -(-MIN_BYTES // nbytes)))
            weights = [(torch.randn(n, k, device=DEV) / k**0.5).to(DTYPE) for _ in range(copies)]
            x = torch.randn(1, k, device=DEV).to(DTYPE)
            norm = torch.ones(k, dtype=DTYPE, device=DEV)
            ref = reference.decode_linear(x, weights[0], silu_mul=silu)

            def cublas(a, w, silu=silu):
                y = F.linear(a, w)
                return silu_and_mul(y) if silu else y

            def ours(a, w, silu=silu, tiles=None):
                return decode_linear(a, w, silu_mul=silu, tiles=tiles)

            check(f"tp{tp} {name} cublas", cublas(x, weights[0]), ref)
            check(f"tp{tp} {name} ours", ours(x, weights[0]), ref)
            base = chain_ms(None, x, weights, norm, True)
            per = {label: (chain_ms(fn, x, weights, norm, pdl) - base) / copies * 1e3
                   for label, fn, pdl in (("cublas", cublas, True), ("ours", ours, True), ("ours_nopdl", ours, False))}
            floor = nbytes / bandwidth * 1e6
            line = (f"tp{tp} {name:8s} N={n:5d} K={k:5d} floor {floor:6.1f} us | cublas {per['cublas']:6.1f}"
                    f" | ours {per['ours']:6.1f} ({tiles_for(DEV, n // 2 if silu else n, k, silu)})"
                    f" no-pdl {per['ours_nopdl']:6.1f} | cublas/ours {per['cublas'] / per['ours']:.3f}x")
            if args.sweep:
                results = []
                for tiles in sweep_tiles():
                    try:
                        out = ours(x, weights[0], tiles=tiles)
                    except Exception as exc:  # a tile the compiler rejects (e.g. out of registers)
                        print(f"  skip {tiles}: {type(exc).__name__}")
                        continue
                    check(f"tp{tp} {name} {tiles}", out, ref)
                    t = (chain_ms(lambda a, w, tiles=tiles: ours(a, w, tiles=tiles), x, weights, norm, True) - base)
                    results.append((t / copies * 1e3, tiles))
                results.sort(key=lambda r: r[0])
                line += f" | best {results[0][0]:6.1f} {results[0][1]}"
                for t, tiles in results[1:4]:
                    line += f"; {t:6.1f} {tiles}"
                per["best"] = results[0][0]
                best_tiles[tiles_key(n // 2 if silu else n, k, silu)] = list(dataclasses.astuple(results[0][1]))
            print(line, flush=True)
            for label, value in per.items():
                totals[(tp, label)] = totals.get((tp, label), 0.0) + value
            totals[(tp, "floor")] = totals.get((tp, "floor"), 0.0) + floor
            del weights
            torch.cuda.empty_cache()
    print("per layer (the four projections, us):")
    for tp in args.tp:
        labels = [lb for (t, lb) in totals if t == tp]
        print(f"  tp{tp}: " + ", ".join(f"{lb} {totals[(tp, lb)]:.1f}" for lb in labels)
              + f"; cublas/ours {totals[(tp, 'cublas')] / totals[(tp, 'ours')]:.3f}x")
    if args.write_tiles and best_tiles:
        with open(args.write_tiles, "w") as f:
            json.dump(best_tiles, f, indent=1)
        print(f"wrote {len(best_tiles)} tuned tiles to {args.write_tiles}")
    for failure in failures:
        print("FAIL", failure)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
