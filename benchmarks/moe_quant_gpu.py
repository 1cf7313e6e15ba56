"""GPU check and timings of the fused MoE with quantized experts on a Qwen3-30B-A3B-shaped layer.

Data flow: random bf16 experts of one MoE layer (128 experts, top-8, hidden 2048, moe intermediate
768) are rounded per expert by the at-load quantizer (algorithms/rtn.py) to INT4 g128 (symmetric,
asymmetric), INT8 per channel and FP8 per channel, and packed once (workers/quant/kernels/moe.py
`pack_moe`). For each shape (full layer; TP 2: intermediate 384; EP 2: experts 0..63 local) and T
in `--tokens` (default 1, 8, 64, 512, 2048) tokens routed like the model (softmax, top-8,
renormalised), per method the script
  * runs `fused_moe_quant` with host syncs turned into errors, and compares it with
    `fused_moe_reference` on the dequantized experts (fp32 torch MoE): max abs error / max |ref|;
  * captures it in a CUDA graph, replays on another routing in the same buffers and re-checks;
  * times it (CUDA events, L2 flushed, median of `--iters`) beside bf16 `fused_moe` on the same
    (unrounded) weights, and prints the packed bytes of the experts the batch activates over the
    time (GB/s: the decode roofline is the copy bandwidth).
`--json PATH` (default $OUT/moe_quant.json) writes every row. Exit status 1 if any check fails.

Run: `python benchmarks/moe_quant_gpu.py [--iters 20] [--tokens 1 8 64 512 2048] [--shapes full tp2 ep2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from functools import partial

import torch
from shardserve.workers.bench.device import device_name, gpu_time_ms
from shardserve.workers.kernels.fused_moe import fused_moe
from shardserve.workers.kernels.moe_reference import fused_moe_reference
from shardserve.workers.quant.algorithms.rtn import rtn_fp8, rtn_grouped, rtn_int8
from shardserve.workers.quant.kernels.moe import MoePacked, dequantize_experts, fused_moe_quant, pack_moe

NUM_EXPERTS, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768
SHAPES = {"full": (NUM_EXPERTS, INTER), "tp2": (NUM_EXPERTS, INTER // 2), "ep2": (NUM_EXPERTS // 2, INTER)}
METHODS = {
    "int4_g128_sym": lambda w: rtn_grouped(w, 128, bits=4, sym=True),
    "int4_g128_asym": lambda w: rtn_grouped(w, 128, bits=4, sym=False),
    "int8": rtn_int8,
    "fp8": rtn_fp8,
}
REL_TOL = {"int4_g128_sym": 2e-2, "int4_g128_asym": 2e-2, "int8": 2e-2, "fp8": 2e-2}
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
failures: list[str] = []


def route(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    logits = torch.randn(num_tokens, NUM_EXPERTS, device=DEV, generator=gen)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), TOP_K, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).to(DTYPE), ids


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def check(name: str, err: float, tol: float) -> str:
    if not err <= tol:
        failures.append(f"{name}: rel err {err:.2e} > {tol:.0e}")
        return f"{err:.2e} FAIL"
    return f"{err:.2e}"


def packed_bytes_per_expert(p: MoePacked) -> int:
    tensors = (p.words, p.scales) if p.bits == 0 else (p.words, p.scales, p.mins)  # FP8: mins is scales
    return sum(t.numel() * t.element_size() for t in tensors) // p.num_experts


def no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    except RuntimeError as e:
        failures.append(f"host sync inside fused_moe_quant: {e}")
        return None
    finally:
        torch.cuda.set_sync_debug_mode("default")


def graph_err(x, p13, p2, d13, d2, num_tokens: int) -> float:
    static_w, static_ids = route(num_tokens, seed=1)
    fused_moe_quant(x, p13, p2, static_w, static_ids)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_quant(x, p13, p2, static_w, static_ids)
    new_w, new_ids = route(num_tokens, seed=2)
    static_w.copy_(new_w)
    static_ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    return rel_err(out, fused_moe_reference(x, d13, d2, static_w, static_ids))


def run_shape(shape: str, tokens: list[int], iters: int, rows: list[dict]) -> None:
    num_local, inter = SHAPES[shape]
    gen = torch.Generator(device=DEV).manual_seed(0)
    w13 = (torch.randn(num_local, 2 * inter, HIDDEN, device=DEV, generator=gen) * HIDDEN**-0.5).to(DTYPE)
    w2 = (torch.randn(num_local, HIDDEN, inter, device=DEV, generator=gen) * inter**-0.5).to(DTYPE)
    bf16_bytes = (w13[0].numel() + w2[0].numel()) * 2
    for method, quantize in METHODS.items():
        try:
            q13, q2 = [quantize(w) for w in w13], [quantize(w) for w in w2]
            p13, p2 = pack_moe(q13, DTYPE), pack_moe(q2, DTYPE)
            d13, d2 = dequantize_experts(q13), dequantize_experts(q2)  # fp32 [E, N, K]: the reference's weights
            del q13, q2
            per_expert = packed_bytes_per_expert(p13) + packed_bytes_per_expert(p2)
            for t in tokens:
                x = torch.randn(t, HIDDEN, device=DEV, generator=gen).to(DTYPE)
                weights, ids = route(t, seed=0)
                active = int(torch.unique(ids[ids < num_local]).numel())  # experts this rank reads
                quantized = partial(fused_moe_quant, x, p13, p2, weights, ids)
                bf16 = partial(fused_moe, x, w13, w2, weights, ids, 0, num_local)
                out = no_sync(quantized)
                want = fused_moe_reference(x, d13, d2, weights, ids)
                err = check(f"{shape} {method} T={t}", rel_err(out, want) if out is not None else 1.0,
                            REL_TOL[method])
                gerr = check(f"{shape} {method} T={t} graph", graph_err(x, p13, p2, d13, d2, t), REL_TOL[method])
                ms, bf16_ms = gpu_time_ms(quantized, iters, DEV), gpu_time_ms(bf16, iters, DEV)
                gbs = active * per_expert / ms / 1e6
                row = dict(shape=shape, method=method, tokens=t, ms=ms, bf16_ms=bf16_ms, speedup=bf16_ms / ms,
                           active_experts=active, packed_gb_s=gbs, bf16_gb_s=active * bf16_bytes / bf16_ms / 1e6,
                           rel_err=err, graph_rel_err=gerr)
                rows.append(row)
                print(f"{shape:5s} {method:15s} T={t:5d}  {ms:8.3f} ms  bf16 {bf16_ms:8.3f} ms  x{bf16_ms / ms:5.2f}  "
                      f"{gbs:7.0f} GB/s packed  err {err}  graph {gerr}", flush=True)
        except Exception:
            failures.append(f"{shape} {method}: {traceback.format_exc().splitlines()[-1]}")
            traceback.print_exc()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 2048])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "moe_quant.json"))
    args = parser.parse_args()
    print(f"device: {device_name(DEV)}; torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    for shape in args.shapes:
        run_shape(shape, args.tokens, args.iters, rows)
    with open(args.json, "w") as f:
        json.dump({"device": device_name(DEV), "rows": rows, "failures": failures}, f, indent=1)
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
