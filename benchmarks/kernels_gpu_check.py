"""Full-size GPU check of every Triton kernel against its torch reference, with timings.

Data flow: for each kernel and each Llama-3.1-8B-shaped case (bf16; 32 q heads, 8 kv heads,
head_dim 128, block_size 16, hidden 4096, intermediate 14336; batch 1..64, contexts up to
4k) the script builds random inputs on CUDA — paged caches with shuffled block tables —
runs the kernel and `shardserve.workers.kernels.reference`, prints the max abs error against
a tolerance, and times the kernel with CUDA events (median of `--iters` runs, L2 flushed
before each). Decode attention also prints its achieved GB/s (K/V bytes read + q/out) and
the fraction of the device-to-device copy bandwidth measured in the same process, and a
side-by-side peer time: torch SDPA over the same context stored dense (not paged).
Extend attention prints TFLOP/s (causal) and SDPA's time on the dense equivalent.

Run: `python benchmarks/kernels_gpu_check.py [--iters 50]`. Exit status 1 if any error is
over tolerance.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from shardserve.parallel.kernels.rmsnorm import rmsnorm
from shardserve.workers.bench.device import gpu_time_ms
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.activation import silu_and_mul
from shardserve.workers.kernels.extend_attention import extend_attention
from shardserve.workers.kernels.kv_cache_write import kv_cache_write
from shardserve.workers.kernels.paged_decode_attention import choose_num_splits, paged_decode_attention
from shardserve.workers.kernels.rotary import rotary_embedding

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
HIDDEN_SIZE, INTER_SIZE = 4096, 14336
DTYPE = torch.bfloat16
DEV = torch.device("cuda")
ATTN_TOL, ELEMENTWISE_REL_TOL = 2e-2, 2**-6  # bf16 output: a few ulps
failures: list[str] = []


def time_ms(fn: Callable[[], object], iters: int) -> float:
    return gpu_time_ms(fn, iters, DEV)


def check(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float = 0.0) -> str:
    err = (out.float() - ref.float()).abs()
    bad = (err > atol + rtol * ref.float().abs()).any().item() or not torch.isfinite(out).all().item()
    if bad:
        failures.append(name)
    return f"max_err {err.max().item():.2e} {'FAIL' if bad else 'ok'}"


def copy_bandwidth_gbs(iters: int) -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_ms(lambda: dst.copy_(src), iters) * 1e-3) / 1e9  # read + write


def paged(seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kv_cache, block_tables (shuffled block ids), seq_lens tensor for the given contexts."""
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks) + 1
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
    perm = torch.randperm(num_blocks, device=DEV).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=DEV)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[used : used + n]
        used += n
    return kv_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


def dense_context(kv_cache: torch.Tensor, tables: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Hkv, seq_len, D] K and V gathered from the paged cache (all requests of equal length)."""
    n_blocks = -(-seq_len // BLOCK_SIZE)
    kv = kv_cache[:, tables[:, :n_blocks].long()]  # [2, B, n_blocks, block, Hkv, D]
    kv = kv.flatten(2, 3)[:, :, :seq_len].transpose(2, 3).contiguous()  # [2, B, Hkv, S, D]
    return kv[0], kv[1]


def bench_decode(iters: int, copy_gbs: float) -> None:
    print("\n== paged_decode_attention (bf16, 32q/8kv heads, D 128, block 16) ==")
    scale = HEAD_DIM**-0.5
    cases = [(b, c) for b in (1, 4, 16, 64) for c in (1024, 4096)] + [(64, -1)]
    for batch, ctx in cases:
        seq_lens = torch.randint(1, 4097, (batch,)).tolist() if ctx < 0 else [ctx] * batch
        kv_cache, tables, lens = paged(seq_lens)
        q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        max_len = max(seq_lens)
        out = paged_decode_attention(q, kv_cache, tables, lens, scale, max_seq_len=max_len)
        err = check(f"decode b{batch} ctx{ctx}", out, reference.paged_decode_attention(q, kv_cache, tables, lens, scale), ATTN_TOL)
        ms = time_ms(lambda q=q, c=kv_cache, t=tables, n=lens, m=max_len: paged_decode_attention(q, c, t, n, scale, max_seq_len=m), iters)
        kv_bytes = sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * 2 * kv_cache.element_size()
        gbs = (kv_bytes + 2 * q.numel() * q.element_size()) / (ms * 1e-3) / 1e9
        splits = choose_num_splits(batch, NUM_KV_HEADS, max_len)
        line = (f"batch {batch:3d} ctx {'rand' if ctx < 0 else ctx:>4}  splits {splits:2d}  {err}  {ms * 1e3:8.1f} us"
                f"  {gbs:7.1f} GB/s ({100 * gbs / copy_gbs:4.1f}% of copy)")
        if ctx > 0:
            k, v = dense_context(kv_cache, tables, ctx)
            qd = q[:, :, None, :]  # [B, Hq, 1, D]
            sdpa_ms = time_ms(lambda qd=qd, k=k, v=v: F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True), iters)
            line += f"  | SDPA dense {sdpa_ms * 1e3:8.1f} us (x{sdpa_ms / ms:.2f})"
        print(line)


def bench_extend(iters: int) -> None:
    print("\n== extend_attention (bf16, 32q/8kv heads, D 128, block 16) ==")
    scale = HEAD_DIM**-0.5
    cases = {  # name: [(prefix_len, query_len)]
        "prefill 1x4096": [(0, 4096)],
        "prefill 8x512": [(0, 512)] * 8,
        "prefix hit 4x(3584+512)": [(3584, 512)] * 4,
        "chunk 2x(2048+1024)+32 decode": [(2048, 1024)] * 2 + [(2047, 1)] * 32,
        "mixed 256 decode(1023)+512 prefill": [(1023, 1)] * 256 + [(0, 512)],
        "decode only 256x(1023+1)": [(1023, 1)] * 256,
    }
    for name, reqs in cases.items():
        seq_lens = [p + n for p, n in reqs]
        q_lens = [n for _, n in reqs]
        kv_cache, tables, lens = paged(seq_lens)
        starts = torch.tensor([0] + q_lens, device=DEV).cumsum(0).to(torch.int32)
        q = torch.randn(sum(q_lens), NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        args = (q, kv_cache, tables, starts, lens, scale)
        err = check(f"extend {name}", extend_attention(*args), reference.extend_attention(*args), ATTN_TOL)
        ms = time_ms(lambda a=args: extend_attention(*a), iters)
        flops = sum(4 * HEAD_DIM * NUM_Q_HEADS * sum(p + j + 1 for j in range(n)) for p, n in reqs)
        line = f"{name:32s} {err}  {ms * 1e3:9.1f} us  {flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s"
        if all(p == 0 for p, _ in reqs) and len(set(q_lens)) == 1:
            k, v = dense_context(kv_cache, tables, q_lens[0])
            qd = q.view(len(reqs), q_lens[0], NUM_Q_HEADS, HEAD_DIM).transpose(1, 2)
            sdpa_ms = time_ms(lambda qd=qd, k=k, v=v: F.scaled_dot_product_attention(qd, k, v, is_causal=True, scale=scale, enable_gqa=True), iters)
            line += f"  | SDPA dense causal {sdpa_ms * 1e3:9.1f} us (x{sdpa_ms / ms:.2f})"
        print(line)


def bench_elementwise(iters: int) -> None:
    print("\n== kv_cache_write / rmsnorm / rotary / silu_and_mul (bf16) ==")
    for tokens in (1, 64, 8192):
        k = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        v = torch.randn_like(k)
        cache = torch.zeros(2, tokens // BLOCK_SIZE + 8, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        slots = torch.randperm(cache.shape[1] * BLOCK_SIZE, device=DEV)[:tokens]
        expected = cache.clone()
        kv_cache_write(k, v, cache, slots)
        reference.kv_cache_write(k, v, expected, slots)
        err = check(f"kv_cache_write {tokens}", cache, expected, 0.0)
        ms = time_ms(lambda k=k, v=v, c=cache, s=slots: kv_cache_write(k, v, c, s), iters)
        print(f"kv_cache_write  T {tokens:5d}  {err}  {ms * 1e3:8.1f} us  {4 * k.numel() * 2 / (ms * 1e-3) / 1e9:7.1f} GB/s")

        x = torch.randn(tokens, HIDDEN_SIZE, dtype=DTYPE, device=DEV)
        res = torch.randn_like(x)
        w = torch.randn(HIDDEN_SIZE, dtype=DTYPE, device=DEV)
        out, new_res = rmsnorm(x, w, 1e-5, res)
        ref_out, ref_res = reference.rmsnorm(x, w, 1e-5, res)
        err = check(f"rmsnorm {tokens}", torch.cat([out, new_res]), torch.cat([ref_out, ref_res]), 1e-2, ELEMENTWISE_REL_TOL)
        ms = time_ms(lambda x=x, w=w, r=res: rmsnorm(x, w, 1e-5, r), iters)
        ref_ms = time_ms(lambda x=x, w=w, r=res: reference.rmsnorm(x, w, 1e-5, r), iters)
        print(f"rmsnorm+res     T {tokens:5d}  {err}  {ms * 1e3:8.1f} us  {4 * x.numel() * 2 / (ms * 1e-3) / 1e9:7.1f} GB/s"
              f"  | torch eager {ref_ms * 1e3:8.1f} us (x{ref_ms / ms:.2f})")

        q = torch.randn(tokens, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device=DEV)
        inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEV).float() / HEAD_DIM)
        freqs = torch.outer(torch.arange(8192, device=DEV).float(), inv_freq)  # [max_pos, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        pos = torch.randint(0, 8192, (tokens,), device=DEV)
        out_q, out_k = rotary_embedding(q, k, pos, cos, sin, inplace=False)
        ref_q, ref_k = reference.rotary_embedding(q, k, pos, cos, sin, inplace=False)
        err = check(f"rotary {tokens}", torch.cat([out_q, out_k], 1), torch.cat([ref_q, ref_k], 1), 1e-2, ELEMENTWISE_REL_TOL)
        ms = time_ms(lambda q=q, k=k, p=pos, c=cos, s=sin: rotary_embedding(q, k, p, c, s), iters)
        print(f"rotary inplace  T {tokens:5d}  {err}  {ms * 1e3:8.1f} us  {2 * (q.numel() + k.numel()) * 2 / (ms * 1e-3) / 1e9:7.1f} GB/s")

        gu = torch.randn(tokens, 2 * INTER_SIZE, dtype=DTYPE, device=DEV)
        err = check(f"silu_and_mul {tokens}", silu_and_mul(gu), reference.silu_and_mul(gu), 1e-2, ELEMENTWISE_REL_TOL)
        ms = time_ms(lambda gu=gu: silu_and_mul(gu), iters)
        ref_ms = time_ms(lambda gu=gu: reference.silu_and_mul(gu), iters)
        print(f"silu_and_mul    T {tokens:5d}  {err}  {ms * 1e3:8.1f} us  {1.5 * gu.numel() * 2 / (ms * 1e-3) / 1e9:7.1f} GB/s"
              f"  | torch eager {ref_ms * 1e3:8.1f} us (x{ref_ms / ms:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50, help="timed runs per kernel (median reported)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "extend", "elementwise"])
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(args.iters)
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{__import__('triton').__version__}  d2d copy {copy_gbs:.0f} GB/s (read + write)")
    if "decode" not in args.skip:
        bench_decode(args.iters, copy_gbs)
    if "extend" not in args.skip:
        bench_extend(args.iters)
    if "elementwise" not in args.skip:
        bench_elementwise(args.iters)
    print(f"\n{'FAILED: ' + ', '.join(failures) if failures else 'all kernels within tolerance'}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
