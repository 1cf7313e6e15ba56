"""GPU check of the fused MoE kernel on one Qwen3-30B-A3B-shaped layer, with timings.

Data flow: random bf16 weights of one MoE layer (128 experts, top-8, hidden 2048, moe
intermediate 768; w13 ~ 805 MB, w2 ~ 403 MB) and, per batch size T in 1, 8, 64, 512, 2048,
random tokens routed like the model does (softmax over router logits, top-8, renormalised).
For each T the script
  * runs `fused_moe` under `torch.cuda.set_sync_debug_mode("error")` (any host sync raises),
  * compares it and the per-expert loop in bf16 (today's eager path) with the fp32 torch
    reference: max abs error relative to max |reference|,
  * captures `fused_moe` in a CUDA graph, replays it on a *different* routing written into the
    same input buffers and checks the replay against the reference (graph safety),
  * times fused (eager and graph replay) and the bf16 loop with CUDA events (median of
    `--iters`, L2 flushed before each run), and prints the weight bytes the active experts
    force to be read over the fused time (GB/s; the decode roofline).
It also checks an EP slice (experts 32..63 local) and fp16 at one T, and compares the Triton
alignment (`moe_align_block_size`) and router (`moe_route`) kernels with their torch references
(outputs and times).

`--sweep` instead times candidate `MoeTiles` (`SWEEP_CANDIDATES`, ~45 configs pruned from
block_m 16-128 / block_n 32-256 / block_k 64-256 / group_m / warps / stages, seeded by vLLM's
H100 fused_moe configs for E=128 N=768/384 and E=64 N=768) for T in `SWEEP_TOKENS` on three
shapes: the full layer (128 experts, inter 768), TP2 (inter 384) and EP2 (experts 0..63 of 128
local). Per (shape, T) it keeps only candidates whose block_m suits the rows per expert, checks
each candidate's output against the current tiles' output, times it (`--iters`, default 8 in
sweep mode, L2 flushed, no graph), prints the best and second-best tiles beside the current
`moe_tiles` choice, then per shape a suggested `CUDA_TILE_BANDS` table, and writes everything to
`$OUT/moe_tile_sweep.json` (or `--json`). `--budget-s` stops starting new (shape, T) cells
when exceeded (compiling ~90 kernel variants dominates the run time).

Run: `python benchmarks/moe_gpu_check.py [--iters 20]` or `python benchmarks/moe_gpu_check.py --sweep`.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import torch
from shardserve.workers.bench.device import gpu_time_ms
from shardserve.workers.kernels.fused_moe import CUDA_TILE_BANDS, MoeTiles, fused_moe, moe_tiles
from shardserve.workers.kernels.moe_align import moe_align_block_size
from shardserve.workers.kernels.moe_reference import (
    fused_moe_reference,
    moe_align_block_size_torch,
    moe_route_reference,
)
from shardserve.workers.kernels.moe_routing import moe_route

NUM_EXPERTS, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768
BATCHES = (1, 8, 64, 512, 2048)
REL_TOL = 2e-2  # bf16 outputs of K=2048 / 768 dot products: a few ulps of the largest value
DEV = torch.device("cuda")
failures: list[str] = []


def time_ms(fn: Callable[[], object], iters: int) -> float:
    return gpu_time_ms(fn, iters, DEV)


def route(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] fp32, topk_ids [T, k] int64) as the model's router produces them."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    logits = torch.randn(num_tokens, NUM_EXPERTS, device=DEV, generator=gen)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), TOP_K, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def check(name: str, err: float, tol: float = REL_TOL) -> str:
    ok = err <= tol
    if not ok:
        failures.append(f"{name}: rel err {err:.2e} > {tol:.0e}")
    return f"{err:.2e}{'' if ok else ' FAIL'}"


def make_weights(dtype: torch.dtype, num_local: int, inter: int = INTER) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEV).manual_seed(0)
    w13 = (torch.randn(num_local, 2 * inter, HIDDEN, device=DEV, generator=gen) * HIDDEN**-0.5).to(dtype)
    w2 = (torch.randn(num_local, HIDDEN, inter, device=DEV, generator=gen) * inter**-0.5).to(dtype)
    return w13, w2


def no_sync_run(x, w13, w2, weights, ids, start=0, num_local=None) -> torch.Tensor:
    """fused_moe with host syncs turned into errors (the alignment must not read device values)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fused_moe(x, w13, w2, weights, ids, start, num_local)
    except RuntimeError as e:
        failures.append(f"host sync inside fused_moe: {e}")
        return fused_moe(x, w13, w2, weights, ids, start, num_local)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def graph_check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, num_tokens: int
                ) -> tuple[float, Callable[[], object]]:
    """Capture fused_moe for T tokens, replay on another routing; (rel err of replay, replay fn)."""
    weights, ids = route(num_tokens, seed=1)
    static_w, static_ids = weights.to(x.dtype), ids.clone()
    fused_moe(x, w13, w2, static_w, static_ids)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe(x, w13, w2, static_w, static_ids)
    new_weights, new_ids = route(num_tokens, seed=2)
    static_w.copy_(new_weights)
    static_ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    want = fused_moe_reference(x, w13, w2, static_w, static_ids)
    return rel_err(static_out, want), graph.replay


SWEEP_TOKENS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# (name, local experts, intermediate size per rank); routing is always over NUM_EXPERTS experts
# and the local ones are 0..E-1 (EP2: half of every token's rows go to the other rank).
SWEEP_SHAPES = (("full", NUM_EXPERTS, INTER), ("tp2", NUM_EXPERTS, INTER // 2), ("ep2", NUM_EXPERTS // 2, INTER))
T_ = MoeTiles  # (block_m, block_n, block_k, group_m, num_warps, num_stages)
SWEEP_CANDIDATES: tuple[MoeTiles, ...] = (
    # block_m 16: decode; vLLM's H100 picks for M <= 128 are mostly here
    T_(16, 32, 64, 1, 4, 4), T_(16, 32, 128, 1, 4, 4), T_(16, 32, 256, 1, 4, 2), T_(16, 64, 64, 1, 4, 3),
    T_(16, 64, 64, 1, 4, 4), T_(16, 64, 128, 1, 4, 2), T_(16, 64, 128, 1, 4, 3), T_(16, 64, 128, 1, 4, 4),
    T_(16, 64, 128, 16, 8, 2), T_(16, 128, 64, 1, 4, 4), T_(16, 128, 64, 1, 8, 3), T_(16, 128, 128, 1, 4, 2),
    T_(16, 128, 128, 1, 8, 3), T_(16, 256, 128, 1, 8, 2), T_(16, 256, 128, 1, 8, 3),
    # block_m 32
    T_(32, 64, 64, 4, 4, 4), T_(32, 64, 128, 1, 4, 2), T_(32, 64, 128, 1, 4, 3), T_(32, 64, 128, 16, 4, 2),
    T_(32, 128, 64, 1, 4, 3), T_(32, 128, 64, 8, 4, 4), T_(32, 128, 128, 1, 8, 2), T_(32, 128, 128, 1, 8, 3),
    T_(32, 256, 64, 1, 8, 4), T_(32, 256, 128, 1, 8, 3),
    # block_m 64
    T_(64, 64, 64, 1, 4, 3), T_(64, 64, 64, 16, 4, 3), T_(64, 64, 128, 8, 4, 3), T_(64, 128, 64, 1, 4, 3),
    T_(64, 128, 64, 1, 4, 4), T_(64, 128, 64, 1, 8, 3), T_(64, 128, 64, 8, 4, 3), T_(64, 128, 128, 1, 8, 3),
    T_(64, 128, 128, 8, 4, 2), T_(64, 256, 64, 1, 8, 4), T_(64, 256, 64, 8, 8, 3),
    # block_m 128: vLLM's picks for M >= 1536
    T_(128, 64, 64, 1, 4, 3), T_(128, 128, 64, 1, 8, 3), T_(128, 128, 64, 1, 8, 4), T_(128, 128, 64, 8, 8, 4),
    T_(128, 128, 64, 16, 8, 3), T_(128, 128, 128, 1, 8, 2), T_(128, 256, 64, 1, 8, 4), T_(128, 256, 64, 8, 8, 3),
    T_(128, 256, 64, 16, 8, 4),
)


def _next_pow2(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1.0))))


def sweep_candidates(rows_per_expert: float, current: MoeTiles) -> list[MoeTiles]:
    """Candidates whose block_m suits the mean rows per local expert (plus the current choice):
    block_m in [min(64, pow2(rows) / 4), max(32, pow2(4 * rows))], e.g. 16-32 for decode, 64-128 at 256."""
    lo = min(64, max(16, _next_pow2(rows_per_expert) // 4))
    hi = max(32, _next_pow2(4 * rows_per_expert))
    picked = [t for t in SWEEP_CANDIDATES if lo <= t.block_m <= hi]
    return picked if current in picked else [current, *picked]


def _fmt(t: MoeTiles) -> str:
    return f"{t.block_m},{t.block_n},{t.block_k},{t.group_m},{t.num_warps},{t.num_stages}"


def suggest_bands(cells: list[dict]) -> list[tuple[float, MoeTiles]]:
    """Merge the per-T best tiles of one shape into (rows-per-expert bound, tiles) bands."""
    bands: list[tuple[float, MoeTiles]] = []
    for cell in sorted(cells, key=lambda c: c["rows_per_expert"]):
        best = MoeTiles(**cell["best"]["tiles"])
        if bands and bands[-1][1] == best:
            bands[-1] = (cell["rows_per_expert"], best)
        else:
            bands.append((cell["rows_per_expert"], best))
    if bands:
        bands[-1] = (math.inf, bands[-1][1])
    return bands


def run_sweep(iters: int, budget_s: float, json_path: str) -> int:
    """Time SWEEP_CANDIDATES per (shape, T); print best vs current, suggested bands; write JSON."""
    started = time.perf_counter()
    print(f"sweep: {len(SWEEP_CANDIDATES)} candidates, T in {SWEEP_TOKENS}, shapes "
          f"{', '.join(f'{n} (E={e}, I={i})' for n, e, i in SWEEP_SHAPES)}, {iters} iters, budget {budget_s:.0f}s")
    print("tiles = block_m,block_n,block_k,group_m,num_warps,num_stages; rows/E = T*k / local experts "
          "(what moe_tiles sees)")
    full_w13, full_w2 = make_weights(torch.bfloat16, NUM_EXPERTS, INTER)
    tp2_w13, tp2_w2 = make_weights(torch.bfloat16, NUM_EXPERTS, INTER // 2)
    weights_of = {"full": (full_w13, full_w2), "tp2": (tp2_w13, tp2_w2),
                  "ep2": (full_w13[:NUM_EXPERTS // 2], full_w2[:NUM_EXPERTS // 2])}
    print(f"{'shape':>5} {'T':>5} {'rows/E':>7} {'n':>3} {'best tiles':>20} {'best ms':>8} {'2nd tiles':>20} "
          f"{'2nd ms':>8} {'current tiles':>20} {'cur ms':>8} {'gain':>6}")
    results: list[dict] = []
    skipped: list[str] = []
    for name, num_local, inter in SWEEP_SHAPES:
        w13, w2 = weights_of[name]
        for num_tokens in SWEEP_TOKENS:
            if time.perf_counter() - started > budget_s:
                skipped.append(f"{name} T={num_tokens}")
                continue
            x = torch.randn(num_tokens, HIDDEN, device=DEV, dtype=torch.bfloat16)
            weights, ids = route(num_tokens, seed=0)
            weights = weights.to(torch.bfloat16)
            rows_per_expert = num_tokens * TOP_K / num_local
            current = moe_tiles(num_tokens * TOP_K, num_local, on_cuda=True)
            want = fused_moe(x, w13, w2, weights, ids, 0, num_local, tiles=current)
            timings: list[tuple[float, MoeTiles]] = []
            errors: list[str] = []
            for tiles in sweep_candidates(num_tokens * TOP_K / NUM_EXPERTS, current):
                run = partial(fused_moe, x, w13, w2, weights, ids, 0, num_local, tiles=tiles)
                try:
                    err = rel_err(run(), want)
                    if err > REL_TOL:
                        errors.append(f"{_fmt(tiles)}: rel err {err:.1e} vs current tiles")
                        continue
                    timings.append((time_ms(run, iters), tiles))
                except Exception as e:  # e.g. out of shared memory: skip the candidate
                    errors.append(f"{_fmt(tiles)}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            timings.sort(key=lambda mt: mt[0])
            cur_ms = next(ms for ms, t in timings if t == current) if any(t == current for _, t in timings) else math.nan
            best_ms, best = timings[0]
            second_ms, second = timings[1] if len(timings) > 1 else (math.nan, best)
            print(f"{name:>5} {num_tokens:>5} {rows_per_expert:7.2f} {len(timings):>3} {_fmt(best):>20} {best_ms:8.3f} "
                  f"{_fmt(second):>20} {second_ms:8.3f} {_fmt(current):>20} {cur_ms:8.3f} {cur_ms / best_ms:5.2f}x",
                  flush=True)
            for e in errors:
                print(f"      skipped {e}")
            results.append({
                "shape": name, "num_local": num_local, "inter": inter, "tokens": num_tokens,
                "rows_per_expert": rows_per_expert,
                "best": {"tiles": asdict(best), "ms": best_ms},
                "current": {"tiles": asdict(current), "ms": cur_ms},
                "timings": [{"tiles": asdict(t), "ms": ms} for ms, t in timings],
                "errors": errors,
            })
    elapsed = time.perf_counter() - started
    if skipped:
        print(f"budget {budget_s:.0f}s exceeded; not run: {', '.join(skipped)}")
    for name, _, _ in SWEEP_SHAPES:
        cells = [c for c in results if c["shape"] == name]
        if not cells:
            continue
        print(f"suggested CUDA_TILE_BANDS from '{name}' (rows per local expert bound, tiles):")
        for bound, tiles in suggest_bands(cells):
            print(f"    ({bound if bound != math.inf else 'math.inf'}, MoeTiles({_fmt(tiles).replace(',', ', ')})),")
    payload = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": _triton_version(),
        "iters": iters, "elapsed_s": elapsed, "hidden": HIDDEN, "top_k": TOP_K, "routed_experts": NUM_EXPERTS,
        "current_bands": [[b if b != math.inf else "inf", asdict(t)] for b, t in CUDA_TILE_BANDS],
        "cells": results, "skipped": skipped,
    }
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"sweep took {elapsed:.0f}s; wrote {json_path}")
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


def check_align_and_route(iters: int) -> None:
    """Triton alignment / router vs their torch references: outputs and GPU times per T."""
    print(f"{'T':>5} {'align':>6} {'route':>6} {'align us':>9} {'torch us':>9} {'route us':>9} {'torch us':>9}")
    for num_tokens in BATCHES:
        gen = torch.Generator(device=DEV).manual_seed(5)
        logits = torch.randn(num_tokens, NUM_EXPERTS, device=DEV, generator=gen).to(torch.bfloat16)
        weights, ids = moe_route(logits, TOP_K, True, torch.bfloat16)
        want_w, want_ids = moe_route_reference(logits, TOP_K, True, torch.bfloat16)
        # bf16 logits tie: compare the picked logits, and the weights to a bf16 ulp or two
        route_ok = (torch.equal(logits.gather(1, ids), logits.gather(1, want_ids))
                    and rel_err(weights, want_w) <= 2e-2)
        if not route_ok:
            failures.append(f"T={num_tokens} moe_route differs from torch")
        block_m = moe_tiles(num_tokens * TOP_K, NUM_EXPERTS, on_cuda=True).block_m
        got = moe_align_block_size(ids, block_m, 0, NUM_EXPERTS)
        want = moe_align_block_size_torch(ids, block_m, 0, NUM_EXPERTS)
        align_ok = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))  # the kernel is stable
        if not align_ok:
            failures.append(f"T={num_tokens} moe_align_block_size differs from torch")
        times = [1e3 * time_ms(fn, iters) for fn in (
            partial(moe_align_block_size, ids, block_m, 0, NUM_EXPERTS),
            partial(moe_align_block_size_torch, ids, block_m, 0, NUM_EXPERTS),
            partial(moe_route, logits, TOP_K, True, torch.bfloat16),
            partial(moe_route_reference, logits, TOP_K, True, torch.bfloat16))]
        print(f"{num_tokens:>5} {'ok' if align_ok else 'FAIL':>6} {'ok' if route_ok else 'FAIL':>6} "
              + " ".join(f"{t:9.1f}" for t in times))


ROUTE_LAUNCHES = ((1, 1), (1, 2), (1, 4), (4, 1), (4, 4), (16, 1), (16, 4))  # (tokens per program, warps)


def route_launch_sweep(iters: int) -> None:
    """GPU time of the router kernel per (tokens per program, warps) launch; * marks route_launch's pick."""
    from shardserve.workers.kernels.moe_routing import route_launch

    print("router launch sweep, us (bf16 logits, renormalised top-8, load counted):")
    print(f"{'T':>5} " + " ".join(f"{f'{b}t/{w}w':>8}" for b, w in ROUTE_LAUNCHES))
    load = torch.zeros(NUM_EXPERTS, dtype=torch.int64, device=DEV)
    for num_tokens in (1, 4, 8, 32, 64, 256, 2048):
        logits = torch.randn(num_tokens, NUM_EXPERTS, device=DEV).to(torch.bfloat16)
        pick = route_launch(num_tokens, NUM_EXPERTS)
        cells = []
        for launch in ROUTE_LAUNCHES:
            us = 1e3 * time_ms(partial(moe_route, logits, TOP_K, True, torch.bfloat16, load, launch), iters)
            cells.append(f"{us:7.1f}{'*' if launch == pick else ' '}")
        print(f"{num_tokens:>5} " + " ".join(cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=None, help="timing runs per measurement (20; sweep: 8)")
    parser.add_argument("--sweep", action="store_true", help="time candidate MoeTiles instead of the checks")
    parser.add_argument("--budget-s", type=float, default=210.0, help="sweep: start no new cell after this")
    parser.add_argument("--json", default=None, help="sweep JSON path (default $OUT/moe_tile_sweep.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {_triton_version()}")
    if args.sweep:
        json_path = args.json or os.path.join(os.environ.get("OUT", "."), "moe_tile_sweep.json")
        return run_sweep(args.iters or 8, args.budget_s, json_path)
    args.iters = args.iters or 20
    print(f"layer: E={NUM_EXPERTS} top-{TOP_K} hidden {HIDDEN} inter {INTER} bf16")
    w13, w2 = make_weights(torch.bfloat16, NUM_EXPERTS)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()

    header = (f"{'T':>5} {'tiles(M,N,K)':>13} {'err fused':>10} {'err loop':>10} {'err graph':>10} "
              f"{'fused ms':>9} {'graph ms':>9} {'loop ms':>9} {'speedup':>8} {'GB/s':>7}")
    print(header)
    for num_tokens in BATCHES:
        x = torch.randn(num_tokens, HIDDEN, device=DEV, dtype=torch.bfloat16)
        weights, ids = route(num_tokens, seed=0)
        weights = weights.to(torch.bfloat16)
        out = no_sync_run(x, w13, w2, weights, ids)
        want = fused_moe_reference(x, w13, w2, weights, ids)  # fp32 compute
        loop = fused_moe_reference(x, w13, w2, weights, ids, compute_dtype=None)  # bf16 per-expert loop
        err_fused = check(f"T={num_tokens} fused", rel_err(out, want))
        err_loop = f"{rel_err(loop, want):.2e}"
        try:
            graph_err, replay = graph_check(x, w13, w2, num_tokens)
            err_graph = check(f"T={num_tokens} graph replay", graph_err)
            graph_ms = f"{time_ms(replay, args.iters):9.3f}"
        except Exception as e:  # report and go on to the timings
            failures.append(f"T={num_tokens} graph capture: {type(e).__name__}: {e}")
            err_graph, graph_ms = "FAIL", f"{'-':>9}"
        fused_ms = time_ms(lambda x=x, w=weights, i=ids: fused_moe(x, w13, w2, w, i), args.iters)
        loop_ms = time_ms(lambda x=x, w=weights, i=ids: fused_moe_reference(x, w13, w2, w, i, compute_dtype=None),
                          max(3, args.iters // 4))
        active = ids.unique().numel()
        gbps = active * expert_bytes / (fused_ms * 1e-3) / 1e9
        tiles = moe_tiles(num_tokens * TOP_K, NUM_EXPERTS, on_cuda=True)
        print(f"{num_tokens:>5} {f'({tiles.block_m},{tiles.block_n},{tiles.block_k})':>13} {err_fused:>10} "
              f"{err_loop:>10} {err_graph:>10} {fused_ms:9.3f} {graph_ms} {loop_ms:9.3f} "
              f"{loop_ms / fused_ms:7.1f}x {gbps:7.0f}")

    # EP: this rank holds experts 32..63 only; other experts contribute zero.
    start, num_local = 32, 32
    x = torch.randn(64, HIDDEN, device=DEV, dtype=torch.bfloat16)
    weights, ids = route(64, seed=3)
    weights = weights.to(torch.bfloat16)
    out = no_sync_run(x, w13[start:start + num_local], w2[start:start + num_local], weights, ids, start, num_local)
    want = fused_moe_reference(x, w13[start:start + num_local], w2[start:start + num_local], weights, ids, start,
                               num_local)
    print(f"EP slice experts {start}..{start + num_local - 1}, T=64: rel err {check('EP slice', rel_err(out, want))}")

    print("Triton alignment and router vs torch (bf16 logits, renormalised top-8):")
    check_align_and_route(args.iters)
    route_launch_sweep(args.iters)

    w13h, w2h = w13.half(), w2.half()
    x = torch.randn(64, HIDDEN, device=DEV, dtype=torch.float16)
    weights, ids = route(64, seed=4)
    out = fused_moe(x, w13h, w2h, weights.half(), ids)
    want = fused_moe_reference(x, w13h, w2h, weights.half(), ids)
    print(f"fp16, T=64: rel err {check('fp16', rel_err(out, want), tol=5e-3)}")

    if failures:
        print("FAILURES:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
