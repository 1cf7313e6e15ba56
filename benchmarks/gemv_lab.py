"""Lab: candidate one-row INT8 / FP8 weight-only GEMVs beside the shipped ones, Llama-3.1-8B shapes, M = 1.

What it answered: could a one-row W8A16 kernel get nearer the copy floor than the plane GEMV (INT8, packed.py)
and the own fp8_gemv (FP8) shipped then? The `sum` candidate won on the H100 (benchmarks/README.md) and is
what ships now (decode_linear's kernel with row scales); "shipped" below is that. Candidates, each on W [N, K]
as stored (int8 codes or e4m3, one scale a row):
- `sum`: decode_linear's structure (parallel/kernels/decode_linear.py): a [BLOCK_N] accumulator, one tl.sum
  a chunk, Triton's software pipelining (num_stages) instead of a hand-written prefetch;
- `dot`: the row padded to 16 and fed to tl.dot with W converted to fp16 in registers (int8 and e4m3 are
  exact in fp16), fp32 accumulation: the tensor cores take the FMAs off the CUDA cores.
Timing and checks are quant_kernels.py's (graph_us, copies beyond L2). Prints per shape: shipped, best of
each candidate with its tiles, % of the floor, and bf16 decode_linear.
Run: `python benchmarks/gemv_lab.py [--seconds 150]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch
import triton
import triton.language as tl
from quant_kernels import DEV, DTYPE, SHAPES, cases, graph_us
from shardserve.workers.bench.device import copy_bandwidth, device_name


@triton.jit
def _sum_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = w_ptr + offs_n[:, None].to(tl.int64) * K
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        w = tl.load(rows + kk[None, :], mask=mask_n[:, None] & (kk[None, :] < K), other=0.0)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    tl.store(out_ptr + offs_n, (acc * s).to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _dot_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, 16)
    rows = w_ptr + offs_n[None, :].to(tl.int64) * K  # [1, BLOCK_N]
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * 0 + kk[None, :], mask=(offs_m[:, None] < 1) & (kk[None, :] < K),
                    other=0.0).to(tl.float16)
        w = tl.load(rows + kk[:, None], mask=mask_n[None, :] & (kk[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, w.to(tl.float16), acc)
    y = tl.sum(acc, axis=0)  # rows 1-15 are zero
    s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    tl.store(out_ptr + offs_n, (y * s).to(out_ptr.dtype.element_ty), mask=mask_n)


def run_variant(kind: str, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bn: int, bk: int, nw: int,
                ns: int) -> torch.Tensor:
    n, k = w.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    kernel = _sum_kernel if kind == "sum" else _dot_kernel
    kernel[(triton.cdiv(n, bn),)](x, w, s, out, n, k, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
    return out


def grid(kind: str) -> list[tuple[int, int, int, int]]:
    if kind == "sum":
        return list(itertools.product((1, 2, 4), (1024, 2048, 4096), (4, 8), (1, 3)))
    return list(itertools.product((16, 32, 64), (128, 256), (4,), (3, 4)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=150.0)
    args = parser.parse_args()
    bandwidth = copy_bandwidth(DEV)
    print(f"device: {device_name(DEV)}; copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    for name, n, k in SHAPES:
        deadline = time.monotonic() + args.seconds / len(SHAPES)
        x = torch.randn(1, k, device=DEV).to(DTYPE)
        by_name = {c.name: c for c in cases(n, k, 1) if c.name in ("bf16", "int8", "fp8")}
        line = [f"{name}: bf16 {graph_us(by_name['bf16'], x):.1f}"]
        scales = torch.rand(n, device=DEV) * 1e-3 + 1e-4
        stored = {"int8": torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV),
                  "fp8": (torch.randn(n, k, device=DEV) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)}
        for method, w in stored.items():
            shipped = by_name[method]
            us = graph_us(shipped, x)
            line.append(f"{method} shipped {us:.1f} ({100 * shipped.nbytes / bandwidth * 1e6 / us:.0f}%)")
            reference = x.float() @ (w.float() * scales[:, None]).T
            nbytes = w.numel() + scales.numel() * 4
            for kind in ("sum", "dot"):
                best = None
                for bn, bk, nw, ns in grid(kind):
                    if time.monotonic() > deadline:
                        break
                    try:
                        y = run_variant(kind, x, w, scales, bn, bk, nw, ns)
                        err = (y.float() - reference).abs().max().item() / max(1.0, reference.abs().max().item())
                        if err > 2e-2:
                            print(f"  {name} {method} {kind} {bn},{bk},{nw},{ns}: error {err:.3g}")
                            continue
                        case = dataclasses.replace(shipped, nbytes=nbytes, make=lambda i, w=w: w if i == 0 else w.clone(),
                                                   run=lambda a, ww, kd=kind, t=(bn, bk, nw, ns), s=scales: run_variant(kd, a, ww, s, *t))
                        us = graph_us(case, x)
                    except Exception as exc:  # a tile the compiler rejects
                        print(f"  {name} {method} {kind} {bn},{bk},{nw},{ns}: {type(exc).__name__} {str(exc)[:80]}")
                        continue
                    if best is None or us < best[0]:
                        best = (us, (bn, bk, nw, ns))
                if best:
                    line.append(f"{method} {kind} {best[0]:.1f} ({100 * nbytes / bandwidth * 1e6 / best[0]:.0f}%) {best[1]}")
        print("; ".join(line), flush=True)
        del by_name
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
