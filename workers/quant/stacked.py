"""The compute path of a StackedWeight: one runtime per row block, outputs concatenated.

A merged layer (qkv_proj, gate_up_proj) whose checkpoint quantized its parts differently (a GGUF
Q4_K_M file: q and k Q4_K, v Q6_K) cannot be one packed weight; each block of output features
keeps its own packed form and kernel (cpu.py / cuda.py) and y = cat(part(x)) along the features.
`int8_activations` (ModelConfig.cpu_activations) is passed to every part that has it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Runtime = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class StackedRuntime:
    def __init__(self, parts: Sequence[Runtime], sizes: Sequence[int]) -> None:
        self.parts, self.sizes = list(parts), list(sizes)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        biases = [None] * len(self.parts) if bias is None else list(bias.split(self.sizes))
        return torch.cat([part(x, b) for part, b in zip(self.parts, biases, strict=True)], dim=-1)

    @property
    def int8_activations(self) -> bool:
        return all(getattr(part, "int8_activations", False) for part in self.parts)

    @int8_activations.setter
    def int8_activations(self, value: bool) -> None:
        for part in self.parts:
            if not hasattr(part, "int8_activations"):
                raise ValueError(f"int8 activations are not available for {type(part).__name__}")
            part.int8_activations = value
