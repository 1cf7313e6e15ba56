"""Tile sweep of the INT8 weight-only GEMM (workers/quant/kernels/int8_gemm.py) on the GPU at 128-1024 rows.

What it answers: for each row count M in int8.GEMM_ROWS (128 256 512 1024, or `--m`) and Llama-3.1-8B
projection (qkv, o, gate_up, down; INT8 per-channel codes as stored), which SplitTiles of int8_gemm.py are
fastest, beside bf16 cuBLAS (F.linear), the engine's INT8 path without GEMM_TABLE ("before": the split-K
GEMM with splitk.default_split_tiles below packed.DEQUANT_MIN_ROWS rows, dequantize + cuBLAS from there)
and dequantize + cuBLAS at every M. Timing, checks and the budget as int4_sweep.py (graph of one call a
weight copy, >= 128 MB of weights; the output checked against x @ W in fp32; configs compiled first in
parallel processes; M outer, so a budget cut drops the largest M first).
Prints per (M, shape) the best beside the others, per M the layer sums, then, ready to paste into
workers/quant/kernels/int8.py, GEMM_TABLE: the entries where the best tiles beat both "before" and
dequantize + cuBLAS (shapes the table leaves out keep the engine's routes).

Run: `python benchmarks/quant_kernels.py --sweep-int8 [--m 128 256 512 1024] [--sweep-seconds 60] [--json FILE]`
(with `--sweep-int4` in the same call the two share the budget), or this file directly.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from int4_sweep import compile_in_pool
from shardserve.workers.bench.device import device_name
from shardserve.workers.quant.kernels import int8 as int8_kernels
from shardserve.workers.quant.kernels import packed as pk
from shardserve.workers.quant.kernels import splitk
from shardserve.workers.quant.kernels.int8 import int8_linear
from shardserve.workers.quant.kernels.splitk import SplitTiles
from splitk_sweep import MIN_BYTES, SHAPES, _fmt, build, dequant_run, time_us

ROWS = int8_kernels.GEMM_ROWS
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
COMPILE_SHAPE = (4096, 4096)  # as int4_sweep.py: the specialization of every Llama shape


def tile_grid(rows: int) -> list[SplitTiles]:
    """(BLOCK_M, BLOCK_N, warps, stages) near the rows, at 1 and 2 K splits (`useful` drops
    splits that cannot help). Each compiles for sm_90 without spills within 227 KiB of shared memory (ptxas,
    checked without a GPU: 256 x 128 at 3 stages and 256 x 256 do not; 128 x 128 at 4 warps spills)."""
    if rows <= 128:
        shapes = [(128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 256, 8, 3),
                  (128, 256, 8, 2)]
    else:
        shapes = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 256, 8, 2), (256, 128, 8, 2), (128, 128, 8, 4),
                  (128, 256, 8, 3), (256, 64, 8, 3), (64, 256, 8, 3), (128, 64, 4, 3)]
    return [SplitTiles(bm, bn, split, warps, stages) for bm, bn, warps, stages in shapes for split in (1, 2)]


def useful(t: SplitTiles, rows: int, n: int, k: int) -> bool:
    """Splits only where one split leaves under two waves of programs, each split >= 4 K steps of 128."""
    tiles = -(-rows // t.block_m) * -(-n // t.block_n)
    steps = splitk.k_steps(8, k)
    return t.split_k == 1 or (tiles < 2 * splitk.sm_count_of(DEV) and steps // t.split_k >= 4)


def src(t: SplitTiles) -> str:
    return f"SplitTiles({t.block_m}, {t.block_n}, {t.split_k}, {t.num_warps}, {t.num_stages})"


def before_run(rows: int, n: int, k: int):
    """The engine's INT8 path at this M without GEMM_TABLE: (label, run)."""
    if rows >= pk.DEQUANT_MIN_ROWS:
        return "dequant+cuBLAS", dequant_run
    t = splitk.default_split_tiles(8, rows, n, k, splitk.sm_count_of(DEV))
    return f"split {src(t)}", lambda a, w, t=t: int8_linear(a, w, split_tiles=t)


def _compile(tiles: list[SplitTiles]) -> int:
    """In a worker process: each config once on a COMPILE_SHAPE weight (Triton's disk cache keeps the binary)."""
    torch.manual_seed(0)
    n, k = COMPILE_SHAPE
    packed = build("int8", n, k).packed[0]
    x = torch.randn(16, k, device=DEV).to(DTYPE)
    done = 0
    for t in tiles:
        try:
            int8_linear(x, packed, split_tiles=t)
            done += 1
        except Exception as exc:  # reported again (and skipped) when the sweep times it
            print(f"  precompile {src(t)}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
    torch.cuda.synchronize()
    return done


def sweep_int8(seconds: float = 60.0, rows_list: tuple[int, ...] = ROWS,
               workers: int = min(8, os.cpu_count() or 1)) -> dict:
    """The sweep (see the module docstring); returns {"rows": {M: {shape: {...}}}, "layers": ..., "table": [...]}."""
    start = time.monotonic()
    configs = {t for rows in rows_list for _, n, k in SHAPES for t in tile_grid(rows) if useful(t, rows, n, k)}
    todo = sorted({SplitTiles(t.block_m, t.block_n, s, t.num_warps, t.num_stages) for t in configs for s in (1, 2)},
                  key=src)
    compile_in_pool(_compile, todo, workers, timeout=seconds / 2)
    report: dict = {"rows": {}, "skipped": 0}
    for name, n, k in SHAPES:
        weights = build("int8", n, k)
        w = (torch.randn(n, k, device=DEV) / k**0.5).to(DTYPE)
        copies = [w] + [w.clone() for _ in range(max(1, min(8, -(-MIN_BYTES // (2 * n * k)))) - 1)]
        for rows in rows_list:
            x = torch.randn(rows, k, device=DEV).to(DTYPE)
            ref = x.float() @ weights.reference.T
            where = f"int8 M={rows} {name}"
            label, run = before_run(rows, n, k)
            row = {"bf16": time_us(lambda a, ww: F.linear(a, ww), copies, x, x.float() @ w.float().T, f"{where} bf16"),
                   "before": time_us(run, weights.packed, x, ref, f"{where} {label}"), "before_path": label,
                   "dequant": time_us(dequant_run, weights.packed, x, ref, f"{where} dequant"), "configs": {}}
            for t in tile_grid(rows):
                if not useful(t, rows, n, k):
                    continue
                if time.monotonic() - start > seconds:
                    report["skipped"] += 1
                    continue
                us = time_us(lambda a, p, t=t: int8_linear(a, p, split_tiles=t), weights.packed, x, ref, f"{where} {src(t)}")
                if us is not None:
                    row["configs"][src(t)] = us
            if row["configs"]:
                row["best_tiles"], row["best"] = min(row["configs"].items(), key=lambda kv: kv[1])
            report["rows"].setdefault(rows, {})[name] = row
            _print_row(rows, name, row)
        del weights, w, copies
        torch.cuda.empty_cache()
    if report["skipped"]:
        print(f"int8 sweep: out of time, {report['skipped']} configs skipped (raise --sweep-seconds)")
    _summary(report)
    return report


def _print_row(rows: int, name: str, row: dict) -> None:
    best = row.get("best")
    ratio = f" = {row['bf16'] / best:.2f}x bf16" if best and row["bf16"] else ""
    print(f"int8 M={rows:4d} {name:8s} bf16 {_fmt(row['bf16'])} | before {_fmt(row['before'])} ({row['before_path']}) "
          f"| dequant+cuBLAS {_fmt(row['dequant'])} | best {_fmt(best)} {row.get('best_tiles', '')}{ratio}", flush=True)


def _summary(report: dict) -> None:
    print("\nint8 per layer (4 projections, us): bf16 | before | dequant+cuBLAS | GEMM best per shape | with GEMM_TABLE")
    layers, table = {}, []
    for rows, shapes in sorted(report["rows"].items()):
        cols = {}
        for key in ("bf16", "before", "dequant", "best"):
            vals = [r.get(key) for r in shapes.values()]
            cols[key] = None if len(vals) < len(SHAPES) or None in vals else sum(vals)
        routed = []
        for name, n, k in SHAPES:
            r = shapes.get(name, {})
            rivals = [v for v in (r.get("before"), r.get("dequant")) if v is not None]
            if r.get("best") is not None and (not rivals or r["best"] < min(rivals)):
                table.append(f"    ({rows}, {n}, {k}): {r['best_tiles']},  # {r['best']:.1f} us, bf16 "
                             f"{_fmt(r['bf16']).strip()}, before {_fmt(r['before']).strip()}, "
                             f"dequant {_fmt(r['dequant']).strip()}")
                routed.append(r["best"])
            else:
                routed.append(r.get("before"))
        cols["routed"] = None if len(routed) < len(SHAPES) or None in routed else sum(routed)
        layers[rows] = cols
        print(f"  M={rows:4d}: " + " | ".join(f"{key} {_fmt(v)}" for key, v in cols.items()), flush=True)
    report["layers"], report["table"] = layers, table
    print("\n# ready to paste into workers/quant/kernels/int8.py:")
    print("GEMM_TABLE: dict[tuple[int, int, int], SplitTiles] = {")
    kept = [f"    {key}: {src(t)},  # kept (row bucket not swept)" for key, t in int8_kernels.GEMM_TABLE.items()
            if key[0] not in report["rows"]]
    for line in sorted(kept + table, key=lambda line: int(line.split(",")[0].strip(" ("))):
        print(line)
    print("}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-seconds", type=float, default=60.0)
    parser.add_argument("--m", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {device_name(DEV)}; torch {torch.__version__}")
    report = sweep_int8(args.sweep_seconds, tuple(args.m), args.compile_workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(DEV), **report}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
