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
It also checks an EP slice (experts 32..63 local) and fp16 at one T.

Run: `python benchmarks/moe_gpu_check.py [--iters 20]`. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from shardserve.workers.bench.device import gpu_time_ms
from shardserve.workers.kernels.fused_moe import fused_moe, moe_tiles
from shardserve.workers.kernels.moe_reference import fused_moe_reference

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


def make_weights(dtype: torch.dtype, num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEV).manual_seed(0)
    w13 = (torch.randn(num_local, 2 * INTER, HIDDEN, device=DEV, generator=gen) * HIDDEN**-0.5).to(dtype)
    w2 = (torch.randn(num_local, HIDDEN, INTER, device=DEV, generator=gen) * INTER**-0.5).to(dtype)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
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
