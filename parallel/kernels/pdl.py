"""Programmatic dependent launch (PDL) for the small decode-step kernels.

Why: at batch 1 a decoder layer is ~13 kernels of a few microseconds each (norm or fused
all-reduce + norm, rotary + KV write, two attention stages, SiLU-and-mul, around the GEMMs), so
each kernel's launch and ramp-up is a visible share of the step, the more so at TP 4. On Hopper,
a kernel launched with PDL may be scheduled while the kernel before it is still finishing; it
calls `griddepcontrol.wait` before it touches anything, which returns once the previous kernel
has completed and its writes are visible. The waiting is on the GPU, so CUDA graphs keep it.

The protocol, for every kernel here that takes `USE_PDL`:
- `wait_for_previous(USE_PDL)` is its first statement: no load before it, not even of weights,
  so a chain of PDL kernels can never read a buffer that an earlier kernel still writes.
- `release_next(USE_PDL)` right after: once every program of this kernel has reached it, the next
  kernel (if launched with PDL) may be scheduled; it then waits in its own first statement.
Kernels launched without PDL (cuBLAS, torch) wait for this one to finish as usual. The
exceptions, decode_linear.py and l2_prefetch.py, touch only weights or nothing before the wait.

`pdl_options(device)` gives the launch keyword arguments: `USE_PDL=True, launch_pdl=True` on a
CUDA device of compute capability 9+ with a Triton that has `launch_pdl`; `USE_PDL=False` elsewhere
(CPU, Triton's interpreter, older GPUs) and when `parallel.pdl` is off (parallel/options.py).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from shardserve.parallel.options import KernelOptions, kernel_options


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed (a no-op without PDL)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_next(USE_PDL: tl.constexpr):
    """Let the next kernel in the stream be scheduled (a hint; a no-op without PDL)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


def pdl_wanted(options: KernelOptions | None = None, environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """False when the kernel options turn PDL off, or under Triton's interpreter."""
    if environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return (options or kernel_options()).pdl


def triton_has_pdl() -> bool:
    """This Triton compiles `griddepcontrol` and launches with the PDL attribute."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # a Triton without the NVIDIA backend
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and hasattr(tl.extra.cuda, "gdc_wait")


@functools.cache
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and triton_has_pdl()


def pdl_options(device: torch.device) -> dict[str, bool]:
    """Launch keyword arguments for a kernel that takes `USE_PDL` (see the module docstring)."""
    if device.type != "cuda" or not pdl_wanted():
        return {"USE_PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not _device_has_pdl(index):
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}
