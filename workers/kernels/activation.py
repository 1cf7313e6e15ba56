"""SiLU-and-mul, the gated MLP activation of Llama-style models.

Data flow: `x [T, 2I]` is the fused gate/up projection output (gate in the first I
columns, up in the last I). Program (t, j) loads gate and up chunks `[BLOCK]` of row t,
computes `silu(gate) * up = gate / (1 + exp(-gate)) * up` in fp32 and stores the chunk of
`out [T, I]`, rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous

BLOCK = 1024  # columns of the output per program


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter_size, stride_x, stride_o, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < inter_size
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter_size + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # x [T, 2I] -> [T, I]
    """`silu(x[:, :I]) * x[:, I:]`, computed in fp32."""
    if x.dim() != 2 or x.shape[1] % 2 != 0 or x.stride(-1) != 1:
        raise ValueError(f"x must be [num_tokens, 2 * intermediate_size] with a contiguous last dim, got {tuple(x.shape)}")
    num_tokens, inter_size = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, inter_size, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or inter_size == 0:
        return out
    block = min(BLOCK, triton.next_power_of_2(inter_size))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter_size, block))](
        x, out, inter_size, x.stride(0), out.stride(0), BLOCK=block, num_warps=4, **pdl_options(x.device),
    )
    return out
