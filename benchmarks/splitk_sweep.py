"""Tile sweep of the split-K GEMMs (workers/quant/kernels/splitk.py) on the GPU: INT4 g128 and INT8 at 2-256 rows.

What it answers: for each method (INT4 g128 asymmetric, planes of 32; INT8 per-channel), row count
M in 2 4 8 16 32 64 128 256 and Llama-3.1-8B projection (qkv, o, gate_up, down), which SplitTiles
are fastest, beside bf16 cuBLAS (F.linear), the path the engine ran before split-K ("current":
INT4 torch's tinygemm up to 16 rows, codes_gemm.py 64 x 64 tiles unsplit to 64, dequantize + cuBLAS
above; INT8 packed.py's dequantizing GEMM to 64 rows, dequantize + cuBLAS above), dequantize +
cuBLAS at every M, torch's tinygemm alone (INT4) and splitk.default_split_tiles' pick. Each time: a
CUDA graph of L calls over L weight copies (>= MIN_BYTES in all, so L2 holds none between calls),
replayed 20 times, CUDA events, median, after a warm-up call that also checks the output against
x @ W (fp32) within 2e-2 of its max; a config that fails to compile or the check is skipped.
Prints per (method, M, shape) the best, per (method, M) the layer sums, then, ready to paste into
splitk.py, the SPLIT_TABLE of the bests and the suggested packed.DEQUANT_MIN_ROWS (the first M
where dequantize + cuBLAS beats the best split-K layer) and tinygemm.TINY_MAX_ROWS (the last M
where torch's INT4 kernel still beats it). Budget: `seconds` (configs past it are skipped, said so).

Run: `python benchmarks/quant_kernels.py --sweep-splitk [--sweep-seconds 240]` (or this file directly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from shardserve.workers.bench.device import device_name, replay_ms
from shardserve.workers.quant.kernels import packed as pk
from shardserve.workers.quant.kernels import splitk
from shardserve.workers.quant.kernels import tinygemm as tg
from shardserve.workers.quant.kernels.int4 import Int4Packed, int4_linear, pack_int4
from shardserve.workers.quant.kernels.int8 import Int8Packed, int8_linear, pack_int8
from shardserve.workers.quant.kernels.int8_gemm import dequantize_int8
from shardserve.workers.quant.kernels.splitk import SplitTiles
from shardserve.workers.quant.weights import Int4Weight, Int8Weight

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
ROWS = splitk.SWEEP_ROWS
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
MIN_BYTES = 128 << 20  # weights streamed per graph replay: > 2x an H100's 50 MB L2
REL_TOL = 2e-2
BITS = {"int4": 4, "int8": 8}
Run = Callable[[torch.Tensor, object], torch.Tensor]


def tile_grid(rows: int) -> list[SplitTiles]:
    """(BLOCK_M, BLOCK_N, stages) near the rows, 4 or 8 warps (below), each at 1 / 2 / 4 / 8
    splits; 16 (tiles, stages) in all, shared between buckets (a kernel compiles once per tiles, stages
    and split-or-not: the row count and the split count are not specialized)."""
    if rows <= 16:
        shapes = [(16, bn, s) for bn in (32, 64, 128) for s in (3, 4)]
    elif rows <= 32:
        shapes = [(16, 64, 4), (16, 128, 4)] + [(32, bn, s) for bn in (64, 128) for s in (3, 4)]
    elif rows <= 64:
        shapes = [(32, bn, s) for bn in (64, 128) for s in (3, 4)] + [(64, 64, 3), (64, 128, 3)]
    else:
        shapes = [(64, 64, 3), (64, 128, 3)] + [(128, bn, s) for bn in (64, 128) for s in (2, 3)]
    # 8 warps from 32 x 128 and 128 x 64 tiles: INT4's three [BLOCK_M, BLOCK_N] fp32 accumulators hit 255
    # registers (and spilled) at 32 x 128 with 4 warps (ptxas, sm_90)
    return [SplitTiles(bm, bn, split, 8 if (bm >= 32 and bn >= 128) or bm >= 128 else 4, stages)
            for bm, bn, stages in shapes for split in (1, 2, 4, 8)]


def useful(t: SplitTiles, rows: int, n: int, steps: int) -> bool:
    """Skip splits that cannot help: more than 4 waves of programs already, or < 2 K steps a split."""
    tiles = -(-rows // t.block_m) * -(-n // t.block_n)
    return t.split_k == 1 or (tiles * t.split_k <= 4 * splitk.sm_count_of(DEV) and steps // t.split_k >= 2)


@dataclasses.dataclass
class Weights:
    """One method at one shape: packed copies (enough bytes to defeat L2), torch's INT4 packing, W in fp32."""

    packed: list
    tiny: list | None
    reference: torch.Tensor
    nbytes: int


def build(method: str, n: int, k: int) -> Weights:
    if method == "int4":
        g = k // 128
        scales = torch.rand(n, g, device=DEV) * 2e-3 + 1e-3
        w = Int4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=DEV), scales,
                       -torch.rand(n, g, device=DEV) * 16 * scales, 128)
        first = pack_int4(w, DTYPE)
    else:
        w = Int8Weight(torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV),
                       torch.rand(n, device=DEV) * 1e-3 + 1e-4)
        first = pack_int8(w, DTYPE)
    if isinstance(first, Int8Packed):
        nbytes = first.codes.numel() + first.scales.numel() * 4
    else:
        pw = first.weights
        nbytes = sum(t.numel() * t.element_size() for t in (pw.words, pw.scales, pw.mins))
    copies = max(2, min(32, -(-MIN_BYTES // nbytes)))
    packed = [first] + [_clone(first) for _ in range(copies - 1)]
    tiny = None
    if method == "int4" and tg.supported(w, DEV, DTYPE):
        t0 = tg.pack_tiny(w)
        tiny = [t0] + [dataclasses.replace(t0, words=t0.words.clone(), scales_zeros=t0.scales_zeros.clone())
                       for _ in range(copies - 1)]
    return Weights(packed, tiny, w.dequantize(), nbytes)


def _clone(p: Int4Packed | Int8Packed) -> Int4Packed | Int8Packed:
    if isinstance(p, Int8Packed):
        return Int8Packed(p.codes.clone(), p.scales.clone())
    w = dataclasses.replace(p.weights, words=p.weights.words.clone(), scales=p.weights.scales.clone(),
                            mins=p.weights.mins.clone())
    return Int4Packed(w, p.perm)


def time_us(run: Run, weights: list, x: torch.Tensor, ref: torch.Tensor, label: str = "") -> float | None:
    """us a call (graph of one call a weight copy, median replay / copies); None (printed) if the output
    is off x @ W = ref (fp32) or the kernel does not compile (shared memory, registers)."""
    try:
        return _time_us(run, weights, x, ref)
    except Exception as exc:
        print(f"    {label}: {type(exc).__name__}: {str(exc)[:100]}")
        return None


def _time_us(run: Run, weights: list, x: torch.Tensor, ref: torch.Tensor) -> float | None:
    y = run(x, weights[0]).float()
    if (y - ref).abs().max().item() > REL_TOL * max(1.0, ref.abs().max().item()):
        raise ValueError("output off the reference")
    for w in weights:  # warm-up (and compile) outside the capture
        run(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            run(x, w)
    us = replay_ms(graph) / len(weights) * 1e3
    del graph
    return us


def linear_of(method: str) -> Callable:
    return int4_linear if method == "int4" else int8_linear


LEGACY_DEQUANT_MIN_ROWS, LEGACY_TINY_MAX_ROWS = 65, 16  # the engine's cut-overs before split-K


def current_run(method: str, rows: int) -> tuple[str, Run, bool]:
    """What the engine ran before split-K at this M: (label, run, runs on the torch INT4 packing)."""
    lin = linear_of(method)
    if rows >= LEGACY_DEQUANT_MIN_ROWS:
        return "dequant+cuBLAS", dequant_run, False
    if method == "int4":
        if rows <= LEGACY_TINY_MAX_ROWS:
            return "tinygemm", lambda a, t: tg.tiny_linear(a, t), True
        return "codes 64x64", lambda a, w: lin(a, w, split_tiles=SplitTiles(64, 64, 1, 4, 3)), False
    return "int8 default tiles", lambda a, w: lin(a, w), False  # INT8's plane-layout GEMMs are gone


def dequant_run(a: torch.Tensor, w: Int4Packed | Int8Packed) -> torch.Tensor:
    if isinstance(w, Int8Packed):
        return F.linear(a, dequantize_int8(w.codes, w.scales, a.dtype))
    return F.linear(a, pk.dequantize_planes(w.weights, a.dtype))


def sweep_splitk(seconds: float = 240.0, methods: tuple[str, ...] = ("int4", "int8"),
                 rows_list: tuple[int, ...] = ROWS) -> dict:
    """The sweep (see the module docstring); returns {method: {M: {shape: {...}}}}."""
    start = time.monotonic()
    report: dict = {m: {} for m in methods}
    bf16: dict[tuple[int, str], float] = {}
    skipped = 0
    for name, n, k in SHAPES:
        w = (torch.randn(n, k, device=DEV) / k**0.5).to(DTYPE)
        copies = [w] + [w.clone() for _ in range(max(1, min(8, -(-MIN_BYTES // (2 * n * k)))) - 1)]
        for rows in rows_list:
            x = torch.randn(rows, k, device=DEV).to(DTYPE)
            bf16[(rows, name)] = time_us(lambda a, ww: F.linear(a, ww), copies, x, x.float() @ w.float().T,
                                         f"bf16 M={rows} {name}")
        del w, copies
    for i, method in enumerate(methods):
        bits = BITS[method]
        deadline = start + seconds * (i + 1) / len(methods)  # each method its share
        for name, n, k in SHAPES:
            weights = build(method, n, k)
            steps = splitk.k_steps(bits, k)
            for rows in rows_list:
                x = torch.randn(rows, k, device=DEV).to(DTYPE)
                ref = x.float() @ weights.reference.T
                where = f"{method} M={rows} {name}"
                label, run, on_tiny = current_run(method, rows)
                current_weights = weights.tiny if on_tiny else weights.packed
                row = {"bf16": bf16[(rows, name)],
                       "current": time_us(run, current_weights, x, ref, f"{where} {label}") if current_weights else None,
                       "current_path": label,
                       "dequant": time_us(dequant_run, weights.packed, x, ref, f"{where} dequant")}
                if weights.tiny is not None:
                    row["tinygemm"] = time_us(lambda a, t: tg.tiny_linear(a, t), weights.tiny, x, ref, f"{where} tiny")
                lin = linear_of(method)
                default = splitk.default_split_tiles(bits, rows, n, k, splitk.sm_count_of(DEV))
                row["default_tiles"] = _src(default)
                row["default"] = time_us(lambda a, w, t=default, f=lin: f(a, w, split_tiles=t), weights.packed, x, ref,
                                         f"{where} {default}")
                results = []
                for t in tile_grid(rows):
                    if not useful(t, rows, n, steps):
                        continue
                    if time.monotonic() > deadline:
                        skipped += 1
                        continue
                    us = time_us(lambda a, w, t=t, f=lin: f(a, w, split_tiles=t), weights.packed, x, ref, f"{where} {t}")
                    if us is not None:
                        results.append((us, t))
                if results:
                    us, t = min(results, key=lambda r: r[0])
                    row.update(best=us, best_tiles=_src(t))
                report[method].setdefault(rows, {})[name] = row
                _print_row(method, rows, name, row)
            del weights
            torch.cuda.empty_cache()
    if skipped:
        print(f"sweep: out of time, {skipped} configs skipped (raise --sweep-seconds)")
    _summary(report)
    return report


def _src(t: SplitTiles) -> str:
    return f"SplitTiles({t.block_m}, {t.block_n}, {t.split_k}, {t.num_warps}, {t.num_stages})"


def _fmt(us: float | None) -> str:
    return "  n/a" if us is None else f"{us:6.1f}"


def _print_row(method: str, rows: int, name: str, row: dict) -> None:
    best = row.get("best")
    extra = f" tinygemm {_fmt(row['tinygemm'])}" if "tinygemm" in row else ""
    ratio = f" = {row['bf16'] / best:.2f}x bf16" if best and row["bf16"] else ""
    print(f"{method} M={rows:3d} {name:8s} bf16 {_fmt(row['bf16'])} | current {_fmt(row['current'])} "
          f"({row['current_path']}) | dequant+cuBLAS {_fmt(row['dequant'])}{extra} | default {_fmt(row['default'])} "
          f"| best {_fmt(best)} {row.get('best_tiles', '')}{ratio}", flush=True)


def _layer(rows_report: dict, key: str) -> float | None:
    vals = [r.get(key) for r in rows_report.values()]
    return None if len(vals) < len(SHAPES) or any(v is None for v in vals) else sum(vals)


def _summary(report: dict) -> None:
    print("\nper layer (4 projections, us): bf16 | current | dequant+cuBLAS | tinygemm | split default | split best")
    table = []
    for method, by_rows in report.items():
        layers = {}
        for rows, shapes in sorted(by_rows.items()):
            cols = layers[rows] = {key: _layer(shapes, key) for key in
                                   ("bf16", "current", "dequant", "tinygemm", "default", "best")}
            print(f"  {method} M={rows:3d}: " + " | ".join(f"{key} {_fmt(v)}" for key, v in cols.items()), flush=True)
            for name, n, k in SHAPES:
                r = shapes.get(name, {})
                if "best_tiles" in r:
                    table.append(f"    ({BITS[method]}, {rows}, {n}, {k}): {r['best_tiles']},  # {r['best']:.1f} us, "
                                 f"bf16 {_fmt(r['bf16']).strip()}")
        _suggest(method, layers)
    print("\n# ready to paste into workers/quant/kernels/splitk.py:")
    print("SPLIT_TABLE: dict[tuple[int, int, int, int], SplitTiles] = {")
    print("\n".join(table))
    print("}")


def _suggest(method: str, layers: dict[int, dict[str, float | None]]) -> None:
    """The cut-overs the layer sums suggest: DEQUANT_MIN_ROWS (first M where dequantize + cuBLAS beats the
    best split-K layer) and, for INT4, TINY_MAX_ROWS (last M where torch's kernel beats it)."""
    known = {m: c for m, c in layers.items() if c["best"] is not None}
    unknown = sorted(set(layers) - set(known))
    note = f" (no complete split-K layer at M = {unknown})" if unknown else ""
    dequant_from = next((m for m, c in sorted(known.items()) if c["dequant"] is not None and c["dequant"] < c["best"]),
                        None)
    if dequant_from:
        where = f"{dequant_from}: dequantize + cuBLAS faster from there"
    elif known:
        where = f"> {max(known)}: split-K faster at every M measured"
    else:
        where = "unknown"
    print(f"# {method}: packed.DEQUANT_MIN_ROWS -> {where}{note}")
    if method == "int4":
        tiny = [m for m, c in known.items() if c["tinygemm"] is not None and c["tinygemm"] < c["best"]]
        print(f"# int4: tinygemm.TINY_MAX_ROWS -> {max(tiny, default=0)} (last M where torch's kernel beats split-K; "
              f"0 = none){note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-seconds", type=float, default=240.0)
    parser.add_argument("--methods", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    parser.add_argument("--m", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {device_name(DEV)}; torch {torch.__version__}")
    report = sweep_splitk(args.sweep_seconds, tuple(args.methods), tuple(args.m))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
