"""The quantization slot of every linear layer: create its weights, load a shard, apply it.

A linear layer asks its `LinearMethod` to `create_weights` (registering parameters on the
layer, sized for this rank), then for each checkpoint tensor the layer's `weight_loader`
works out which rows or columns belong to this rank (a `ShardSlice`, in logical feature
units) and hands the copy to `LinearMethod.load_shard`, which knows how its parameters are
packed. In the forward pass the layer calls `apply(layer, x, bias)`. FP16/BF16 weights are
`UnquantizedLinearMethod` (cuBLAS, or on CUDA at decode size the PDL matrix-vector kernel of
parallel/kernels/decode_linear.py); INT8, INT4 (GPTQ, AWQ) and FP8 are other implementations of the same
protocol (workers/quant/), so no layer forks per format.

Checkpoint tensors may arrive lazily (a `WeightSource`, e.g. a safetensors slice): only the
part this rank needs is read, by `narrow` before `materialize`. Packed parameters say how many
features one element covers along a sharded dim (`input_pack` / `output_pack`: 8 nibbles per
int32, a group per scale), and `copy_shard` slices them in elements. A method that must see every
shard before it can pack (all of workers/quant/) does so in `finish_loading`, which the loader
calls once per layer after the last tensor; the model is built inside `linear_methods(choose)` to
give its layers a method other than plain weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class WeightSource(Protocol):
    """A checkpoint tensor not read yet: narrowing it is free, `load` reads the bytes."""

    @property
    def shape(self) -> torch.Size: ...

    def narrow(self, dim: int, start: int, length: int) -> WeightSource: ...

    def load(self) -> torch.Tensor: ...


Loadable = torch.Tensor | WeightSource


def materialize(weight: Loadable) -> torch.Tensor:
    """Read a lazily sliced checkpoint tensor (a tensor passes through)."""
    return weight if isinstance(weight, torch.Tensor) else weight.load()


@dataclass(frozen=True)
class ShardSlice:
    """The part of a checkpoint tensor that one rank's parameter receives.

    axis: which logical axis is sliced, `output` (features out) or `input` (features in);
      None copies the whole tensor.
    src_start: first feature taken from the checkpoint tensor.
    dst_start: first feature written in this rank's parameter (merged layers stack shards).
    size: number of features copied.
    """

    axis: Literal["output", "input"] | None = None
    src_start: int = 0
    dst_start: int = 0
    size: int = 0


def copy_shard(param: torch.Tensor, loaded_weight: Loadable, shard: ShardSlice) -> None:
    """Copy `shard` of `loaded_weight` into `param`, for plain (unpacked) parameters.

    The parameter says which tensor dimension holds each logical axis through its attributes
    `output_dim` / `input_dim` (absent: the axis is not sharded for this parameter).
    """
    src, dst = loaded_weight, param.data
    dim = None if shard.axis is None else getattr(param, f"{shard.axis}_dim", None)
    if dim is not None:
        pack = getattr(param, f"{shard.axis}_pack", 1)
        if shard.src_start % pack or shard.dst_start % pack or shard.size % pack:
            raise ValueError(f"a packed parameter holds {pack} {shard.axis} features per element, so it cannot "
                             f"take the slice of {shard.size} features at {shard.src_start} "
                             f"(tensor-parallel size too large for this layer's packing or group size)")
        src = src.narrow(dim, shard.src_start // pack, shard.size // pack)
        dst = dst.narrow(dim, shard.dst_start // pack, shard.size // pack)
    tensor = materialize(src)
    if tuple(tensor.shape) != tuple(dst.shape):
        raise ValueError(f"checkpoint shard of shape {tuple(tensor.shape)} does not fit parameter "
                         f"slice of shape {tuple(dst.shape)} ({shard})")
    dst.copy_(tensor)


class LinearMethod(Protocol):
    """How one linear layer stores, loads and applies its weight."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], params_dtype: torch.dtype) -> None:
        """Register this rank's parameters on `layer` (at least one named `weight`).

        Each parameter gets `output_dim` / `input_dim` attributes naming its sharded dims.
        `output_partition_sizes` lists the per-rank outputs of each merged shard (q, k, v or
        gate, up); they are stacked along the output axis.
        """
        ...

    def load_shard(self, param: torch.Tensor, loaded_weight: Loadable, shard: ShardSlice) -> None:
        """Copy `shard` of a checkpoint tensor into `param` (any parameter of the layer)."""
        ...

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ W.T + bias` for this rank's weight: [num_tokens, in] -> [num_tokens, out]."""
        ...

    def finish_loading(self, layer: nn.Module) -> None:
        """Called once every checkpoint tensor of `layer` is loaded (repacking, freeing)."""
        ...


MethodChooser = Callable[[nn.Module], "LinearMethod | None"]
_chooser: list[MethodChooser] = []


@contextmanager
def linear_methods(choose: MethodChooser | None) -> Iterator[None]:
    """Layers built inside get `choose(layer)` as their method (None from it: plain weights)."""
    _chooser.append(choose or (lambda layer: None))
    try:
        yield
    finally:
        _chooser.pop()


def default_linear_method(layer: nn.Module) -> LinearMethod:
    """The method for a layer built without an explicit one (see `linear_methods`)."""
    method = _chooser[-1](layer) if _chooser else None
    return method or UnquantizedLinearMethod()


def finish_loading(model: nn.Module) -> None:
    """Let every linear layer's method finish (the loader calls this after the last tensor)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.finish_loading(module)


class UnquantizedLinearMethod:
    """Plain weights in the compute dtype: `weight` [sum(output_partition_sizes), input_size]."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                          dtype=params_dtype), requires_grad=False)
        weight.output_dim = 0
        weight.input_dim = 1
        layer.register_parameter("weight", weight)

    def load_shard(self, param: torch.Tensor, loaded_weight: Loadable, shard: ShardSlice) -> None:
        copy_shard(param, loaded_weight, shard)

    def finish_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda:  # decode-size steps: the PDL matrix-vector kernel (parallel/kernels/decode_linear.py)
            from shardserve.parallel.kernels.decode_linear import decode_linear, wanted_for

            if wanted_for(x, layer.weight):
                return decode_linear(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)
