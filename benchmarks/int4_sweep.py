"""Tile sweep of the W4A16 GEMM (workers/quant/kernels/w4a16.py) on the GPU: INT4 g128 at 16-1024 rows.

What it answers: for each row count M in 16 32 64 128 256 512 1024 (or `--m`) and Llama-3.1-8B projection (qkv, o,
gate_up, down; INT4 g128 asymmetric, planes of 32 as the engine packs them or `--plane 16`), which W4Tiles are fastest,
beside bf16 cuBLAS (F.linear), the engine's INT4 path as it stands ("before": w4a16.py with its TILE_TABLE or
heuristic tiles, or dequantize + cuBLAS where `w4a16.dequant_wins`), dequantize + cuBLAS at every M, and
w4a16.default_tiles forced at every M ("default"). Timing as splitk_sweep.py: a CUDA graph of one call a weight
copy (>= 128 MB of weights, so L2 holds none between calls), median replay / copies, after a warm-up that also
checks the output against x @ W in fp32; a config that fails to compile, to fit shared memory or the check is
skipped (printed). M outer, shapes inner: a budget cut (`--sweep-seconds`) drops the largest M first.
Prints per (M, shape) the best beside the others, per M the layer sums (4 projections) and the single
config best over the layer, then, ready to paste into w4a16.py, TILE_TABLE (row buckets not swept kept as they
are; from w4a16.DEQUANT_MIN_ROWS rows only the shapes where the best beat dequantize + cuBLAS, since an entry
there routes the shape to w4a16.py) and the first M where dequantize + cuBLAS beats the best W4A16 layer.

Run: `python benchmarks/quant_kernels.py --sweep-int4 [--sweep-int8] [--m 128 256 512 1024] [--sweep-seconds 140]
[--json FILE]` (or this file directly). Kernels compile first in 8 processes (`--compile-workers`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from shardserve.workers.bench.device import device_name
from shardserve.workers.quant.kernels import splitk, w4a16
from shardserve.workers.quant.kernels.int4 import DEFAULT_PLANE, int4_linear, pack_int4
from shardserve.workers.quant.kernels.w4a16 import W4Tiles
from shardserve.workers.quant.weights import Int4Weight
from splitk_sweep import MIN_BYTES, SHAPES, Weights, _clone, _fmt, _layer, dequant_run, time_us

ROWS = w4a16.SWEEP_ROWS
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
COMPILE_SHAPE = (4096, 4096)  # the precompile's weight: the same specialization as every Llama shape (N, K,
# strides divisible by 16, K whole chunks), so the sweep's calls find its binaries in Triton's cache


def tile_grid(rows: int) -> list[W4Tiles]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, swap) near the rows, each at K split 1 / 2 / 4 / 8 (fewer from 128
    rows; most promising first: a budget cut drops the last). Swapped (W the wgmma register operand; wide BLOCK_N,
    as x is re-read from L2 once per n tile) with a dot a plane (BLOCK_K 32: the words straight into the operand's
    layout, but Triton waits for each wgmma before the next plane's dequantization) or a dot a chunk (BLOCK_K
    256: a layout conversion, then two wgmmas kept in flight); a few x @ W^T (W through shared memory). From 128
    rows: w4a16_pairs.py first (~2 instructions a weight, not ~4.5; its 128 x 256 and 256-row tiles spill at
    sm_90, left out), then the H100 sweep's best (128 x 128 / 256, 8 warps, 2 stages), 256-row tiles (a weight's
    dequantization shared by twice the rows; x's chunk fills shared memory: one stage), one-warpgroup tiles of 64
    weight rows, and one stage (no cp.async ring: ~16-32 KiB of shared memory, so several programs an SM, one
    dequantizing while another's wgmma runs). At sm_90 (ptxas, checked without a GPU) none passes SMEM_BYTES
    and only 64 x 128 a chunk a dot spills (16 bytes, split)."""
    if rows <= 32:
        m = 16 if rows <= 16 else 32
        shapes = [(m, 128, 32, 4, 4, True), (m, 64, PAIRS, 4, 4, True), (m, 128, 256, 8, 3, True),
                  (m, 64, 32, 4, 4, True), (m, 256, 32, 8, 3, True), (m, 128, 32, 8, 4, True), (m, 64, 256, 4, 4, True),
                  (m, 128, 32, 8, 3, False)]
    elif rows <= 64:
        shapes = [(64, 128, 32, 8, 3, True), (64, 128, PAIRS, 8, 3, True), (64, 64, PAIRS, 4, 3, True),
                  (64, 128, 256, 8, 2, True), (64, 256, 32, 8, 3, True), (64, 64, 32, 4, 3, True),
                  (64, 128, 32, 4, 3, True), (64, 128, 32, 8, 3, False)]
    elif rows <= 128:
        shapes = [(128, 128, PAIRS, 8, 2, True), (128, 64, PAIRS, 4, 2, True), (128, 64, PAIRS, 4, 1, True),
                  (128, 128, 32, 8, 2, True), (128, 256, 32, 8, 2, True), (128, 64, 32, 4, 2, True),
                  (64, 128, 32, 4, 3, True)]
    else:
        shapes = [(128, 128, PAIRS, 8, 2, True), (128, 64, PAIRS, 4, 2, True), (128, 64, PAIRS, 4, 1, True),
                  (128, 128, PAIRS, 8, 1, True), (128, 128, 32, 8, 2, True), (128, 256, 32, 8, 2, True),
                  (256, 128, 32, 8, 1, True), (256, 64, 32, 4, 1, True), (128, 64, 32, 4, 2, True)]
    splits = (1, 2, 4, 8) if rows < 128 else (1, 2, 4) if rows == 128 else (1, 2)
    return [W4Tiles(bm, bn, 32 if bk == PAIRS else bk, split, warps, stages, swap, pairs=bk == PAIRS)
            for bm, bn, bk, warps, stages, swap in shapes for split in splits]


PAIRS = 0  # tile_grid's BLOCK_K for w4a16_pairs.py (two weights an instruction, dots of 2 PLANE columns)


def useful(t: W4Tiles, rows: int, n: int, k: int, plane: int) -> bool:
    """Skip splits that cannot help (more than 4 waves of programs already, < 2 chunks a split) and tiles whose
    stages would not fit shared memory (w4a16_gemm would run fewer than the label says)."""
    if w4a16.fitting_stages(t, plane) < t.num_stages:
        return False
    tiles = -(-rows // t.block_m) * -(-n // t.block_n)
    steps = -(-k // (8 * plane))
    return t.split_k == 1 or (tiles * t.split_k <= 4 * splitk.sm_count_of(DEV) and steps // t.split_k >= 2)


def src(t: W4Tiles) -> str:
    return (f"W4Tiles({t.block_m}, {t.block_n}, {t.block_k}, {t.split_k}, {t.num_warps}, {t.num_stages}"
            f"{'' if t.swap else ', swap=False'}{', pairs=True' if t.pairs else ''})")


def before_run(rows: int, n: int, k: int):
    """The engine's INT4 path at this M as it stands (TILE_TABLE's, the heuristic's or dequantize + cuBLAS): (label, run)."""
    if w4a16.dequant_wins(rows, n, k):
        return "dequant+cuBLAS", dequant_run
    t = w4a16.default_tiles(rows, n, k, splitk.sm_count_of(DEV))
    return f"w4a16 {src(t)}", lambda a, w, t=t: int4_linear(a, w, w4_tiles=t)


def build(n: int, k: int, plane: int) -> Weights:
    """INT4 g128 asymmetric [n, k] packed in planes of `plane` columns, copies enough to defeat L2."""
    g = k // 128
    scales = torch.rand(n, g, device=DEV) * 2e-3 + 1e-3
    w = Int4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=DEV), scales,
                   -torch.rand(n, g, device=DEV) * 16 * scales, 128)
    first = pack_int4(w, DTYPE, max_plane=plane)
    pw = first.weights
    nbytes = sum(t.numel() * t.element_size() for t in (pw.words, pw.scales, pw.mins))
    copies = max(2, min(32, -(-MIN_BYTES // nbytes)))
    return Weights([first] + [_clone(first) for _ in range(copies - 1)], None, w.dequantize(), nbytes)


def _compile(plane: int, tiles: list[W4Tiles]) -> int:
    """In a worker process: run each config once on a COMPILE_SHAPE weight, so Triton's on-disk cache holds its
    binary; returns how many ran."""
    torch.manual_seed(0)
    n, k = COMPILE_SHAPE
    wt = build(n, k, plane)
    x = torch.randn(16, k, device=DEV).to(DTYPE)
    done = 0
    for t in tiles:
        try:
            int4_linear(x, wt.packed[0], w4_tiles=t)
            done += 1
        except Exception as exc:  # reported again (and skipped) when the sweep times it
            print(f"  precompile {src(t)}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    return done


def precompile(configs: set[W4Tiles], plane: int, workers: int, timeout: float) -> None:
    """Compile the configs in `workers` processes at once (Triton compiles one kernel at a time; ptxas alone
    takes seconds for the 8-warp tiles): each config with one split and with two (a different binary). Past
    `timeout` seconds the workers are ended and the sweep compiles what is left as it goes."""
    todo = sorted({W4Tiles(t.block_m, t.block_n, t.block_k, s, t.num_warps, t.num_stages, t.swap, t.pairs)
                   for t in configs for s in (1, 2)}, key=src)
    compile_in_pool(functools.partial(_compile, plane), todo, workers, timeout)


def compile_in_pool(compile_some: Callable[[list], int], todo: list, workers: int, timeout: float) -> None:
    """Run `compile_some` (picklable: a module-level function or a partial of one) on `workers` slices of `todo`
    in fresh processes; past `timeout` seconds the workers are ended (the sweep compiles the rest as it goes)."""
    if workers <= 1 or not todo:
        return
    began = time.monotonic()
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(compile_some, todo[i::workers]) for i in range(workers)]
    finished, pending = concurrent.futures.wait(futures, timeout=timeout)
    done = sum(f.result() for f in finished if f.exception() is None)
    for f in finished:
        if f.exception() is not None:
            print(f"precompile worker failed: {type(f.exception()).__name__}: {f.exception()}")
    if pending:
        print(f"precompile: {len(pending)} workers past {timeout:.0f} s, ended")
        for proc in list(getattr(pool, "_processes", {}).values()):  # ProcessPoolExecutor has no public kill
            proc.terminate()
    pool.shutdown(wait=not pending, cancel_futures=True)
    print(f"precompiled {done} of {len(todo)} kernels in {time.monotonic() - began:.0f} s ({workers} processes)")


def sweep_int4(seconds: float = 240.0, rows_list: tuple[int, ...] = ROWS, plane: int = DEFAULT_PLANE,
               workers: int = min(8, os.cpu_count() or 1)) -> dict:
    """The sweep (see the module docstring); returns {"rows": {M: {shape: {...}}}, "layers": ..., "suggest": ...}."""
    start = time.monotonic()
    sm = splitk.sm_count_of(DEV)
    configs = {t for rows in rows_list for name, n, k in SHAPES for t in tile_grid(rows) if useful(t, rows, n, k, plane)}
    configs |= {w4a16.default_tiles(rows, n, k, sm) for rows in rows_list for _, n, k in SHAPES}
    precompile(configs, plane, workers, timeout=seconds / 2)
    weights, bf16 = {}, {}
    for name, n, k in SHAPES:
        weights[name] = build(n, k, plane)
        w = (torch.randn(n, k, device=DEV) / k**0.5).to(DTYPE)
        bf16[name] = (w.float(), [w] + [w.clone() for _ in range(max(1, min(8, -(-MIN_BYTES // (2 * n * k)))) - 1)])
    report: dict = {"plane": plane, "rows": {}, "skipped": 0}
    for rows in rows_list:
        for name, n, k in SHAPES:
            wt = weights[name]
            x = torch.randn(rows, k, device=DEV).to(DTYPE)
            ref = x.float() @ wt.reference.T
            where = f"M={rows} {name}"
            label, run = before_run(rows, n, k)
            default = w4a16.default_tiles(rows, n, k, sm)
            row = {"bf16": time_us(lambda a, ww: F.linear(a, ww), bf16[name][1], x, x.float() @ bf16[name][0].T,
                                   f"{where} bf16"),
                   "before": time_us(run, wt.packed, x, ref, f"{where} {label}"), "before_path": label,
                   "dequant": time_us(dequant_run, wt.packed, x, ref, f"{where} dequant"),
                   "default": time_us(lambda a, w, t=default: int4_linear(a, w, w4_tiles=t), wt.packed, x, ref,
                                      f"{where} {src(default)}"),
                   "default_tiles": src(default), "configs": {}}
            for t in tile_grid(rows):
                if not useful(t, rows, n, k, plane):
                    continue
                if time.monotonic() - start > seconds:
                    report["skipped"] += 1
                    continue
                us = time_us(lambda a, w, t=t: int4_linear(a, w, w4_tiles=t), wt.packed, x, ref, f"{where} {src(t)}")
                if us is not None:
                    row["configs"][src(t)] = us
            if row["default"] is not None:
                row["configs"].setdefault(src(default), row["default"])
            if row["configs"]:
                row["best_tiles"], row["best"] = min(row["configs"].items(), key=lambda kv: kv[1])
            report["rows"].setdefault(rows, {})[name] = row
            _print_row(rows, name, row)
    if report["skipped"]:
        print(f"sweep: out of time, {report['skipped']} configs skipped (raise --sweep-seconds)")
    _summary(report)
    return report


def _print_row(rows: int, name: str, row: dict) -> None:
    best = row.get("best")
    ratio = f" = {row['bf16'] / best:.2f}x bf16" if best and row["bf16"] else ""
    print(f"M={rows:3d} {name:8s} bf16 {_fmt(row['bf16'])} | before {_fmt(row['before'])} ({row['before_path']}) "
          f"| dequant+cuBLAS {_fmt(row['dequant'])} | default {_fmt(row['default'])} | best {_fmt(best)} "
          f"{row.get('best_tiles', '')}{ratio}", flush=True)


def _summary(report: dict) -> None:
    print("\nper layer (4 projections, us): bf16 | before | dequant+cuBLAS | w4a16 default | w4a16 best per shape "
          "| one config for the layer")
    layers, table = {}, []
    for rows, shapes in sorted(report["rows"].items()):
        cols = layers[rows] = {key: _layer(shapes, key) for key in ("bf16", "before", "dequant", "default", "best")}
        common = set.intersection(*(set(r["configs"]) for r in shapes.values())) if len(shapes) == len(SHAPES) else set()
        one = min(common, key=lambda c: sum(r["configs"][c] for r in shapes.values()), default=None)
        cols["one_config"] = sum(r["configs"][one] for r in shapes.values()) if one else None
        cols["one_config_tiles"] = one
        print(f"  M={rows:3d}: " + " | ".join(f"{key} {_fmt(cols[key])}" for key in
                                              ("bf16", "before", "dequant", "default", "best", "one_config"))
              + f"  ({one})", flush=True)
        for name, n, k in SHAPES:
            r = shapes.get(name, {})
            lost = rows >= w4a16.DEQUANT_MIN_ROWS and (r.get("dequant") is None or r["dequant"] <= r.get("best", 0))
            if "best_tiles" in r and not lost:  # from DEQUANT_MIN_ROWS an entry routes the shape here: only winners
                table.append(f"    ({rows}, {n}, {k}): {r['best_tiles']},  # {r['best']:.1f} us, bf16 {_fmt(r['bf16']).strip()}, "
                             f"dequant {_fmt(r.get('dequant')).strip()}")
    report["layers"] = layers
    known = {m: c for m, c in layers.items() if c["best"] is not None}
    dequant_from = next((m for m, c in sorted(known.items()) if c["dequant"] is not None and c["dequant"] < c["best"]),
                        None)
    report["suggest"] = {"DEQUANT_MIN_ROWS": dequant_from}
    print("\n# ready to paste into workers/quant/kernels/w4a16.py:")
    print("TILE_TABLE: dict[tuple[int, int, int], W4Tiles] = {")
    kept = [f"    {key}: {src(t)},  # kept (row bucket not swept)" for key, t in w4a16.TILE_TABLE.items()
            if key[0] not in report["rows"]]
    print("\n".join(sorted(kept + table, key=lambda line: int(line.split(",")[0].strip(" (")))))
    print("}")
    if dequant_from:
        print(f"# w4a16.DEQUANT_MIN_ROWS -> {dequant_from} (dequantize + cuBLAS beats the best W4A16 layer from there)")
    elif known:
        print(f"# w4a16.DEQUANT_MIN_ROWS -> > {max(known)} (W4A16 faster at every M measured: "
              "raise it past the largest M swept)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-seconds", type=float, default=240.0)
    parser.add_argument("--m", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--plane", type=int, default=DEFAULT_PLANE,
                        help="pack the weights in planes of this many columns (int4.pack_int4's max_plane; 16 or 32)")
    parser.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes compiling the configs before the timing (1: compile as the sweep goes)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {device_name(DEV)}; torch {torch.__version__}")
    report = sweep_int4(args.sweep_seconds, tuple(args.m), args.plane, args.compile_workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(DEV), **report}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
