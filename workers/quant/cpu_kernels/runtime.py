"""The linear-slot runtimes over these kernels: `kernel_runtime(w)` packs w once and returns a
callable y = runtime(x, bias), or None when the kernels cannot take w (geometry, act-order, FP8,
or the extension failed to build), so `workers/quant/cpu.py` keeps torch's ops for it.
`use_int8_activations(model)` switches a loaded model's runtimes to int8 activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from shardserve.workers.quant.cpu_kernels import (
    CpuKernelsUnavailable,
    best_isa,
    pack_q4,
    pack_q8,
    q4_linear,
    q8_linear,
)
from shardserve.workers.quant.weights import GroupedWeight, Int8Weight, QuantizedWeight

log = logging.getLogger(__name__)
Runtime = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class Q4Runtime:
    def __init__(self, w: GroupedWeight) -> None:
        self.packed, self.perm = pack_q4(w), w.perm
        self.int8_activations = False  # ModelConfig.cpu_activations, set by `use_int8_activations`

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return q4_linear(x, self.packed, bias, int8_activations=self.int8_activations)


class Q8Runtime:
    def __init__(self, w: Int8Weight | GroupedWeight) -> None:
        self.packed, self.perm = pack_q8(w), getattr(w, "perm", None)
        self.int8_activations = False

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return q8_linear(x, self.packed, bias, int8_activations=self.int8_activations)


def use_int8_activations(model: torch.nn.Module) -> int:
    """Switch every linear layer of `model` that runs on these kernels to int8 activations
    (ModelConfig.cpu_activations = int8); returns how many layers that was."""
    from shardserve.workers.quant.cpu_kernels.kquant import KquantRuntime
    from shardserve.workers.quant.stacked import StackedRuntime

    count = 0
    for module in model.modules():
        runtime = getattr(getattr(module, "quant_method", None), "runtime", None)
        if isinstance(runtime, Q4Runtime | Q8Runtime | KquantRuntime | StackedRuntime):
            runtime.int8_activations = True
            count += 1
    return count


def kernel_runtime(w: QuantizedWeight) -> Runtime | None:
    if isinstance(w, GroupedWeight) and w.float32_scales:  # GGUF k-quants: kquant.py's exact float32 layouts
        return _kquant_runtime(w)
    k, group = w.q.shape[1], getattr(w, "group_size", w.q.shape[1])
    if k % 32 or group % 32 or k % group:
        return None
    try:
        best_isa()  # builds the extension once
    except CpuKernelsUnavailable as exc:
        log.warning("%s; using torch's CPU ops", exc)
        return None
    if isinstance(w, GroupedWeight):
        return Q4Runtime(w) if w.bits == 4 else Q8Runtime(w)
    if isinstance(w, Int8Weight):
        return Q8Runtime(w)
    return None


def _kquant_runtime(w: GroupedWeight) -> Runtime | None:
    from shardserve.workers.quant.cpu_kernels.kquant import KquantRuntime, kquant_extension

    try:
        kquant_extension()
    except CpuKernelsUnavailable as exc:
        log.warning("%s; using torch's CPU ops", exc)
        return None
    return KquantRuntime(w)
