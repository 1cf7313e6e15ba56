"""Sparse mixture-of-experts models: Mixtral, Qwen2-MoE and Qwen3-MoE on the Llama skeleton.

Data flow of one MoE MLP: hidden [T, hidden] -> replicated router -> float32 softmax -> top-k
experts per token, weights renormalised (Mixtral always, Qwen2/3-MoE when `norm_topk_prob`) ->
this rank's experts run their SiLU-gated MLPs on their tokens -> partial sums over this rank's
slice of every expert's intermediate features (+ Qwen2-MoE's shared expert, a dense TP-sharded
MLP scaled by its sigmoid gate) -> one TP all-reduce, left to the next RMSNorm (`forward_unreduced`).

On CUDA the experts run as one fused grouped GEMM (`kernels/fused_moe.py`: static shapes, no host
sync, so decode steps can be captured in CUDA graphs) and routing is one Triton kernel
(kernels/moe_routing.py); on CPU each active expert runs in a Python loop, which reads the
per-expert counts on the host (`syncs_in_forward`). Expert weights are stacked:
`w13_weight [num_local_experts, 2 * inter / moe_tp, hidden]` (gate rows then up rows) and
`w2_weight [num_local_experts, hidden, inter / moe_tp]`. Without expert parallelism every rank
holds every expert (moe_tp = tp); under EP (parallel/expert.py) a rank holds only its range of
experts, reads only their checkpoint tensors, and `dispatch_and_combine_unreduced` moves the
routed tokens (all-to-all) or leaves the partial outputs to be summed (all-reduce); `expert_load`
counts the tokens routed to every expert. Experts are rounded once loaded (`quantization: int8 |
int4 | fp8`, quant/experts.py) or read kept quantized from a GPTQ / AWQ / compressed-tensors folder
(quant/expert_checkpoint.py) unless its ignore list keeps them float.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from shardserve.parallel.comm import tensor_model_parallel_all_reduce
from shardserve.parallel.expert import ExpertPlacement, dispatch_and_combine_unreduced
from shardserve.parallel.linear import ReplicatedLinear, divide
from shardserve.parallel.quant import Loadable, materialize
from shardserve.parallel.state import get_parallel_state
from shardserve.workers.models.layers import SiluAndMul, use_kernels
from shardserve.workers.models.llama import LlamaForCausalLM, LlamaMLP, LlamaOptions, MLPFactory
from shardserve.workers.quant.expert_checkpoint import CheckpointExperts
from shardserve.workers.quant.experts import ExpertQuantMethod, PackedExperts, check_expert_layout
from shardserve.workers.quant.formats.at_load import AtLoadLayout
from shardserve.workers.quant.formats.layout import CheckpointLayout
from shardserve.workers.quant.ignore import Matcher, all_or_none
from torch import nn


class FusedExperts(nn.Module):
    """This rank's experts' MLP weights, its slice of their intermediate features."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        state = get_parallel_state()
        self.moe_tp_rank = state.moe_tp_rank
        self.num_experts = num_experts  # total, all ranks
        self.placement = ExpertPlacement(num_experts, state.ep_size, state.ep_rank)
        self.num_local_experts = self.placement.num_local
        self.intermediate_size = intermediate_size  # total, all ranks
        self.inter_per_rank = divide(intermediate_size, state.moe_tp_size)
        dtype = dtype or torch.get_default_dtype()
        self.params_dtype = dtype
        self.hidden_size = hidden_size
        self.w13_weight = nn.Parameter(
            torch.empty(self.num_local_experts, 2 * self.inter_per_rank, hidden_size, dtype=dtype),
            requires_grad=False)
        self.w2_weight = nn.Parameter(
            torch.empty(self.num_local_experts, hidden_size, self.inter_per_rank, dtype=dtype), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self.w2_input_start = self.moe_tp_rank * self.inter_per_rank  # first w2 input column this rank reads
        self.quant_method: PackedExperts | None = None  # set by quantize_at_load / load_quantized
        self.act = SiluAndMul()  # Triton kernel on CUDA

    def quantize_at_load(self, method: ExpertQuantMethod) -> None:
        """Quantize these experts once loaded (workers/quant/experts.py); before any weight is loaded.
        Under MoE TP, w2 is then read with all its input features (sliced after rounding)."""
        self.quant_method = method
        state = get_parallel_state()
        if method.full_w2_inputs(self.moe_tp_rank, state.moe_tp_size, self.inter_per_rank):
            w2 = self.w2_weight
            self.w2_weight = nn.Parameter(
                torch.empty(self.num_local_experts, w2.shape[1], self.intermediate_size, dtype=w2.dtype,
                            device=w2.device), requires_grad=False)
            self.w2_weight.weight_loader = self.weight_loader
            self.w2_input_start = 0

    def load_quantized(self, method: CheckpointExperts) -> None:
        """Read these experts from a quantized checkpoint (workers/quant/expert_checkpoint.py): the float
        stacks give way to the layout's tensors; before any weight is loaded."""
        self.quant_method = method
        method.create(self, self.hidden_size, self.inter_per_rank, get_parallel_state().moe_tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: Loadable, shard_id: object = None) -> None:
        """shard_id = (expert, kind): kind in gate, up, down (one expert's 2-D tensor) or
        gate_up, down with expert None (a stacked [num_experts, ...] tensor); from a quantized
        checkpoint (expert, projection, tensor), e.g. (7, "down_proj", "qzeros")."""
        if isinstance(shard_id, tuple) and len(shard_id) == 3 and isinstance(self.quant_method, CheckpointExperts):
            expert, proj, tensor = shard_id
            if self.placement.is_local(expert):
                self.quant_method.load(self, loaded_weight, expert - self.placement.start, proj, tensor)
            return
        if not isinstance(shard_id, tuple) or len(shard_id) != 2:
            raise ValueError(f"expert shard_id must be (expert, kind), got {shard_id!r}")
        expert, kind = shard_id
        if expert is None:
            if loaded_weight.shape[0] != self.num_experts:
                raise ValueError(f"stacked expert tensor has {loaded_weight.shape[0]} experts, "
                                 f"expected {self.num_experts}")
            for e in range(self.num_experts):
                self.weight_loader(param, _select(loaded_weight, e), (e, kind))
            return
        if not self.placement.is_local(expert):
            return  # another EP rank's expert: never read
        n = self.inter_per_rank
        dst = param.data[expert - self.placement.start]
        if kind == "gate_up":
            self.weight_loader(param, loaded_weight.narrow(0, 0, self.intermediate_size), (expert, "gate"))
            self.weight_loader(param, loaded_weight.narrow(0, self.intermediate_size, self.intermediate_size),
                               (expert, "up"))
            return
        if kind in ("gate", "up"):  # [inter, hidden]: this rank's rows
            src = loaded_weight.narrow(0, self.moe_tp_rank * n, n)
            dst = dst.narrow(0, 0 if kind == "gate" else n, n)
        elif kind == "down":  # [hidden, inter]: this rank's columns (all of them to quantize at load under TP)
            src = loaded_weight.narrow(1, self.w2_input_start, param.shape[2])
        else:
            raise ValueError(f"expert weight kind must be gate, up, gate_up or down, got {kind!r}")
        dst.copy_(materialize(src))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]; topk_ids (global expert ids), topk_weights: [T, top_k] -> partial output [T, hidden]
        if self.quant_method is not None:
            if use_kernels(x):
                return self.quant_method.fused(x, topk_ids, topk_weights, self.placement.start)
            up, down = self.quant_method.linears()
        elif use_kernels(x):
            from shardserve.workers.kernels.fused_moe import fused_moe  # lazily: Triton only on CUDA

            return fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.placement.start,
                             self.num_local_experts)
        else:
            def up(expert: int, h: torch.Tensor) -> torch.Tensor:
                return F.linear(h, self.w13_weight[expert])

            def down(expert: int, h: torch.Tensor) -> torch.Tensor:
                return F.linear(h, self.w2_weight[expert])
        # Assignments to experts of other EP ranks go to bucket num_local_experts, which is skipped.
        top_k = topk_ids.shape[1]
        local_ids = topk_ids.reshape(-1) - self.placement.start  # [T * top_k]
        flat_ids = torch.where((local_ids >= 0) & (local_ids < self.num_local_experts), local_ids,
                               self.num_local_experts)
        order = torch.argsort(flat_ids, stable=True)  # assignments grouped by local expert
        counts = torch.bincount(flat_ids, minlength=self.num_local_experts + 1).tolist()[: self.num_local_experts]
        token_of = order // top_k  # [T * top_k] token index of each sorted assignment
        weight_of = topk_weights.reshape(-1)[order]  # [T * top_k]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start:start + count]  # [n]
            h = up(expert, x.index_select(0, tokens))  # [n, 2 * inter / tp]
            y = down(expert, self.act(h))  # [n, hidden]
            out.index_add_(0, tokens, (y * weight_of[start:start + count, None]).to(x.dtype))
            start += count
        return out


def quantize_experts_at_load(model: nn.Module, layout: CheckpointLayout | None,
                             is_unquantized: Matcher | None = None) -> None:
    """Give every FusedExperts of `model` the quantization of `layout` (the loader calls this right after
    building): rounded at load, or read from the checkpoint's quantized tensors; experts the folder's
    ignore list keeps float stay float (all of a layer's or none)."""
    layout = check_expert_layout(layout)
    if layout is None:
        return
    for name, module in model.named_modules():
        if not isinstance(module, FusedExperts):
            continue
        if isinstance(layout, AtLoadLayout):
            module.quantize_at_load(ExpertQuantMethod(layout))
            continue
        names = _checkpoint_expert_names(name, module.num_experts, isinstance(model, MixtralForCausalLM))
        if is_unquantized is not None and all_or_none(names, is_unquantized, f"{name}'s experts"):
            continue
        module.load_quantized(CheckpointExperts(layout, name))


def _checkpoint_expert_names(prefix: str, num_experts: int, mixtral: bool) -> tuple[str, ...]:
    """Every expert projection's checkpoint module name, spelled as the family writes it."""
    if mixtral:
        prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
    projections = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    return tuple(f"{prefix}.{e}.{proj}" for e in range(num_experts) for proj in projections)


def _select(weight: Loadable, index: int) -> Loadable:
    """weight[index] along dim 0 for tensors and lazy checkpoint slices alike."""
    picked = weight.narrow(0, index, 1)
    return picked[0] if isinstance(picked, torch.Tensor) else _Squeezed(picked)


class _Squeezed:
    """A lazy slice with a leading dim of 1 seen without it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.inner.shape[1:])

    def narrow(self, dim: int, start: int, length: int) -> _Squeezed:
        return _Squeezed(self.inner.narrow(dim % len(self.shape) + 1, start, length))

    def load(self) -> torch.Tensor:
        return materialize(self.inner)[0]


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 renormalize: bool, dtype: torch.dtype | None, shared_intermediate_size: int = 0) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = ReplicatedLinear(hidden_size, num_experts, params_dtype=dtype)  # router
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, dtype)
        self.shared_expert: LlamaMLP | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if shared_intermediate_size > 0:  # Qwen2-MoE: a dense expert every token goes through
            self.shared_expert = LlamaMLP(hidden_size, shared_intermediate_size, dtype)
            self.shared_expert.down_proj.reduce_results = False  # summed in the routed output's all-reduce
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, params_dtype=dtype)
        # Tokens routed to each expert since start (every rank sees the whole batch's routing).
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    @property
    def syncs_in_forward(self) -> bool:
        """True when forward reads device values on the host (the CPU expert loop): not graph-capturable."""
        return not use_kernels(self.gate.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> the complete MoE output [T, hidden]."""
        out, is_partial = self.forward_unreduced(x)
        return tensor_model_parallel_all_reduce(out) if is_partial else out

    def forward_unreduced(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(output [T, hidden], is_partial): the output may still be this TP rank's partial sum,
        for the caller to reduce (LlamaDecoderLayer leaves it to the next RMSNorm)."""
        router_logits = self.gate(x)  # [T, num_experts]
        if use_kernels(router_logits):
            from shardserve.workers.kernels.moe_routing import moe_route  # lazily: Triton only on CUDA

            # one kernel: softmax, top-k, renormalise, cast to x.dtype and the expert_load count
            topk_weights, topk_ids = moe_route(router_logits, self.top_k, self.renormalize, x.dtype,
                                               self.expert_load)
        else:
            probs = torch.softmax(router_logits.float(), dim=-1)
            topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, top_k]
            if self.renormalize:
                topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
            topk_weights = topk_weights.to(x.dtype)
            flat_ids = topk_ids.reshape(-1)
            self.expert_load.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))  # CUDA bincount would sync
        shared = None
        if self.shared_expert is not None:
            # [T, hidden] partial over TP; the per-token gate is replicated, so scaling commutes with the sum
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        # [T, hidden]: partial sums not yet all-reduced, or tokens dispatched and combined (complete)
        return dispatch_and_combine_unreduced(x, topk_ids, topk_weights, self.experts, self.experts.placement,
                                              partial=shared)


# Checkpoint expert names -> (expert index or None for stacked, kind).
_EXPERT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(?:w1|gate_proj)\.weight$"), "gate"),
    (re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(?:w3|up_proj)\.weight$"), "up"),
    (re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(?:w2|down_proj)\.weight$"), "down"),
    (re.compile(r"^(.*\.mlp\.experts)\.gate_up_proj$"), "gate_up"),
    (re.compile(r"^(.*\.mlp\.experts)\.down_proj$"), "down"),
)
# A quantized checkpoint's per-expert tensors, e.g. model.layers.0.mlp.experts.7.down_proj.qzeros.
_QUANTIZED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w1|gate_proj|w3|up_proj|w2|down_proj)\.(\w+)$")
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# Tensors of a quantized router or shared-expert gate (ours are float: ReplicatedLinear).
_QUANTIZED_ROUTER = re.compile(r"^(.*\.mlp\.(?:gate|shared_expert_gate))\.(?!weight$|bias$)\w+$")


class MoEForCausalLM(LlamaForCausalLM):
    """Shared loading of expert weights (per-expert or stacked checkpoint layouts)."""

    def map_checkpoint_name(self, name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")

    def load_expert_weight(self, params: dict[str, nn.Parameter], name: str, weight: torch.Tensor) -> bool:
        if _QUANTIZED_ROUTER.match(name):
            raise ValueError(f"checkpoint tensor {name!r} belongs to a quantized router: MoE routers are kept in "
                             "float (the folder's ignore / modules_to_not_convert list should name it)")
        match = _QUANTIZED_EXPERT.match(name)
        if match is not None and (match.group(4) != "weight" or f"{match.group(1)}.w13_weight" not in params):
            return self._load_quantized_expert(params, name, weight, match)
        for pattern, kind in _EXPERT_PATTERNS:
            match = pattern.match(name)
            if match is None:
                continue
            groups = match.groups()
            expert = int(groups[1]) if len(groups) > 1 else None
            target = f"{groups[0]}.{'w2_weight' if kind == 'down' else 'w13_weight'}"
            param = params[target]
            param.weight_loader(param, weight, (expert, kind))
            self.loaded_param_names.add(target)
            return True
        return False

    def _load_quantized_expert(self, params: dict[str, nn.Parameter], name: str, weight: torch.Tensor,
                               match: re.Match[str]) -> bool:
        prefix, expert, proj, tensor = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        proj = _PROJ.get(proj, proj)
        experts = self.get_submodule(prefix)
        method = experts.quant_method
        if not isinstance(method, CheckpointExperts):
            raise ValueError(f"checkpoint tensor {name!r} is a quantized expert tensor, but {prefix} holds float "
                             "experts (the folder's ignore list keeps them float, or it is not quantized)")
        target = method.param_name(proj, tensor)
        if target is None:
            raise ValueError(f"checkpoint tensor {name!r} is not part of the {method.layout.name} layout "
                             f"(expected {sorted(method.specs[proj])})")
        method.checkpoint_proj[proj] = match.group(3)
        if not 0 <= expert < experts.num_experts:
            raise ValueError(f"checkpoint tensor {name!r}: expert {expert} is out of range "
                             f"(the model has {experts.num_experts})")
        try:
            experts.weight_loader(params[f"{prefix}.{target}"], weight, (expert, proj, tensor))
        except (ValueError, IndexError) as exc:  # a shape that does not fit this layout / rank
            raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc
        self.loaded_param_names.add(f"{prefix}.{target}")
        return True


class MixtralForCausalLM(MoEForCausalLM):
    @classmethod
    def options_for(cls, config: Any) -> LlamaOptions:
        return LlamaOptions()

    @classmethod
    def mlp_factory(cls, config: Any, dtype: torch.dtype | None) -> MLPFactory:
        return lambda _: SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                                        config.intermediate_size, renormalize=True, dtype=dtype)


def _qwen_moe_factory(config: Any, dtype: torch.dtype | None, shared_intermediate_size: int) -> MLPFactory:
    """Sparse layers every `decoder_sparse_step` layers except `mlp_only_layers`; the rest dense."""
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    mlp_only = set(getattr(config, "mlp_only_layers", None) or ())
    step = getattr(config, "decoder_sparse_step", 1) or 1

    def make(layer: int) -> nn.Module:
        if layer not in mlp_only and num_experts > 0 and (layer + 1) % step == 0:
            return SparseMoeBlock(config.hidden_size, num_experts, config.num_experts_per_tok,
                                  config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                                  dtype=dtype, shared_intermediate_size=shared_intermediate_size)
        return LlamaMLP(config.hidden_size, config.intermediate_size, dtype)

    return make


class Qwen2MoeForCausalLM(MoEForCausalLM):
    """Qwen1.5-MoE / Qwen2-MoE: routed experts plus a sigmoid-gated shared expert per sparse layer."""

    @classmethod
    def options_for(cls, config: Any) -> LlamaOptions:
        return LlamaOptions(qkv_bias=bool(getattr(config, "qkv_bias", True)), o_bias=False)

    @classmethod
    def mlp_factory(cls, config: Any, dtype: torch.dtype | None) -> MLPFactory:
        return _qwen_moe_factory(config, dtype, int(getattr(config, "shared_expert_intermediate_size", 0) or 0))


class Qwen3MoeForCausalLM(MoEForCausalLM):
    @classmethod
    def options_for(cls, config: Any) -> LlamaOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)

    @classmethod
    def mlp_factory(cls, config: Any, dtype: torch.dtype | None) -> MLPFactory:
        return _qwen_moe_factory(config, dtype, shared_intermediate_size=0)
