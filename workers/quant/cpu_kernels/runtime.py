"""The linear-slot runtimes over these kernels: `kernel_runtime(w)` packs w once and returns a
callable y = runtime(x, bias), or None when the kernels cannot take w (a group size not a multiple
of 32, FP8, or the extension failed to build), so `workers/quant/cpu.py` keeps torch's ops for it.
Input features that end in a partial group (GPTQ g128 on SmolLM2's K = 576) or are not a multiple
of 32 are padded at pack time with zero codes to whole groups, and each call's x gets as many zero
columns (zero activations meet them, so y is unchanged): without this such weights fell back to
torch's int4 CPU kernel, far slower (a 512-token prefill of one SmolLM2 MLP projection: 0.9 s).
GGUF k-quants (float32 scales) take kquant.py's runtime instead.
`use_int8_activations(model)` switches a loaded model's runtimes (`kernel_runtimes(model)`) to int8 activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
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
        self.perm = w.perm
        w, self.pad = padded_to_whole_groups(w)
        self.packed = pack_q4(w)
        self.int8_activations = False  # ModelConfig.cpu_activations, set by runner/cpu_activations.py

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return q4_linear(_arranged(x, self.perm, self.pad), self.packed, bias, int8_activations=self.int8_activations)


class Q8Runtime:
    def __init__(self, w: Int8Weight | GroupedWeight) -> None:
        self.perm = getattr(w, "perm", None)
        w, self.pad = padded_to_whole_groups(w)
        self.packed = pack_q8(w)
        self.int8_activations = False

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return q8_linear(_arranged(x, self.perm, self.pad), self.packed, bias, int8_activations=self.int8_activations)


def _arranged(x: torch.Tensor, perm: torch.Tensor | None, pad: int) -> torch.Tensor:
    """x in the packed weight's column order (act-order), with `pad` zero columns appended."""
    if perm is not None:
        x = x.index_select(-1, perm)
    return F.pad(x, (0, pad)) if pad else x


def padded_to_whole_groups(w: Int8Weight | GroupedWeight) -> tuple[Int8Weight | GroupedWeight, int]:
    """(w with zero codes appended to K, how many): K becomes a whole number of groups (grouped) or a
    multiple of 32 (per channel: the one group grows with it); scales and mins are unchanged. The
    padded weight has no perm (the runtime keeps the original's: x is permuted, then padded)."""
    n, k = w.q.shape
    if isinstance(w, GroupedWeight):
        k_pad = w.scales.shape[1] * w.group_size
    else:
        k_pad = -(-k // 32) * 32
    if k_pad == k:
        return w, 0
    q = F.pad(w.q, (0, k_pad - k))
    if isinstance(w, GroupedWeight):
        return GroupedWeight(q, w.scales, w.mins, w.group_size, None, w.bits), k_pad - k
    return Int8Weight(q, w.scales), k_pad - k


def kernel_runtimes(model: torch.nn.Module) -> list:
    """The runtimes of every linear layer of `model` that runs on these kernels (Q4 / Q8 / k-quant /
    stacked): what `cpu_activations` applies to."""
    from shardserve.workers.quant.cpu_kernels.kquant import KquantRuntime
    from shardserve.workers.quant.stacked import StackedRuntime

    runtimes = (getattr(getattr(module, "quant_method", None), "runtime", None) for module in model.modules())
    return [r for r in runtimes if isinstance(r, Q4Runtime | Q8Runtime | KquantRuntime | StackedRuntime)]


def use_int8_activations(model: torch.nn.Module) -> int:
    """Switch every linear layer of `model` that runs on these kernels to int8 activations
    (ModelConfig.cpu_activations = int8); returns how many layers that was."""
    runtimes = kernel_runtimes(model)
    for runtime in runtimes:
        runtime.int8_activations = True
    return len(runtimes)


def kernel_runtime(w: QuantizedWeight) -> Runtime | None:
    if isinstance(w, GroupedWeight) and w.float32_scales:  # GGUF k-quants: kquant.py's exact float32 layouts
        return _kquant_runtime(w)
    if isinstance(w, GroupedWeight) and w.group_size % 32:
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
