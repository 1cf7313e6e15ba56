"""SiLU-and-mul kernel vs its torch reference and torch.nn.functional.silu."""

from __future__ import annotations

import pytest
import torch
from kernel_env import ELEMENTWISE_DTYPES
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.activation import silu_and_mul

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 2**-6)}  # bf16: two ulps (interpreter casts truncate)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("inter_size", [16, 100, 1500])  # 1500 spans two 1024-column programs
def test_silu_and_mul_matches_reference(device, dtype, inter_size):
    x = (4 * torch.randn(5, 2 * inter_size)).to(dtype=dtype, device=device)
    out = silu_and_mul(x)
    assert out.shape == (5, inter_size) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, reference.silu_and_mul(x), atol=atol, rtol=rtol)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp(100)
def test_silu_and_mul_equals_functional_silu_with_extremes(device):
    x = torch.randn(3, 64, device=device) * 4
    x[0, :4] = torch.tensor([-100.0, -30.0, 30.0, 0.0])  # exp overflow / underflow paths
    out = silu_and_mul(x)
    torch.testing.assert_close(out, torch.nn.functional.silu(x[:, :32]) * x[:, 32:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 \\* intermediate_size"):
        silu_and_mul(torch.randn(2, 7, device=device))
