"""`ExpertQuantMethod`: quantization at load (int8 | int4 | fp8) of a MoE layer's stacked experts.

Data flow for the experts of one layer on one rank (workers/models/moe.py `FusedExperts`):
  loading         the layer keeps its float parameters `w13_weight [E_local, 2 I / tp, H]` and
                  `w2_weight [E_local, H, I_load]` and copies only its experts (expert parallelism)
                  and its rows of gate / up; under MoE tensor parallelism the down projection is
                  read with every input feature (`full_w2_inputs`), as the dense at-load method does
                  for row-parallel layers, so per-channel scales are the ones one process computes;
  finish_loading  rounds every expert (algorithms/rtn.py, through the at-load layout), keeps this
                  rank's input slice of w2 (whole groups, or one row-wide group), frees the float
                  parameters and packs for the device: the stacked plane / FP8 layout of
                  kernels/moe.py on CUDA, or one CPU runtime per expert (cpu.py: the C++ kernels or
                  torch's packed CPU matmuls), run by the layer's expert loop;
  apply           the fused quantized MoE kernel (CUDA) or the per-expert loop (CPU).
Checkpoints already quantized (GPTQ / AWQ / compressed-tensors) are read by expert_checkpoint.py,
which hands its unpacked experts to the same `PackedExperts` packing; GGUF experts are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from shardserve.workers.quant.formats.at_load import AtLoadLayout
from shardserve.workers.quant.formats.gguf import GgufLayout
from shardserve.workers.quant.formats.layout import CheckpointLayout
from shardserve.workers.quant.weights import GroupedWeight, QuantizedWeight, narrow_inputs

if TYPE_CHECKING:  # imported lazily at run time: Triton only on CUDA
    from shardserve.workers.quant.kernels.moe import MoePacked

ExpertLinear = Callable[[int, torch.Tensor], torch.Tensor]  # (local expert, x [n, in]) -> [n, out]


def check_expert_layout(layout: CheckpointLayout | None) -> CheckpointLayout | None:
    """The layout a MoE model's experts are quantized with (at load, or read from a GPTQ / AWQ /
    compressed-tensors checkpoint), or an error for layouts with no expert reader (GGUF)."""
    if layout is None or not isinstance(layout, GgufLayout):
        return layout
    raise ValueError(f"quantization ({layout.name}) of mixture-of-experts models is not supported: their "
                     "expert tensors have no reader for that format yet; serve the float checkpoint with "
                     "quantization: int8 | int4 | fp8 (quantized at load, experts included) or null")


@dataclass
class CpuExperts:
    """One CPU runtime per local expert and projection (cpu.py picks the kernel for each)."""

    w13: list[Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]]
    w2: list[Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]]

    def up(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.w13[expert](x, None)

    def down(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.w2[expert](x, None)


def split_experts(w: QuantizedWeight, num_experts: int) -> list[QuantizedWeight]:
    """A weight of the stacked rows [E * N, K] -> E weights [N, K] (views, no copy)."""
    fields = {name: value.chunk(num_experts) if isinstance(value, torch.Tensor) and name != "perm" else None
              for name, value in vars(w).items()}
    return [type(w)(**{name: parts[e] if parts is not None else getattr(w, name) for name, parts in fields.items()})
            for e in range(num_experts)]


def _narrow(w: QuantizedWeight, start: int, size: int) -> QuantizedWeight:
    """This rank's inputs of a weight rounded whole; a single group a row (int4 with group -1) keeps its
    row's scale and min over the slice (one group of `size`), so the rank matches one process."""
    if isinstance(w, GroupedWeight) and w.scales.shape[1] == 1 and w.perm is None:
        return GroupedWeight(q=w.q[:, start:start + size].contiguous(), scales=w.scales, mins=w.mins,
                             group_size=size, bits=w.bits)
    return narrow_inputs(w, start, size)


class PackedExperts:
    """This rank's experts kept quantized for the device: `pack` once loaded, then `fused` / `linears`."""

    def __init__(self) -> None:
        self.cpu: CpuExperts | None = None
        self.packed: tuple[MoePacked, MoePacked] | None = None  # (w13, w2) on CUDA

    def pack(self, q13: list[QuantizedWeight], q2: list[QuantizedWeight], device: torch.device,
             dtype: torch.dtype) -> None:
        """Per-expert unpacked weights (w13 = gate rows then up rows, w2 this rank's inputs) -> runtime form."""
        if device.type == "cuda":
            from shardserve.workers.quant.kernels.moe import pack_moe

            self.packed = (pack_moe(q13, dtype), pack_moe(q2, dtype))
        else:
            from shardserve.workers.quant.cpu import cpu_runtime

            self.cpu = CpuExperts([cpu_runtime(w) for w in q13], [cpu_runtime(w) for w in q2])

    def fused(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              local_expert_start: int) -> torch.Tensor:
        """The CUDA path: one fused MoE with the experts dequantized in its GEMMs."""
        if self.packed is None:
            raise RuntimeError("quantized experts used before their weights finished loading (or not on CUDA)")
        from shardserve.workers.quant.kernels.moe import fused_moe_quant

        w13, w2 = self.packed
        return fused_moe_quant(x, w13, w2, topk_weights, topk_ids, local_expert_start)

    def linears(self) -> tuple[ExpertLinear, ExpertLinear]:
        """The CPU path: (up, down) per local expert, for the layer's expert loop."""
        if self.cpu is None:
            raise RuntimeError("quantized experts on CUDA run in the fused MoE kernel only "
                               "(set_fused_kernels(False) is not supported for them)")
        return self.cpu.up, self.cpu.down


class ExpertQuantMethod(PackedExperts):
    def __init__(self, layout: AtLoadLayout) -> None:
        super().__init__()
        self.layout = layout
        self.w2_input_slice: tuple[int, int] | None = None

    def full_w2_inputs(self, tp_rank: int, tp_size: int, inter_per_rank: int) -> bool:
        """Whether w2 is loaded with every input feature (then sliced after rounding): under MoE TP."""
        if tp_size == 1:
            return False
        group = self.layout.group_size
        if self.layout.method == "int4" and group != -1 and inter_per_rank % group:
            raise ValueError(f"quantization: int4 with quantization_group_size {group} cannot split the experts' "
                             f"intermediate features over {tp_size} ranks ({inter_per_rank} a rank is not a "
                             f"multiple of {group}): choose a group size dividing {inter_per_rank}")
        self.w2_input_slice = (tp_rank * inter_per_rank, inter_per_rank)
        return True

    def quantize(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[list[QuantizedWeight], list[QuantizedWeight]]:
        """Float stacks [E, N, K] -> per-expert unpacked weights (w2 narrowed to this rank's inputs).
        Every expert's rows are rounded in one call (row-wise methods: the same as one call an expert)."""
        q13 = split_experts(self.layout.unpack({"weight": w13.reshape(-1, w13.shape[2])}), w13.shape[0])
        q2 = split_experts(self.layout.unpack({"weight": w2.reshape(-1, w2.shape[2])}), w2.shape[0])
        if self.w2_input_slice is not None:
            q2 = [_narrow(w, *self.w2_input_slice) for w in q2]
        return q13, q2

    def finish_loading(self, layer: torch.nn.Module) -> None:
        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        q13, q2 = self.quantize(w13, w2)
        del layer._parameters["w13_weight"], layer._parameters["w2_weight"]
        self.pack(q13, q2, w13.device, w13.dtype)
