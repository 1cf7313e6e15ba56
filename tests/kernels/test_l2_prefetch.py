"""L2 prefetch behind the fused all-reduce (workers/kernels/l2_prefetch.py, experimental).

Its effect needs a Hopper GPU (not measured yet: benchmarks/README.md); here, on CPU: the regions
it plans, the switch, that nothing launches off CUDA, and the kernel compiled for sm_90 — it must
touch no memory, only hint lines, and wait for the previous kernel after its hints, not before.
"""

from __future__ import annotations

import re

import pytest
import torch
from compiled_ptx import compile_ptx
from kernel_env import DEVICE
from shardserve.parallel.options import KernelOptions
from shardserve.workers.kernels import l2_prefetch as l2


def test_regions_in_order_cut_to_the_cap():
    a = torch.empty(1000, dtype=torch.uint8)
    b = torch.empty(1500, dtype=torch.int16)  # 3,000 bytes
    assert l2.plan_regions([a, b], 10_000) == [(a.data_ptr(), 8), (b.data_ptr(), 24)]  # ceil(1000 / 128) = 8
    assert l2.plan_regions([a, b], 2_000) == [(a.data_ptr(), 8), (b.data_ptr(), 8)]  # 1,000 bytes of b
    assert l2.plan_regions([a, b], 500) == [(a.data_ptr(), 4)]
    assert l2.plan_regions([a, b], 0) == []
    with pytest.raises(ValueError, match="at most two regions"):
        l2.plan_regions([a, a, a], 10)
    with pytest.raises(ValueError, match="contiguous"):
        l2.plan_regions([torch.empty(4, 4).t()], 10)


def test_off_by_default_and_nothing_launches_on_cpu():
    assert l2.prefetch_cap() == 0
    assert l2.prefetch_cap(KernelOptions(l2_prefetch_mb=24)) == 24 * 2**20
    assert l2.prefetch_cap(KernelOptions(l2_prefetch_mb=0.5)) == 2**19
    assert l2.l2_prefetch([torch.empty(4096)], 2**20) is False
    assert l2.l2_prefetch([], 2**20) is False


def test_kernel_hints_lines_then_waits():
    ptx = compile_ptx(l2.__name__, "_l2_prefetch_kernel", pointers={"base0": "i64", "base1": "i64"},
                      constexprs={"BLOCK": l2.BLOCK, "USE_PDL": True})
    hints = [m.start() for m in re.finditer(r"prefetch\.global\.L2", ptx)]
    release = ptx.find("griddepcontrol.launch_dependents")
    wait = ptx.find("griddepcontrol.wait")
    assert len(hints) >= 2, "one hint loop per region"
    assert 0 <= release < hints[0] and hints[-1] < wait, "release first, hints, then the wait"
    assert not re.search(r"\b(?:ld|st|atom|red)\.global", ptx), "the kernel must not touch memory"


@pytest.mark.skipif(DEVICE != "cuda", reason="launches the compiled kernel: GPU runs only (SHARDSERVE_KERNEL_DEVICE=cuda)")
def test_a_launch_on_the_gpu_changes_no_result():
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x @ w.t()
    launched = l2.l2_prefetch([w, x], 2**20)
    assert launched == (torch.cuda.get_device_capability()[0] >= 9)
    assert torch.equal(x @ w.t(), ref)
    torch.cuda.synchronize()
