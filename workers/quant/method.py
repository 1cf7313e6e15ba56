"""`QuantLinearMethod`: the linear-method slot (parallel/quant.py) for every quantized layout.

Data flow for one linear layer of one rank:
  create_weights  registers the layout's checkpoint tensors (formats/*.py `tensors`) at this
                  rank's size, each tagged with its sharded dims and packing, so the layer's
                  tensor-parallel `weight_loader` copies packed slices like plain ones;
  load_shard      copies one checkpoint tensor's slice (a per-tensor scale is spread over the
                  slice's output features);
  finish_loading  unpacks them into ../weights.py's form, hands that to the device's compute path
                  (cpu.py, or cuda.py's Triton kernels) which packs its own runtime layout, and
                  drops the checkpoint tensors;
  apply           y = runtime(x, bias).
`choose_method` is what the loader passes to `linear_methods`: every tensor-parallel linear layer
of the decoder is quantized; replicated layers (the MoE router) and the LM head stay in the model dtype.
`keep_float_layers` then gives plain weights back to the layers a checkpoint's ignore list names (ignore.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from shardserve.parallel.linear import ReplicatedLinear, RowParallelLinear
from shardserve.parallel.quant import Loadable, ShardSlice, UnquantizedLinearMethod, copy_shard, materialize
from shardserve.workers.quant.formats.at_load import AtLoadLayout
from shardserve.workers.quant.formats.layout import CheckpointLayout
from shardserve.workers.quant.ignore import Matcher, all_or_none, checkpoint_names
from shardserve.workers.quant.weights import QuantizedWeight, StackedWeight, narrow_inputs
from torch import nn

Runtime = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def runtime_for(weight: QuantizedWeight | StackedWeight, device: torch.device, dtype: torch.dtype) -> Runtime:
    if isinstance(weight, StackedWeight):  # row blocks quantized differently (GGUF Q4_K_M): one path each
        from shardserve.workers.quant.stacked import StackedRuntime

        return StackedRuntime([runtime_for(part, device, dtype) for part in weight.parts],
                              [part.q.shape[0] for part in weight.parts])
    if device.type == "cuda":
        from shardserve.workers.quant.cuda import cuda_runtime

        return cuda_runtime(weight, device, dtype)
    from shardserve.workers.quant.cpu import cpu_runtime

    return cpu_runtime(weight)


class QuantLinearMethod:
    def __init__(self, layout: CheckpointLayout) -> None:
        self.layout = layout
        self.names: tuple[str, ...] = ()
        self.runtime: Runtime | None = None
        self.merged_g_idx: torch.Tensor | None = None  # set by create_weights (GPTQ act-order, merged layer)
        self.g_idx_loaded = False

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], params_dtype: torch.dtype) -> None:
        if (isinstance(layer, RowParallelLinear) and layer.tp_size > 1
                and getattr(self.layout, "desc_act", False)):
            raise ValueError("act-order (desc_act) GPTQ checkpoints need tensor_parallel_size 1: a row-parallel "
                             "layer's inputs would each need every group's scales; `shardserve quantize --static-groups` writes "
                             "a folder without act-order that shards")
        input_size = input_size_per_partition
        self.input_slice: tuple[int, int] | None = None
        if isinstance(self.layout, AtLoadLayout) and isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
            # Quantized at load: read the whole input axis and quantize it as one process would, then
            # keep this rank's slice (per-channel scales span every input feature).
            input_size = input_size_per_partition * layer.tp_size
            self.input_slice = (layer.tp_rank * input_size_per_partition, input_size_per_partition)
        specs = self.layout.tensors(input_size, sum(output_partition_sizes))
        if self.input_slice is not None:
            specs = {name: replace(spec, input_dim=None) for name, spec in specs.items()}
        for name, spec in specs.items():
            param = nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False)
            param.input_dim, param.output_dim = spec.input_dim, spec.output_dim
            param.input_pack, param.output_pack = spec.input_pack, spec.output_pack
            layer.register_parameter(name, param)
        self.names = tuple(specs)
        # GPTQ's act-order g_idx is one tensor for a merged layer (q/k/v, gate/up): its parts must agree.
        self.merged_g_idx = layer.g_idx if "g_idx" in specs and len(output_partition_sizes) > 1 else None
        self.g_idx_loaded = False

    def load_shard(self, param: torch.Tensor, loaded_weight: Loadable, shard: ShardSlice) -> None:
        if len(loaded_weight.shape) > param.dim():  # e.g. a [N, 1] scale for our [N]
            loaded_weight = materialize(loaded_weight).reshape(-1)
        if math.prod(loaded_weight.shape) == 1 and param.dim() == 1 and param.shape[0] > 1:  # one scale per tensor
            dst = param.data if shard.axis != "output" else param.data.narrow(0, shard.dst_start, shard.size)
            dst.fill_(materialize(loaded_weight).reshape(()).item())
            return
        if param is self.merged_g_idx:
            before = param.data.clone() if self.g_idx_loaded else None
            copy_shard(param, loaded_weight, shard)
            if before is not None and not torch.equal(before, param.data):
                raise ValueError("the parts of a merged layer (q/k/v or gate/up) have different act-order g_idx in "
                                 "this checkpoint; one order per input is supported (GPTQModel and AutoGPTQ write "
                                 "one): re-quantize with desc_act false or one order for the parts")
            self.g_idx_loaded = True
            return
        copy_shard(param, loaded_weight, shard)

    def finish_loading(self, layer: nn.Module) -> None:
        tensors = {name: getattr(layer, name).data for name in self.names}
        device = getattr(layer, self.names[0]).device
        weight = self.layout.unpack(tensors)
        if self.input_slice is not None:
            weight = narrow_inputs(weight, *self.input_slice)
        for name in self.names:
            del layer._parameters[name]
        self.runtime = runtime_for(weight, device, layer.params_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.runtime is None:
            raise RuntimeError("quantized layer used before its weights finished loading")
        return self.runtime(x, bias)


def method_chooser(layout: CheckpointLayout | None) -> Callable[[nn.Module], QuantLinearMethod | None]:
    """For `linear_methods`: a fresh method per tensor-parallel linear layer, none for the others."""
    def choose(layer: nn.Module) -> QuantLinearMethod | None:
        if layout is None or isinstance(layer, ReplicatedLinear):
            return None
        return QuantLinearMethod(layout)

    return choose


def keep_float_layers(model: nn.Module, is_unquantized: Matcher) -> None:
    """Layers of a quantized checkpoint that its ignore list keeps in float (e.g. Qwen2-MoE shared experts
    some tools leave alone) get plain weights in place of the layout's tensors; before any weight is loaded."""
    for name, layer in model.named_modules():
        method = getattr(layer, "quant_method", None)
        if not isinstance(method, QuantLinearMethod) or isinstance(method.layout, AtLoadLayout):
            continue
        if not all_or_none(checkpoint_names(name), is_unquantized, name):
            continue
        device = getattr(layer, method.names[0]).device
        for param_name in method.names:
            del layer._parameters[param_name]
        layer.quant_method = UnquantizedLinearMethod()
        with torch.device(device):
            layer.quant_method.create_weights(layer, layer.input_size_per_partition, layer.output_partition_sizes,
                                              layer.params_dtype)
        layer.weight.weight_loader = layer.weight_loader
