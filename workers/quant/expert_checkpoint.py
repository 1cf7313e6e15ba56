"""`CheckpointExperts`: a MoE layer's experts read from a GPTQ / AWQ / compressed-tensors folder, kept quantized.

Data flow for the experts of one layer on one rank (workers/models/moe.py `FusedExperts`):
  create  FusedExperts' float stacks are replaced by the layout's tensors (formats/*.py `tensors`) per
          projection, stacked over this rank's experts, e.g. `gate_proj_qweight [E_local, H / 8, I / tp]`,
          `down_proj_scales [E_local, I / tp / g, H]`, each tagged with its sharded dims and packing;
  load    one expert's checkpoint tensor (`...experts.7.down_proj.qzeros`) -> this rank's slice through
          method.py's `load_shard`, as a dense layer's: gate / up keep this rank's output rows, down its
          input columns (whole groups: checked at create), per-tensor scales spread over rows; other
          EP ranks' experts are never read;
  finish  every local expert must have every tensor (a missing one is named); each projection is
          unpacked by the dense readers' `layout.unpack`, gate and up stacked into w13, and the experts
          packed by experts.py's `PackedExperts` (fused kernel on CUDA, per-expert CPU runtimes).
Act-order GPTQ (g_idx not k // g): down's input permutation is folded into w13's row order (exact, no
runtime cost); gate / up's (the same for both: GPTQ orders by the shared input's Hessian; different
ones are refused, naming the expert) stays a per-expert input permutation, gathered by the CPU runtimes
and the fused kernel. Act-order under MoE TP is refused, as for dense row-parallel layers. 8-bit groups
of one row with zero point 128 (compressed-tensors W8A16 per channel) run as INT8 per channel.
"""

from __future__ import annotations

import torch
from shardserve.parallel.quant import Loadable, ShardSlice
from shardserve.workers.quant.experts import PackedExperts
from shardserve.workers.quant.formats.layout import CheckpointLayout, TensorSpec
from shardserve.workers.quant.method import QuantLinearMethod
from shardserve.workers.quant.weights import GroupedWeight, Int8Weight, QuantizedWeight
from torch import nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def stack_rows(gate: QuantizedWeight, up: QuantizedWeight, where: str) -> QuantizedWeight:
    """[gate; up] along the output features (both of one layout, one input order)."""
    if type(gate) is not type(up):
        raise ValueError(f"{where}: gate_proj and up_proj are quantized differently "
                         f"({type(gate).__name__}, {type(up).__name__})")
    if isinstance(gate, GroupedWeight):
        if gate.group_size != up.group_size or gate.bits != up.bits:
            raise ValueError(f"{where}: gate_proj and up_proj have different groups or bits")
        if (gate.perm is None) != (up.perm is None) or (gate.perm is not None and not torch.equal(gate.perm, up.perm)):
            raise ValueError(f"{where}: gate_proj and up_proj have different act-order g_idx; the experts' "
                             "merged gate/up projection needs one input order (GPTQ writes the same for both)")
        return GroupedWeight(q=torch.cat([gate.q, up.q]), scales=torch.cat([gate.scales, up.scales]),
                             mins=torch.cat([gate.mins, up.mins]), group_size=gate.group_size, perm=gate.perm,
                             bits=gate.bits)
    return type(gate)(q=torch.cat([gate.q, up.q]), scales=torch.cat([gate.scales, up.scales]))


def rows(w: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    """The weight's output rows in `order`."""
    if isinstance(w, GroupedWeight):
        return GroupedWeight(q=w.q[order], scales=w.scales[order], mins=w.mins[order], group_size=w.group_size,
                             perm=w.perm, bits=w.bits)
    return type(w)(q=w.q[order], scales=w.scales[order])


def as_channel_int8(w: QuantizedWeight) -> QuantizedWeight:
    """An 8-bit weight of one group a row and zero point 128 is INT8 per channel: q - 128, same scales."""
    if (isinstance(w, GroupedWeight) and w.bits == 8 and w.perm is None and w.scales.shape[1] == 1
            and torch.equal(w.mins, -128 * w.scales)):
        return Int8Weight(q=(w.q.to(torch.int16) - 128).to(torch.int8), scales=w.scales[:, 0].contiguous())
    return w


class CheckpointExperts(PackedExperts):
    """The experts of one FusedExperts layer (`prefix`, e.g. model.layers.3.mlp.experts) in `layout`."""

    def __init__(self, layout: CheckpointLayout, prefix: str) -> None:
        super().__init__()
        self.layout, self.prefix = layout, prefix
        self.specs: dict[str, dict[str, TensorSpec]] = {}
        self.loaded: set[tuple[int, str]] = set()  # (local expert, parameter name)
        self.loader = QuantLinearMethod(layout)  # its load_shard slices one tensor like a dense layer's
        self.checkpoint_proj = {proj: proj for proj in PROJECTIONS}  # Mixtral: w1 / w3 / w2

    def create(self, layer: nn.Module, hidden: int, inter_per_rank: int, tp_size: int) -> None:
        """Replace the layer's float stacks by this layout's tensors, stacked over its local experts."""
        if tp_size > 1:
            self._check_tp(inter_per_rank, tp_size)
        device = layer.w13_weight.device
        del layer._parameters["w13_weight"], layer._parameters["w2_weight"]
        for proj in PROJECTIONS:
            inputs, outputs = (inter_per_rank, hidden) if proj == "down_proj" else (hidden, inter_per_rank)
            try:
                self.specs[proj] = self.layout.tensors(inputs, outputs)
            except ValueError as exc:
                raise ValueError(f"{self.prefix}.*.{proj}: {exc}") from exc
            for name, spec in self.specs[proj].items():
                param = nn.Parameter(torch.empty(layer.num_local_experts, *spec.shape, dtype=spec.dtype,
                                                 device=device), requires_grad=False)
                param.weight_loader = layer.weight_loader
                layer.register_parameter(f"{proj}_{name}", param)

    def _check_tp(self, inter_per_rank: int, tp_size: int) -> None:
        group = getattr(self.layout, "group_size", None)
        scale = f"{self.prefix}.<expert>.down_proj.{'scales' if 'scales' in self._names() else 'weight_scale'}"
        if getattr(self.layout, "desc_act", False):
            raise ValueError(f"{scale}: act-order (desc_act) GPTQ experts need a MoE tensor-parallel size of 1 "
                             "(each rank's slice of down_proj's inputs would need every group); use expert "
                             "parallelism, or a folder without act-order")
        if group == -1:
            raise ValueError(f"{scale}: one quantization group a row (group_size -1) cannot be split over "
                             f"{tp_size} MoE tensor-parallel ranks; use expert parallelism or a grouped folder")
        if group is not None and inter_per_rank % group:
            raise ValueError(f"{scale}: group_size {group} does not divide the {inter_per_rank} intermediate "
                             f"features each of {tp_size} MoE tensor-parallel ranks holds; use expert "
                             f"parallelism or a MoE tensor-parallel size whose slice is whole groups")

    def _names(self) -> tuple[str, ...]:
        return tuple(self.layout.tensors(256, 256))

    def param_name(self, proj: str, tensor: str) -> str | None:
        """The layer's parameter for a checkpoint tensor name of one expert projection (None: not in the layout)."""
        return f"{proj}_{tensor}" if tensor in self.specs.get(proj, {}) else None

    def load(self, layer: nn.Module, loaded: Loadable, local: int, proj: str, tensor: str) -> None:
        """One expert's checkpoint tensor into its slot of the stacked parameter (this rank's slice)."""
        param_name, spec = f"{proj}_{tensor}", self.specs[proj][tensor]
        view = getattr(layer, param_name).data[local]
        view.input_dim, view.output_dim = spec.input_dim, spec.output_dim
        view.input_pack, view.output_pack = spec.input_pack, spec.output_pack
        n, start = layer.inter_per_rank, layer.moe_tp_rank * layer.inter_per_rank
        shard = ShardSlice("input" if proj == "down_proj" else "output", start, 0, n)
        self.loader.load_shard(view, loaded, shard)
        self.loaded.add((local, param_name))

    def missing(self, num_local: int, first_expert: int) -> list[str]:
        """Checkpoint names of the tensors no local expert received."""
        return [f"{self.prefix}.{first_expert + e}.{self.checkpoint_proj[proj]}.{name}"
                for e in range(num_local) for proj, specs in self.specs.items() for name in specs
                if (e, f"{proj}_{name}") not in self.loaded]

    def finish_loading(self, layer: nn.Module) -> None:
        first = layer.placement.start
        missing = self.missing(layer.num_local_experts, first)
        if missing:
            raise ValueError(f"checkpoint has no tensor {missing[0]}" + (
                f" (and {len(missing) - 1} more expert tensors)" if len(missing) > 1 else ""))
        tensors = {proj: {name: getattr(layer, f"{proj}_{name}").data for name in specs}
                   for proj, specs in self.specs.items()}
        device = next(iter(tensors["gate_proj"].values())).device
        q13, q2 = [], []
        for e in range(layer.num_local_experts):
            where = f"{self.prefix}.{first + e}"
            gate, up, down = (as_channel_int8(self.layout.unpack({n: t[e] for n, t in tensors[proj].items()}))
                              for proj in PROJECTIONS)
            w13 = stack_rows(gate, up, where)
            if isinstance(down, GroupedWeight) and down.perm is not None:  # act-order down: w13 rows in its order
                n = down.q.shape[1]
                w13 = rows(w13, torch.cat([down.perm, down.perm + n]))
                down = GroupedWeight(q=down.q, scales=down.scales, mins=down.mins, group_size=down.group_size,
                                     bits=down.bits)
            q13.append(w13)
            q2.append(down)
        for proj, specs in self.specs.items():
            for name in specs:
                del layer._parameters[f"{proj}_{name}"]
        self.pack(q13, q2, device, layer.params_dtype)
