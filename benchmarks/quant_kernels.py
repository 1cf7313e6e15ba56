"""Quantized linear kernels on the GPU vs bf16: Llama-3.1-8B projections at M = 1, 16, 256.

What it answers: how close do the INT4 (g128, symmetric and asymmetric), INT8 and FP8 linears of
workers/quant/kernels/ come to the copy-bandwidth floor of their packed bytes, and how do they
compare with bf16 (parallel/kernels/decode_linear.py at M = 1, F.linear otherwise)? Each case is a
CUDA graph of L calls, each on its own copy of the weights (L x bytes >= 400 MB, so L2 holds none
of it between calls), replayed 20 times: time per call = median replay / L. Floor = packed bytes
(codes + scales + mins) / the copy bandwidth measured in this run (a 1 GiB device-to-device copy,
read + write bytes, as benchmarks/gemv_gpu.py); "% floor" = floor / time. Beside each: the max
abs error vs the dequantized weights in fp32 (FP8: vs x @ W, its activation rounding included).
"fp8" is what fp8_linear does (W8A16 GEMV at one row, W8A16 split-K GEMM up to SPLITK_MAX_ROWS, W8A8
_scaled_mm above); "fp8_w8a8" forces _scaled_mm at M <= SPLITK_MAX_ROWS too. "tinygemm" is the engine's INT4 path on
CUDA (kernels/tinygemm.py: torch's own kernel up to 16 rows, the plane kernels above); "int4_*" the
plane kernels alone; "q4_k" / "q6_k" GGUF k-quant shapes on kernels/kquant.py (float32 scales, exact).

`--check`: every kernel once at every shape and M vs the reference, with a tolerance (FP8 also
vs its own quantized activations, tightly); exit status 1 on any failure. A kernel that raises
is printed and the run goes on (then exit status 1). `--sweep`: a small GEMV tile sweep at M = 1 (~60 s);
`--sweep-gemv`: INT8 / FP8 GEMV tiles at M = 1 per shape;
`--sweep-splitk`: splitk_sweep.py (split-K tiles at M 2-256, ~4 min; alone unless --m is given);
`--sweep-int4` / `--sweep-int8`: int4_sweep.py / int8_sweep.py (GEMM tiles at M 16-1024 / 128-1024 or --m; alone).
`--methods bf16,int8,fp8` keeps only those cases; `--fp8-splitk-max-rows N` moves fp8's W8A16 / W8A8 cut-over.
Run: `python benchmarks/quant_kernels.py [--check] [--sweep | --sweep-gemv | --sweep-splitk] [--m 1 16 256] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from shardserve.parallel.kernels.decode_linear import GemvTiles, decode_linear
from shardserve.workers.bench.device import copy_bandwidth, device_name, replay_ms
from shardserve.workers.quant.kernels import fp8 as fp8_kernels
from shardserve.workers.quant.kernels import packed as pk
from shardserve.workers.quant.kernels import tinygemm as tg
from shardserve.workers.quant.kernels.fp8 import (
    GEMV_MAX_ROWS,
    fp8_gemv,
    fp8_linear,
    pack_fp8,
    quantize_rows,
)
from shardserve.workers.quant.kernels.int4 import Int4Packed, int4_linear, pack_int4
from shardserve.workers.quant.kernels.int8 import Int8Packed, int8_linear, pack_int8
from shardserve.workers.quant.kernels.kquant import Q6kPacked, pack_q4k, pack_q6k, q6k_linear
from shardserve.workers.quant.weights import Fp8Weight, Int4Weight, Int8Weight

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
MIN_BYTES = 400 << 20
REL_TOL = {"q4_k": 2e-2, "q6_k": 2e-2, "tinygemm": 2e-2, "bf16": 2e-2, "int4_sym": 2e-2, "int4_asym": 2e-2, "int8": 2e-2, "fp8": 8e-2, "fp8_w8a8": 8e-2}


@dataclasses.dataclass
class Case:
    """One method at one shape: make(i) gives the i-th copy of its weights, run(x, weights) the output."""

    name: str
    nbytes: int
    reference: torch.Tensor  # W as the method sees it, fp32 [N, K]
    make: Callable[[int], object]
    run: Callable[[torch.Tensor, object], torch.Tensor]


def int4_weight(n: int, k: int, symmetric: bool) -> Int4Weight:
    g = k // 128
    scales = torch.rand(n, g, device=DEV) * 2e-3 + 1e-3
    mins = -8 * scales if symmetric else -torch.rand(n, g, device=DEV) * 16 * scales
    return Int4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=DEV), scales, mins, 128)


def kquant_weight(n: int, k: int, bits: int) -> Int4Weight:
    """A GGUF k-quant-shaped weight (formats/gguf_kquant.py): Q4_K 4-bit g32 asymmetric, Q6_K 6-bit g16
    symmetric, float32 scales (kernels/kquant.py keeps them exact)."""
    g = 32 if bits == 4 else 16
    scales = torch.rand(n, k // g, device=DEV) * 2e-3 + 1e-3
    mins = -torch.rand(n, k // g, device=DEV) * 16 * scales if bits == 4 else -32 * scales
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=DEV)
    return Int4Weight(q, scales, mins, g, bits=bits, float32_scales=True)


def clone_packed(p: object) -> object:
    if isinstance(p, Int4Packed):
        w = p.weights
        return Int4Packed(dataclasses.replace(w, words=w.words.clone(), scales=w.scales.clone(),
                                              mins=w.mins.clone()), p.perm)
    if isinstance(p, Q6kPacked):
        w = p.weights
        return Q6kPacked(dataclasses.replace(w, words=w.words.clone(), scales=w.scales.clone(), mins=w.mins.clone()))
    if isinstance(p, Int8Packed):
        return Int8Packed(p.codes.clone(), p.scales.clone())
    return dataclasses.replace(p, weight_t=p.weight_t.t().clone().t(), scales=p.scales.clone())


def packed_bytes(p: object) -> int:
    if isinstance(p, Int4Packed | Q6kPacked):
        w = p.weights
        return sum(t.numel() * t.element_size() for t in (w.words, w.scales, w.mins))
    if isinstance(p, Int8Packed):
        return p.codes.numel() + p.scales.numel() * 4
    return p.weight_t.numel() + p.scales.numel() * 4


def cases(n: int, k: int, rows: int) -> list[Case]:
    out = []
    w_bf16 = (torch.randn(n, k, device=DEV) / k**0.5).to(DTYPE)

    def bf16_run(x, w):
        return decode_linear(x, w) if rows == 1 else F.linear(x, w)

    out.append(Case("bf16", n * k * 2, w_bf16.float(),
                    lambda i, w=w_bf16: w if i == 0 else w.clone(), bf16_run))
    del w_bf16
    for sym in (True, False):
        w4 = int4_weight(n, k, sym)
        p4 = pack_int4(w4, DTYPE)
        out.append(Case("int4_sym" if sym else "int4_asym", packed_bytes(p4), w4.dequantize(),
                        lambda i, p=p4: p if i == 0 else clone_packed(p), int4_linear))
        if not sym:
            tiny = tinygemm_case(w4)
            if tiny is not None:
                out.append(tiny)
        del w4
    for label, wk in (("q4_k", kquant_weight(n, k, 4)), ("q6_k", kquant_weight(n, k, 6))):
        pk_ = pack_q4k(wk) if label == "q4_k" else pack_q6k(wk)
        out.append(Case(label, packed_bytes(pk_), wk.dequantize(), lambda i, p=pk_: p if i == 0 else clone_packed(p),
                        int4_linear if label == "q4_k" else q6k_linear))
        del wk
    w8 = Int8Weight(torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV),
                    torch.rand(n, device=DEV) * 1e-3 + 1e-4)
    p8 = pack_int8(w8, DTYPE)
    out.append(Case("int8", packed_bytes(p8), w8.dequantize(), lambda i, p=p8: p if i == 0 else clone_packed(p),
                    int8_linear))
    del w8
    wf = (torch.randn(n, k, device=DEV) / k**0.5)
    sf = wf.abs().amax(dim=1) / 448
    f8 = Fp8Weight((wf / sf[:, None]).to(torch.float8_e4m3fn), sf)
    pf = pack_fp8(f8)
    for label, gemv_rows, splitk_rows in (("fp8", GEMV_MAX_ROWS, None), ("fp8_w8a8", 0, 0)):
        if label == "fp8_w8a8" and rows > fp8_kernels.SPLITK_MAX_ROWS:
            continue  # the same path as "fp8"
        out.append(Case(label, packed_bytes(pf), f8.dequantize(), lambda i, p=pf: p if i == 0 else clone_packed(p),
                        lambda a, w, g=gemv_rows, s=splitk_rows, **kw: fp8_linear(a, w, gemv_max_rows=g,
                                                                                    splitk_max_rows=s, **kw)))
    return out


def tinygemm_case(w4: Int4Weight) -> Case | None:
    """What the engine runs for INT4 on CUDA with bf16 (kernels/tinygemm.py's dual packing: torch's kernel
    up to TINY_MAX_ROWS rows, the plane kernels above), on the same codes / scales / mins; bytes = torch's
    packing (what the decode rows read)."""
    if not tg.supported(w4, DEV, DTYPE):
        return None
    first = tg.pack_dual(w4, DTYPE)
    nbytes = first.tiny.words.numel() * 4 + first.tiny.scales_zeros.numel() * 2
    return Case("tinygemm", nbytes, w4.dequantize(), lambda i: first if i == 0 else tg.pack_dual(w4, DTYPE),
                tg.dual_linear)


def error_of(case: Case, x: torch.Tensor) -> tuple[float, float, float]:
    """(max abs error vs x @ W in fp32, tolerance, max abs error of FP8 vs its own quantized x or 0)."""
    y = case.run(x, case.make(0)).float()
    ref = x.float() @ case.reference.T
    scale = max(1.0, ref.abs().max().item())
    own = 0.0
    tol = REL_TOL[case.name] * scale
    if case.name == "fp8_w8a8" or (case.name == "fp8" and x.shape[0] > fp8_kernels.SPLITK_MAX_ROWS):
        q, s = quantize_rows(x)
        own = ((y - (q.float() * s) @ case.reference.T).abs().max().item()) / scale
    elif case.name == "fp8":  # decode rows and small batches: W8A16, x not quantized
        tol = REL_TOL["bf16"] * scale
    return (y - ref).abs().max().item(), tol, own


def graph_us(case: Case, x: torch.Tensor) -> float:
    """GPU microseconds per call: a CUDA graph of L calls over L weight copies, median of 20 replays."""
    copies = max(2, min(64, -(-MIN_BYTES // case.nbytes)))
    weights = [case.make(i) for i in range(copies)]

    def body():
        for w in weights:
            case.run(x, w)

    body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return replay_ms(graph) / copies * 1e3


def sweep(bandwidth: float, budget_s: float) -> dict:
    """INT4 (g128 asym, planes of 16 / 32 / 128 columns) GEMV tiles at M = 1, INT4 GEMM tiles at
    M = 16 and 256, every shape; the best 3 printed per shape and the best overall (sum over shapes)."""
    deadline = time.monotonic() + budget_s
    gemv = [pk.GemvTiles(bn, u, nw) for bn in (4, 8, 16) for u in (1, 2, 4, 8, 16, 32) for nw in (4, 8)]
    gemm16 = [pk.GemmTiles(16, bn, nw, 3, cd) for bn in (32, 64) for nw in (4, 8) for cd in (False, True)]
    gemm256 = [pk.GemmTiles(64, 64, 4, 3, True), pk.GemmTiles(64, 128, 8, 3, True), pk.GemmTiles(128, 64, 8, 3, True),
               pk.GemmTiles(128, 128, 8, 3, True), pk.GemmTiles(128, 128, 8, 2, True), pk.GemmTiles(64, 64, 4, 1)]
    variants: list[tuple[str, int, Callable]] = []
    for plane in (16, 32, 128):
        for t in gemv:
            if 4 * plane * t.chunks in (1024, 2048):  # bytes of a row an iteration
                variants.append((f"int4 p{plane} {t}", 1, lambda n, k, t=t, p=plane: (
                    int4_case(n, k, p), lambda a, w: int4_linear(a, w, gemv_tiles=t))))
    for rows, grid, planes in ((16, gemm16, (16, 32, 128)), (256, gemm256, (16, 128))):
        for plane in planes:
            for t in grid:
                variants.append((f"int4 p{plane} {t}", rows, lambda n, k, t=t, p=plane: (
                    int4_case(n, k, p), lambda a, w: int4_linear(a, w, gemm_tiles=t))))
    results: dict[str, dict[str, float]] = {}
    for label, rows, build in variants:
        if time.monotonic() > deadline:
            print("sweep: out of time")
            break
        per_shape = {}
        for name, n, k in SHAPES:
            x = torch.randn(rows, k, device=DEV).to(DTYPE)
            try:
                base, run = build(n, k)
                case = dataclasses.replace(base, run=lambda a, w, r=run: r(a, w))
                err, tol, _ = error_of(case, x)
                if err > tol:
                    print(f"  {label} {name}: error {err:.3g} > {tol:.3g}")
                    break
                per_shape[name] = graph_us(case, x) / (case.nbytes / bandwidth * 1e6)  # time / floor
            except Exception as exc:  # a tile the compiler rejects
                print(f"  {label} {name}: {type(exc).__name__}: {str(exc)[:120]}")
                break
        else:
            results[f"M{rows} {label}"] = per_shape
            print(f"M{rows} {label}: " + " ".join(f"{s} {100 / r:4.1f}%" for s, r in per_shape.items()), flush=True)
    for prefix in ("M1 int4 p16", "M1 int4 p32", "M1 int4 p128", "M16 int4 p16", "M16 int4 p32",
                   "M16 int4 p128", "M256 int4 p16", "M256 int4 p128"):
        mine = {lb: r for lb, r in results.items() if lb.startswith(prefix + " ")}
        if not mine:
            continue
        best = min(mine, key=lambda lb: sum(mine[lb].values()))
        print(f"best {prefix}: {best}: " + " ".join(f"{s} {100 / r:4.1f}%" for s, r in mine[best].items()))
        for name, _, _ in SHAPES:
            top = sorted(mine, key=lambda lb, nm=name: mine[lb][nm])[:3]
            print(f"  {name}: " + "; ".join(f"{lb} {100 / mine[lb][name]:4.1f}%" for lb in top))
    return results


def sweep_gemv(bandwidth: float, budget_s: float) -> dict:
    """INT8 and FP8 GEMV tiles (decode_linear's kernel on 1-byte codes) at M = 1, every shape: per shape the best 3 (us and %
    of the floor) beside the default tiles, and a table of each shape's best to paste into the kernels."""
    deadline = time.monotonic() + budget_s
    grid = [GemvTiles(bn, bk, nw, ns) for bn in (1, 2, 4) for bk in (1024, 2048, 4096) for nw in (4, 8)
            for ns in (1, 2, 3)]
    results: dict[str, dict[str, float]] = {}
    for name, n, k in SHAPES:
        x = torch.randn(1, k, device=DEV).to(DTYPE)
        by_name = {c.name: c for c in cases(n, k, 1) if c.name in ("bf16", "int8", "fp8")}
        variants = [("int8 default", by_name["int8"], int8_linear), ("fp8 default", by_name["fp8"], fp8_gemv)]
        variants += [(f"int8 {t}", by_name["int8"], lambda a, w, t=t: int8_linear(a, w, gemv_tiles=t)) for t in grid]
        variants += [(f"fp8 {t}", by_name["fp8"], lambda a, w, t=t: fp8_gemv(a, w, tiles=t)) for t in grid]
        results[f"{name} bf16"] = {"us": graph_us(by_name["bf16"], x)}
        for label, base, run in variants:
            if time.monotonic() > deadline:
                print("sweep: out of time")
                break
            case = dataclasses.replace(base, run=run)
            try:
                err, tol, _ = error_of(case, x)
                if err > tol:
                    print(f"  {name} {label}: error {err:.3g} > {tol:.3g}")
                    continue
                us = graph_us(case, x)
            except Exception as exc:  # a tile the compiler rejects
                print(f"  {name} {label}: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            results[f"{name} {label}"] = {"us": us, "floor_pct": 100 * case.nbytes / bandwidth * 1e6 / us}
        del by_name, variants
        torch.cuda.empty_cache()
        bf16_us = results[f"{name} bf16"]["us"]
        for method in ("int8", "fp8"):
            mine = {lb: r for lb, r in results.items() if lb.startswith(f"{name} {method} ")}
            top = sorted(mine, key=lambda lb, m=mine: m[lb]["us"])[:3]
            default = mine.get(f"{name} {method} default", {}).get("us", float("nan"))
            print(f"{name} {method}: default {default:.1f} us; best " + "; ".join(
                f"{lb.split(' ', 2)[2]} {mine[lb]['us']:.1f} us {mine[lb]['floor_pct']:.0f}%" for lb in top)
                + f"; bf16 {bf16_us:.1f} us", flush=True)
    return results


def int4_case(n: int, k: int, plane: int = 128) -> Case:
    w4 = int4_weight(n, k, False)
    p4 = pack_int4(w4, DTYPE, max_plane=plane)
    return Case("int4_asym", packed_bytes(p4), w4.dequantize(), lambda i, p=p4: p if i == 0 else clone_packed(p),
                int4_linear)


def int8_case(n: int, k: int) -> Case:
    w8 = Int8Weight(torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV),
                    torch.rand(n, device=DEV) * 1e-3 + 1e-4)
    p8 = pack_int8(w8, DTYPE)
    return Case("int8", packed_bytes(p8), w8.dequantize(), lambda i, p=p8: p if i == 0 else clone_packed(p),
                int8_linear)


def fp8_case(n: int, k: int) -> Case:
    wf = torch.randn(n, k, device=DEV) / k**0.5
    sf = wf.abs().amax(dim=1) / 448
    f8 = Fp8Weight((wf / sf[:, None]).to(torch.float8_e4m3fn), sf)
    pf = pack_fp8(f8)
    return Case("fp8", packed_bytes(pf), f8.dequantize(), lambda i, p=pf: p if i == 0 else clone_packed(p),
                fp8_linear)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", help="rows of the kernel table (default 1 16 256; with "
                        "--sweep-splitk the table runs only when given)")
    parser.add_argument("--check", action="store_true", help="only run every kernel once vs the reference")
    parser.add_argument("--sweep", action="store_true", help="a tile sweep (GEMV at M = 1, GEMM at M = 16)")
    parser.add_argument("--sweep-seconds", type=float, help="the sweep's time budget (default: --sweep 60, "
                        "--sweep-splitk 200, the whole run then ~4 min on an H100)")
    parser.add_argument("--sweep-splitk", action="store_true",
                        help="split-K GEMM tiles (splitk_sweep.py), INT4 g128 / INT8 at M = 2 ... 256")
    parser.add_argument("--sweep-gemv", action="store_true", help="INT8 and FP8 GEMV tiles at M = 1, per shape")
    parser.add_argument("--sweep-int4", action="store_true",
                        help="W4A16 GEMM tiles (int4_sweep.py), INT4 g128 at M = 16 ... 1024 (or --m)")
    parser.add_argument("--sweep-int8", action="store_true",
                        help="INT8 GEMM tiles (int8_sweep.py) at M = 128 ... 1024 (or --m); with --sweep-int4 in one budget")
    parser.add_argument("--methods", help="only these cases of the table, comma-separated (e.g. bf16,int8,fp8)")
    parser.add_argument("--fp8-splitk-max-rows", type=int,
                        help="fp8_linear's W8A16 split-K up to this many rows (default: SPLITK_MAX_ROWS)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.fp8_splitk_max_rows is not None:
        fp8_kernels.SPLITK_MAX_ROWS = args.fp8_splitk_max_rows  # fp8_linear reads it at call time
    only = set(args.methods.split(",")) if args.methods else None
    m_given = args.m is not None
    args.m = args.m or [1, 16, 256]
    torch.manual_seed(0)
    print(f"device: {device_name(DEV)}; torch {torch.__version__}")
    bandwidth = copy_bandwidth(DEV)
    print(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
    sweep_results = sweep(bandwidth, args.sweep_seconds or 60.0) if args.sweep else {}
    if args.sweep_gemv:
        sweep_results["gemv"] = sweep_gemv(bandwidth, args.sweep_seconds or 200.0)
    if args.sweep_int4 or args.sweep_int8:  # benchmarks/ is on sys.path when a script there runs
        from int4_sweep import ROWS, sweep_int4
        from int8_sweep import ROWS as INT8_ROWS
        from int8_sweep import sweep_int8

        both = args.sweep_int4 and args.sweep_int8
        budget = args.sweep_seconds or (140.0 if both else 240.0 if args.sweep_int4 else 60.0)
        runs = [("int4", lambda: sweep_int4(budget * (2 / 3 if both else 1), tuple(args.m) if m_given else ROWS))
                if args.sweep_int4 else None,  # both: INT4 two thirds of the budget (more configs), INT8 the rest
                ("int8", lambda: sweep_int8(budget / 3 if both else budget, tuple(args.m) if m_given else INT8_ROWS))
                if args.sweep_int8 else None]
        for name, run in filter(None, runs):
            try:
                sweep_results[name] = run()
            except Exception:  # one sweep's failure must not cost the other's results
                traceback.print_exc()
                sweep_results[name] = {"error": traceback.format_exc()}
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device_name(DEV), "sweep": sweep_results}, f, indent=1, default=str)
        raise SystemExit(0)
    if args.sweep_splitk:
        from splitk_sweep import sweep_splitk  # benchmarks/ is on sys.path when a script there runs

        sweep_results["splitk"] = sweep_splitk(args.sweep_seconds or 200.0)
        if not m_given:
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"device": device_name(DEV), "sweep": sweep_results}, f, indent=1, default=str)
            raise SystemExit(0)
    rows, failures = [], []
    totals: dict[tuple[int, str], float] = {}
    for name, n, k in SHAPES:
        for m in args.m:
            x = torch.randn(m, k, device=DEV).to(DTYPE)
            try:
                shape_cases = cases(n, k, m)
            except Exception as exc:
                failures.append(f"{name} M={m} packing: {exc!r}")
                traceback.print_exc()
                continue
            for case in shape_cases:
                if only is not None and case.name not in only:
                    continue
                label = f"{name:8s} N={n:5d} K={k:5d} M={m:3d} {case.name:9s}"
                try:
                    err, tol, own = error_of(case, x)
                    ok = err <= tol and own <= REL_TOL["bf16"]
                    if not ok:
                        failures.append(f"{label}: max error {err:.3g} (tol {tol:.3g}), own-x rel {own:.3g}")
                    row = {"shape": name, "n": n, "k": k, "m": m, "method": case.name, "bytes": case.nbytes,
                           "max_abs_err": err, "ok": ok}
                    if not args.check:
                        us = graph_us(case, x)
                        floor = case.nbytes / bandwidth * 1e6
                        row.update(us=us, gbps=case.nbytes / us / 1e3, pct_floor=100 * floor / us,
                                   tflops=2 * m * n * k / us / 1e6)
                        totals[(m, case.name)] = totals.get((m, case.name), 0.0) + us
                        print(f"{label} {us:8.1f} us {row['gbps']:7.0f} GB/s {row['pct_floor']:5.1f} % floor "
                              f"{row['tflops']:6.1f} TFLOP/s err {err:.2e}", flush=True)
                    else:
                        print(f"{label} {'ok' if ok else 'FAIL'} err {err:.2e} tol {tol:.2e}", flush=True)
                    rows.append(row)
                except Exception as exc:
                    failures.append(f"{label}: {type(exc).__name__}: {exc}")
                    print(f"{label} ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            del shape_cases
            torch.cuda.empty_cache()
    if totals:
        print("per layer (the four projections, us):")
        for m in args.m:
            print(f"  M={m}: " + ", ".join(f"{meth} {us:.1f}" for (mm, meth), us in totals.items() if mm == m))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(DEV), "copy_bandwidth": bandwidth, "rows": rows,
                       "failures": failures, "sweep_time_over_floor": sweep_results}, f, indent=1)
    for failure in failures:
        print("FAIL", failure)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
