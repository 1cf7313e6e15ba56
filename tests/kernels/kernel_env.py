"""Kernel test environment (imported by conftest.py first). Kernel tests run the Triton kernels against their torch references.

By default they run on CPU through Triton's interpreter (`TRITON_INTERPRET=1`, set here
before any kernel module is decorated). With `SHARDSERVE_KERNEL_DEVICE=cuda` the same tests
run compiled on the GPU, and the attention tests add bf16 (the 3.9 interpreter's `tl.dot`
multiplies bf16 operands as raw uint16, so bf16 attention is only checked compiled).
"""

from __future__ import annotations

import importlib
import os
import sys

DEVICE = os.environ.get("SHARDSERVE_KERNEL_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"SHARDSERVE_KERNEL_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
    # A test module collected earlier may already have imported a kernel module compiled-mode;
    # re-decorate those under the interpreter (parallel/kernels first: workers/kernels import
    # them; then the attention backend, which imports kernels).
    def _order(name: str) -> tuple[bool, bool]:
        return name.startswith("shardserve.workers.attention"), name.startswith("shardserve.workers.kernels")

    for name in sorted(sys.modules, key=_order):
        if (name.startswith(("shardserve.workers.kernels.", "shardserve.parallel.kernels."))
                or name == "shardserve.workers.attention.triton_backend"):
            importlib.reload(sys.modules[name])

import torch  # noqa: E402

# float16 attention works in the interpreter; bf16 attention is checked compiled only (see above).
ATTENTION_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
ELEMENTWISE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Absolute tolerance per dtype for results in [-few, few]; fp32 is the interpreter's numpy math.
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
