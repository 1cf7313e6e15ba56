"""ModelConfig.cpu_activations, resolved on the loaded model: auto | float | int8 -> float | int8.

`apply_cpu_activations(model, setting, device)` runs once in the runner, after the model is loaded
and its CPU LM head chosen: it finds the linear layers on the quantized CPU kernels
(workers/quant/cpu_kernels/runtime.py `kernel_runtimes`) and, for int8, sets `int8_activations` on
each of them and on the packed Q8_0 LM head (workers/models/cpu_head.py), which the kernels and the
C++ decode stack read at every call. `auto` is int8 exactly where there is a decoder layer on those
kernels (CPU, weights kept quantized), else float: a float model keeps float activations even where
its LM head is the lossless Q8_0 copy, so its outputs stay those of its float weights. `int8` keeps
its refusals (a GPU engine; no layer and no head on the kernels); `auto` never refuses. The value
returned is what the engine logs and reports (engine.py). `float` leaves every flag as it is: a
self-draft sharing the target's layers (spec/self_draft.py) gets the target's resolved value.
"""

from __future__ import annotations

import torch
from shardserve.workers.config import CpuActivations, ResolvedCpuActivations


def apply_cpu_activations(model: torch.nn.Module, setting: CpuActivations,
                          device: torch.device) -> ResolvedCpuActivations:
    """Resolve `setting` on `model` (on `device`), switch its kernels to int8 if that is the answer, return it."""
    from shardserve.workers.quant.cpu_kernels.runtime import kernel_runtimes  # the kernels' package, on use

    if setting == "float":
        return "float"
    on_cpu = device.type == "cpu"
    runtimes = kernel_runtimes(model) if on_cpu else []
    head = getattr(model, "cpu_lm_head", None) if on_cpu else None
    if setting == "auto" and not runtimes:
        return "float"
    if not on_cpu:
        raise ValueError(f"model.cpu_activations=int8 applies to the CPU kernels of quantized weights; this "
                         f"engine runs on {device}: use cpu_activations=float or auto")
    if not runtimes and head is None:
        raise ValueError("model.cpu_activations=int8 needs weights kept quantized on CPU (e.g. quantization: "
                         "gguf, int4 or int8); no layer of this model runs on those kernels: use "
                         "cpu_activations=float or auto")
    for runtime in runtimes:
        runtime.int8_activations = True
    if head is not None:
        head.int8_activations = True
    return "int8"
