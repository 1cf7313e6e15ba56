"""Tensor-parallel linear layers: each rank holds a slice of the weight and loads only that slice.

Column-parallel layers split the output features across the TP group: rank r computes
outputs `[r * out/tp, (r+1) * out/tp)` and the result stays sharded (the next layer is
row-parallel). Row-parallel layers split the input features: each rank multiplies its slice
of the activations and the partial sums are added by one all-reduce, which is the last thing
their forward does. Merged layers (gate_up, qkv) stack several checkpoint tensors along the
output axis; each checkpoint tensor is loaded with a `shard_id` naming its place.

Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which turns the
layer's geometry and this rank's index into a `ShardSlice` and lets the layer's `LinearMethod`
(the quantization slot, parallel/quant.py) copy it.
"""

from __future__ import annotations

import torch
from shardserve.parallel.comm import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from shardserve.parallel.quant import LinearMethod, Loadable, ShardSlice, default_linear_method
from shardserve.parallel.state import get_parallel_state
from torch import nn


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """Creates this rank's parameters through the quant method and attaches their loaders."""

    def __init__(self, input_size_per_partition: int, output_partition_sizes: list[int], bias: bool,
                 quant_method: LinearMethod | None, params_dtype: torch.dtype | None) -> None:
        super().__init__()
        state = get_parallel_state()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = output_partition_sizes
        self.output_size_per_partition = sum(output_partition_sizes)
        self.quant_method: LinearMethod = quant_method or default_linear_method(self)
        params_dtype = params_dtype or torch.get_default_dtype()
        self.params_dtype = params_dtype  # the compute dtype (quantized methods keep other storage)
        self.quant_method.create_weights(self, input_size_per_partition, output_partition_sizes, params_dtype)
        if bias:
            b = nn.Parameter(torch.empty(self.output_size_per_partition, dtype=params_dtype), requires_grad=False)
            b.output_dim = 0
            self.register_parameter("bias", b)
        else:
            self.register_parameter("bias", None)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: Loadable, shard_id: object = None) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_per_rank={self.input_size_per_partition}, out_per_rank={self.output_partition_sizes}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}")


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole (e.g. the MoE router)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, [output_size], bias, quant_method, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: Loadable, shard_id: object = None) -> None:
        self.quant_method.load_shard(param, loaded_weight, ShardSlice())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, input_size] -> [num_tokens, output_size]
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = X A^T with A split by rows (output features) across the TP group."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 quant_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None,
                 output_sizes: list[int] | None = None) -> None:
        tp_size = get_parallel_state().tp_size
        self.output_sizes = output_sizes or [output_size]  # total (all ranks) size of each merged shard
        super().__init__(input_size, [divide(s, tp_size) for s in self.output_sizes], bias,
                         quant_method, params_dtype)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded_weight: Loadable, shard_id: object = None) -> None:
        size = self.output_size_per_partition
        shard = ShardSlice("output", src_start=self.tp_rank * size, dst_start=0, size=size)
        self.quant_method.load_shard(param, loaded_weight, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, input_size] -> [num_tokens, output_size / tp_size] (or whole if gathered)
        out = self.quant_method.apply(self, x, self.bias)
        return tensor_model_parallel_all_gather(out) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_up_proj: shard 0 = gate, 1 = up).

    Each rank's weight stacks its slice of every shard: [gate_r; up_r].
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, sum(output_sizes), bias, quant_method=quant_method,
                         params_dtype=params_dtype, output_sizes=list(output_sizes))

    def weight_loader(self, param: nn.Parameter, loaded_weight: Loadable, shard_id: object = None) -> None:
        if shard_id is None:  # an already-merged checkpoint tensor: split it into its shards
            dim = param.output_dim
            offset = 0
            for i, total in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(dim, offset, total), i)
                offset += total
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be in [0, {len(self.output_sizes)}), got {shard_id!r}")
        size = self.output_partition_sizes[shard_id]
        dst_start = sum(self.output_partition_sizes[:shard_id])
        shard = ShardSlice("output", src_start=self.tp_rank * size, dst_start=dst_start, size=size)
        self.quant_method.load_shard(param, loaded_weight, shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads split across the TP group.

    When tp_size > total_num_kv_heads each KV head is replicated on tp_size / total_num_kv_heads
    ranks (each rank then holds one KV head). Shard ids: "q", "k", "v".
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, quant_method: LinearMethod | None = None,
                 params_dtype: torch.dtype | None = None) -> None:
        tp_size = get_parallel_state().tp_size
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        q_size, kv_size = self.num_heads * head_size, self.num_kv_heads * head_size
        # Output sizes as if every rank's slice were concatenated (replicated kv heads counted per rank).
        super().__init__(hidden_size, (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size, bias,
                         quant_method=quant_method, params_dtype=params_dtype,
                         output_sizes=[q_size * tp_size, kv_size * tp_size, kv_size * tp_size])
        self.q_size, self.kv_size = q_size, kv_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: Loadable, shard_id: object = None) -> None:
        if shard_id == "q":
            shard = ShardSlice("output", self.tp_rank * self.q_size, 0, self.q_size)
        elif shard_id in ("k", "v"):
            head_rank = self.tp_rank // self.num_kv_head_replicas
            dst = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            shard = ShardSlice("output", head_rank * self.kv_size, dst, self.kv_size)
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        self.quant_method.load_shard(param, loaded_weight, shard)


class RowParallelLinear(LinearBase):
    """Y = X A^T with A split by columns (input features); partial sums meet in one all-reduce.

    The bias is added on TP rank 0 only, before the reduction, so the sum carries it once.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None,
                 reduce_results: bool = True) -> None:
        tp_size = get_parallel_state().tp_size
        super().__init__(divide(input_size, tp_size), [output_size], bias, quant_method, params_dtype)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded_weight: Loadable, shard_id: object = None) -> None:
        if getattr(param, "input_dim", None) is None:  # bias: replicated
            self.quant_method.load_shard(param, loaded_weight, ShardSlice())
            return
        size = self.input_size_per_partition
        self.quant_method.load_shard(param, loaded_weight, ShardSlice("input", self.tp_rank * size, 0, size))

    def forward(self, x: torch.Tensor, reduce: bool | None = None) -> torch.Tensor:
        # x: [num_tokens, input_size / tp_size] -> partial [num_tokens, output_size], summed over
        # the TP group unless `reduce` (default: self.reduce_results) is False
        bias = self.bias if self.tp_rank == 0 else None
        out = self.quant_method.apply(self, x, bias)
        if not (self.reduce_results if reduce is None else reduce):
            return out
        return tensor_model_parallel_all_reduce(out)
