"""Fused float32 CPU ops for decode-size steps (decode_ops.cpp): RMSNorm(+residual add), rope + KV
write, paged attention, SiLU-and-mul.

On CPU a batch-1 decode step spends more time dispatching ~30 tiny eager PyTorch ops per layer than
computing them; each op here is one call. `ops()` builds the extension on first use with the same
machinery as the quantized matmuls (build.py; its own extension name, so either can be rebuilt
alone) and returns None where that fails, or while `set_enabled(False)` (A/B checks; also set by
`layers.set_fused_kernels`): callers
(workers/models/layers.py, workers/attention/cpu_backend.py, and decode_stack.py, which runs a whole
decoder stack on these ops in one call) then keep their torch path, which stays
the reference the tests compare against (the same switch keeps the runner off the CPU attention
backend and the packed LM head: workers/models/cpu_head.py). `wanted(x)` is the gate every caller uses: a float32 CPU
tensor and the ops available; CUDA tensors and other dtypes never take these kernels.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from shardserve.workers.quant.cpu_kernels.build import HERE, build_or_none

EXTENSION_NAME = "shardserve_cpu_decode_ops_v3"
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Process-wide switch: False keeps the eager torch ops (and, for models loaded while it is off,
    the torch attention backend and the float LM head)."""
    global _enabled
    _enabled = enabled


def ops() -> ModuleType | None:
    """The built extension, or None (switched off, or the build failed)."""
    return _built() if _enabled else None


@functools.cache
def _built() -> ModuleType | None:
    return build_or_none(HERE / "decode_ops.cpp", EXTENSION_NAME, "the CPU decode path keeps eager torch ops")


def wanted(x: torch.Tensor) -> bool:
    """True when x is a float32 CPU tensor and the fused ops are available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and ops() is not None
