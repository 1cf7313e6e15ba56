"""GGUF Q4_K / Q6_K weights on the CUDA Triton kernels vs torch references (under the interpreter in CI).

Random valid super-blocks (random code and scale bytes, finite fp16 d) are split by
formats/gguf_kquant.py and packed by kernels/kquant.py (planes with float32 scales): the planes'
float32 dequantization equals gguf-py's `dequantize` bit for bit; Q4_K on int4.py's linear (the
matrix-vector kernel, the split-K codes GEMM), Q6_K on 8-bit planes in groups of 16 (the
matrix-vector kernel, the dequantizing tl.dot GEMM; fp16 only under the interpreter: see
kernel_env.py), both with the SiLU-and-mul epilogue, against x @ w.dequantize().T in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from shardserve.workers.kernels.reference import silu_and_mul
from shardserve.workers.quant.formats.gguf_kblocks import split_kquant
from shardserve.workers.quant.formats.gguf_kquant import GgufKLayout
from shardserve.workers.quant.kernels.int4 import int4_linear
from shardserve.workers.quant.kernels.kquant import pack_q4k, pack_q6k, q6k_linear
from shardserve.workers.quant.kernels.packed import dequantize_planes

REL_TOL = {torch.float16: 4e-3, torch.bfloat16: 1.5e-2}  # of max |reference|: x and y in the dtype
BYTES = {"Q4_K": 144, "Q6_K": 210}


def _weight(block: str, n: int, k: int, device: torch.device):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (n, k // 256, BYTES[block]), dtype=np.uint8)
    for at in ((0, 2) if block == "Q4_K" else (208,)):  # finite fp16 d (and dmin)
        raw[..., at:at + 2] = (rng.standard_normal((n, k // 256, 1)) * 0.01).astype(np.float16).view(np.uint8)
    raw = raw.reshape(n, -1)
    w = GgufKLayout(block).unpack(split_kquant(raw, block))
    assert torch.equal(w.dequantize(), torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType[block]))))
    return type(w)(**{f: (v.to(device) if isinstance(v, torch.Tensor) else v) for f, v in vars(w).items()}), raw


def _linear(block, w):
    return (int4_linear, pack_q4k(w)) if block == "Q4_K" else (q6k_linear, pack_q6k(w))


def _check(out, ref):
    err = (out.float() - ref).abs().max().item()
    assert err <= REL_TOL[out.dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize("block", ["Q4_K", "Q6_K"])
def test_planes_dequantize_to_gguf_py_bit_for_bit(device, block):
    w, raw = _weight(block, 40, 768, device)
    planes = _linear(block, w)[1].weights
    assert planes.scales.dtype == torch.float32
    want = torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType[block])))
    assert torch.equal(dequantize_planes(planes, torch.float32).cpu(), want)


@pytest.mark.parametrize(("rows", "dtype"), [(1, torch.bfloat16), (17, torch.float16)])
@pytest.mark.parametrize("block", ["Q4_K", "Q6_K"])
def test_kquant_kernels_match_dequantized_reference(device, block, rows, dtype):
    w, _ = _weight(block, 48, 512, device)
    x = torch.randn(rows, 512, device=device).to(dtype)
    bias = torch.randn(48, device=device).to(dtype)
    linear, packed = _linear(block, w)
    out = linear(x, packed, bias)
    assert out.dtype == dtype
    _check(out, x.float() @ w.dequantize().T + bias.float())


@pytest.mark.parametrize("block", ["Q4_K", "Q6_K"])
def test_gemv_silu_mul_epilogue(device, block):
    w, _ = _weight(block, 64, 256, device)
    x = torch.randn(1, 256, device=device).half()
    y = (x.float() @ w.dequantize().T).half()
    linear, packed = _linear(block, w)
    _check(linear(x, packed, silu_mul=True), silu_and_mul(y).float())
