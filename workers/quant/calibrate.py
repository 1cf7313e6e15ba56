"""Quantizes a float Hugging Face causal LM layer by layer on calibration tokens (RTN, GPTQ, AWQ).

Data flow: the calibration tokens [num_seqs, seq_len] run through the embeddings up to the first
decoder layer, where a pre-hook keeps its input and keyword arguments (rotary embeddings, mask) and
stops the forward. Then, per decoder layer (one tqdm step): its linears are quantized from the
inputs it receives from the layers before — for GPTQ / RTN those layers *already quantized*, so
later layers correct earlier error; for AWQ their float outputs, as AutoAWQ — each quantized weight
is packed, unpacked and written back as its dequantized float (the perplexity check measures
exactly what the folder holds); the layer then runs again to give the next layer's input.
  - rtn: group grids (algorithms/rtn.py), with `clip` searched on the output error (clip.py);
  - gptq: sub-steps q/k/v, o, gate/up, down ("true sequential"), one Hessian per sub-step (its
    linears read one input) from a forward stopped at that input; with `gptaq`, a float copy of
    the layer on the float model's stream gives the asymmetric term (algorithms/gptq.py);
  - awq: the scale search of algorithms/awq.py per LLAMA_GROUPS group on the first
    AWQ_SEARCH_TOKENS tokens, folding, then the output-error clip on the scaled inputs of every
    token (AutoAWQ's auto_clip), then RTN of the scaled weights.
MoE layers (transformers' fused `mlp.experts.gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`): rtn only,
each expert's gate / up / down rounded min-max and written per expert (`mlp.experts.7.down_proj.qweight`).
transformers' own model classes are run (AutoModelForCausalLM, forward hooks): a well-kept
implementation of every Llama-style family, not a second copy of ours.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from shardserve.workers.quant.algorithms.awq import (
    LLAMA_GROUPS,
    activation_scale,
    fold_into_linear,
    fold_into_norm,
    quantize_scaled,
    scale_inputs,
    search_scales,
)
from shardserve.workers.quant.algorithms.clip import OUTPUT_MSE, WEIGHT_MSE, clipped_grouped
from shardserve.workers.quant.algorithms.gains import channel_gains
from shardserve.workers.quant.algorithms.gptq import CLIP_ERRORS, Hessian, gptq_quantize, one_thread
from shardserve.workers.quant.algorithms.refit import refit_scales
from shardserve.workers.quant.algorithms.rtn import rtn_grouped
from shardserve.workers.quant.formats.awq import AwqLayout
from shardserve.workers.quant.formats.gptq import GptqLayout
from shardserve.workers.quant.weights import GroupedWeight
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

METHODS = ("rtn", "gptq", "awq")
GROUP_SIZES = (-1, 32, 64, 128)
# The linears of a Llama-style decoder layer that are quantized, in GPTQ's sequential sub-steps.
GPTQ_STEPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEARS = tuple(name for step in GPTQ_STEPS for name in step)
# AWQ clips every linear but q / k on its output error, as AutoAWQ's auto_clip: their outputs only
# matter through softmax(q k^T), which the output error of each alone does not measure.
AWQ_UNCLIPPED = ("self_attn.q_proj", "self_attn.k_proj")
# AWQ's scale search runs each group's module 20 times: on the first sequences up to this many tokens
# (its time grows with them); the clipping search's Hessians take every calibration token.
AWQ_SEARCH_TOKENS = 2048
ROUNDINGS = ("rtn", "gptq")
# GPTQ steps whose input gains (algorithms/gains.py) fold for free: into the norm before, or up_proj's rows.
GAIN_TARGETS = {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
                "mlp.down_proj": "mlp.up_proj"}


@dataclass(frozen=True)
class QuantSpec:
    """What `shardserve quantize` was asked for; invalid combinations are refused here.

    clip: each group's range searched (algorithms/clip.py) instead of min-max — on the output error
    over the calibration inputs (RTN, AWQ; GPTQ with clip_error "output", the default; "weight" /
    "energy" measured worse); static_groups (GPTQ): grids fixed before the error feedback, so
    act-order needs no g_idx; damp (GPTQ): the fraction of mean(diag H) added to H's diagonal, in (0, 1);
    gptaq (GPTQ): the Hessian from the quantized model's inputs, the target from the float model's
    (asymmetric calibration, algorithms/gptq.py), its term scaled by gptaq_alpha (GPTQModel: 0.25; 0.5 measured better here);
    awq_scales (GPTQ): AWQ's scale search folded in before GPTQ; rounding (AWQ): "rtn" (AutoAWQ, the
    default "") or "gptq" (GPTQ on the scaled weights); refit: each group's scale re-solved by least
    squares once its codes are fixed (algorithms/refit.py); gains (GPTQ rounding): per-input-channel
    gains folded into the norms and up_proj's scales (algorithms/gains.py)."""

    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    clip: bool = True
    static_groups: bool = False
    damp: float = 0.01
    awq_duo: bool = False
    clip_error: str = "output"
    gptaq: bool = False
    gptaq_alpha: float = 0.5
    awq_scales: bool = False
    rounding: str = ""
    refit: bool = False
    gains: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        allowed_bits = (4,) if self.method == "awq" else (4, 8)
        if self.bits not in allowed_bits:
            raise ValueError(f"bits must be one of {allowed_bits} for {self.method}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.desc_act and not self.gptq_rounding:
            raise ValueError(f"desc_act (act-order) is a GPTQ option; method is {self.method}")
        if self.static_groups and not self.gptq_rounding:
            raise ValueError(f"static_groups is a GPTQ option; method is {self.method}")
        if self.rounding not in ("", *ROUNDINGS):
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rounding and self.method != "awq":
            raise ValueError(f"rounding is an AWQ option (rtn or gptq); method is {self.method}")
        if self.gptaq and not self.gptq_rounding:
            raise ValueError(f"gptaq (asymmetric calibration) is a GPTQ option; method is {self.method}")
        if self.gains and not self.gptq_rounding:
            raise ValueError(f"gains (input-channel gains) follow GPTQ rounding; method is {self.method}")
        if self.refit and not (self.clip or self.gptq_rounding):
            raise ValueError("refit needs the clipping search's Hessians with RTN rounding: drop --no-clip")
        if self.awq_scales and self.method != "gptq":
            raise ValueError(f"awq_scales (AWQ's scale search before GPTQ) is a GPTQ option; method is {self.method}")
        if self.method == "awq" and self.uses_g_idx:
            raise ValueError("the AWQ layout has no g_idx: act-order with AWQ needs static_groups")
        if self.clip_error not in CLIP_ERRORS:
            raise ValueError(f"clip_error must be one of {CLIP_ERRORS}, got {self.clip_error!r}")
        if not 0 < self.gptaq_alpha <= 1:
            raise ValueError(f"gptaq_alpha must be in (0, 1], got {self.gptaq_alpha}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")

    @property
    def gptq_rounding(self) -> bool:
        """Codes chosen by GPTQ's error feedback: method gptq, or awq with rounding 'gptq'."""
        return self.method == "gptq" or (self.method == "awq" and self.rounding == "gptq")

    @property
    def awq_scaling(self) -> bool:
        """AWQ's per-input scales searched and folded before the codes are chosen."""
        return self.method == "awq" or self.awq_scales

    @property
    def float_inputs(self) -> bool:
        """AWQ with RTN calibrates each layer on the float outputs of the layer before (AutoAWQ;
        measured a little better here), GPTQ and RTN on its quantized outputs (GPTQ's sequential scheme)."""
        return self.method == "awq" and not self.gptq_rounding

    @property
    def uses_g_idx(self) -> bool:
        """Act-order columns with their own groups: static groups keep g_idx = k // g."""
        return self.desc_act and not self.static_groups

    @property
    def layout(self) -> GptqLayout | AwqLayout:
        """The checkpoint layout written: AWQ GEMM for awq, GPTQ v1 for gptq and rtn."""
        if self.method == "awq":
            return AwqLayout(self.bits, self.group_size)
        return GptqLayout(self.bits, self.group_size, self.uses_g_idx)

    @property
    def format(self) -> str:
        return "awq" if self.method == "awq" else "gptq"


@dataclass
class QuantizedModel:
    """packed: linear name (e.g. model.layers.0.self_attn.q_proj) -> its checkpoint tensors;
    weights: the same linears unpacked again from those tensors; awq_alphas: layer.group -> alpha."""

    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    weights: dict[str, GroupedWeight] = field(default_factory=dict)
    awq_alphas: dict[str, float] = field(default_factory=dict)


class _Stop(Exception):
    """Raised by the first layer's pre-hook once it has its input."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """model.model.layers of a Llama-style model; an error naming what is missing otherwise."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__} has no model.layers: quantize supports Llama-style models")
    for layer in layers:
        names = {name for name, _ in layer.named_modules()}
        missing = [name for name in layer_linears(layer) if name not in names]
        if missing:
            raise ValueError(f"decoder layer {type(layer).__name__} has no {missing}: quantize supports "
                             f"Llama-style layers with {LINEARS} (or MoE experts in mlp.experts)")
    return layers



def experts_of(layer: nn.Module) -> nn.Module | None:
    """The layer's fused MoE experts (transformers' gate_up_proj [E, 2I, H], down_proj [E, H, I]), or None."""
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    if experts is None or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        return None
    return experts


def layer_linears(layer: nn.Module) -> tuple[str, ...]:
    """The quantized nn.Linear names of a decoder layer: all of LINEARS, or attention only in a MoE layer."""
    return LINEARS if experts_of(layer) is None else tuple(n for n in LINEARS if not n.startswith("mlp."))


def check_moe_method(layers: nn.ModuleList, spec: QuantSpec) -> None:
    """Experts are rounded by RTN only (GPTQ / AWQ would need each expert's routed inputs)."""
    if spec.method != "rtn" and any(experts_of(layer) is not None for layer in layers):
        raise ValueError(f"--method {spec.method} does not quantize MoE experts yet: use --method rtn for a "
                         "mixture-of-experts model")


def quantize_model(model: nn.Module, calib_ids: torch.Tensor, spec: QuantSpec,
                   progress: bool = True) -> QuantizedModel:
    """Quantizes `model` (float, CPU, eval) in place — its linears end as dequantized copies of the
    packed weights, AWQ's norms as folded — and returns the packed tensors. calib_ids: [B, T]."""
    layers = decoder_layers(model)
    check_whole_groups(layers, spec)
    check_moe_method(layers, spec)
    result = QuantizedModel()
    with torch.no_grad(), one_thread():  # measured 5-10x faster than 2 threads on a shared 2-core CPU
        hidden, kwargs = _first_layer_input(model, layers, calib_ids)
        float_hidden = hidden  # the float model's stream (GPTAQ's targets)
        for index, layer in enumerate(tqdm(layers, desc=f"{spec.method} int{spec.bits}", unit="layer",
                                           disable=not progress)):
            prefix = f"model.layers.{index}."
            float_out = layer(hidden, **kwargs) if spec.float_inputs else None
            if spec.awq_scaling:  # exact in float: the layer computes what it did before
                _awq_scale_layer(layer, float_hidden if spec.gptaq else hidden, kwargs, spec, prefix, result)
            if spec.gptq_rounding and spec.gptaq:
                float_layer = copy.deepcopy(layer)
                _gptq_layer(layer, hidden, kwargs, spec, prefix, result, float_layer, float_hidden)
                float_hidden = float_layer(float_hidden, **kwargs)
            elif spec.gptq_rounding:
                _gptq_layer(layer, hidden, kwargs, spec, prefix, result)
            elif spec.method == "awq":
                _awq_layer(layer, hidden, kwargs, spec, prefix, result)
            else:
                _rtn_layer(layer, hidden, kwargs, spec, prefix, result)
                _rtn_experts(layer, spec, prefix, result)
            hidden = float_out if float_out is not None else layer(hidden, **kwargs)
    return result


def check_whole_groups(layers: nn.ModuleList, spec: QuantSpec) -> None:
    """AWQ's layout has no g_idx: every quantized linear must split into whole groups (AutoAWQ and vLLM
    refuse the rest, and so does our loader), so a group that does not divide K is refused before any work."""
    if spec.method != "awq" or spec.group_size <= 0:
        return
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and module.in_features % spec.group_size:
                raise ValueError(
                    f"awq group_size {spec.group_size} does not divide model.layers.{index}.{name}'s "
                    f"{module.in_features} input features: an AWQ checkpoint needs whole groups; use a group size "
                    f"that divides {module.in_features} or --method gptq")


def _first_layer_input(model: nn.Module, layers: nn.ModuleList,
                       ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def _commit(layer: nn.Module, name: str, weight: GroupedWeight, spec: QuantSpec, prefix: str,
            result: QuantizedModel) -> None:
    """Packs `weight`, unpacks it again, and writes that back into the module as float."""
    layout = spec.layout
    packed = layout.pack(weight)
    written = layout.unpack(packed)
    assert isinstance(written, GroupedWeight)
    linear = layer.get_submodule(name)
    linear.weight.data = written.dequantize(linear.weight.dtype)
    result.packed[prefix + name] = packed
    result.weights[prefix + name] = written


def _inputs_of(layer: nn.Module, names: tuple[str, ...], hidden: torch.Tensor, kwargs: dict[str, Any],
               on_input: Callable[[str, tuple, dict], None], stop_after: str | None = None) -> None:
    """Runs the layer once, calling on_input(name, args, kwargs) with each named submodule's input;
    the forward stops once `stop_after` has had its input (the rest of the layer is not needed)."""

    def hook(name: str, args: tuple, kw: dict) -> None:
        on_input(name, args, kw)
        if name == stop_after:
            raise _Stop

    handles = [layer.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, kw, name=name: hook(name, args, kw), with_kwargs=True) for name in names]
    try:
        layer(hidden, **kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _input_of(layer: nn.Module, name: str, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The input layer.<name> receives when the layer runs on hidden (the forward stops there)."""
    seen: list[torch.Tensor] = []
    _inputs_of(layer, (name,), hidden, kwargs, lambda _n, args, _kw: seen.append(args[0]), stop_after=name)
    return seen[0]


def _rtn_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], spec: QuantSpec,
               prefix: str, result: QuantizedModel) -> None:
    """Round to nearest; with clip, each group's range searched on its output error over this
    layer's calibration inputs (the clip of AWQ without its scaling)."""
    linears = layer_linears(layer)
    hessians = {name: Hessian(layer.get_submodule(name).in_features) for name in linears}
    if spec.clip:
        _inputs_of(layer, linears, hidden, kwargs, lambda name, args, _kw: hessians[name].add(args[0]))
    for name in linears:
        w = layer.get_submodule(name).weight.float()
        weight = (clipped_grouped(w, spec.group_size, spec.bits, spec.sym, OUTPUT_MSE, hessians[name].matrix)
                  if spec.clip else rtn_grouped(w, spec.group_size, spec.bits, spec.sym))
        if spec.refit and spec.clip:
            weight = refit_scales(weight, w, hessians[name].matrix)
        _commit(layer, name, weight, spec, prefix, result)


def _rtn_experts(layer: nn.Module, spec: QuantSpec, prefix: str, result: QuantizedModel) -> None:
    """Each expert's gate / up / down rounded min-max, packed per expert, written back dequantized."""
    experts = experts_of(layer)
    if experts is None:
        return
    layout = spec.layout
    inter = experts.down_proj.shape[2]
    for e in range(experts.gate_up_proj.shape[0]):
        parts = {"gate_proj": experts.gate_up_proj.data[e, :inter], "up_proj": experts.gate_up_proj.data[e, inter:],
                 "down_proj": experts.down_proj.data[e]}
        for proj, w in parts.items():
            packed = layout.pack(rtn_grouped(w.float(), spec.group_size, spec.bits, spec.sym))
            written = layout.unpack(packed)
            assert isinstance(written, GroupedWeight)
            w.copy_(written.dequantize(w.dtype))
            result.packed[f"{prefix}mlp.experts.{e}.{proj}"] = packed
            result.weights[f"{prefix}mlp.experts.{e}.{proj}"] = written


def _gptq_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], spec: QuantSpec,
                prefix: str, result: QuantizedModel, float_layer: nn.Module | None = None,
                float_hidden: torch.Tensor | None = None) -> None:
    """float_layer / float_hidden (GPTAQ): this layer unquantized and its input in the float model."""
    for step in GPTQ_STEPS:  # the linears of a step read one input: one Hessian, from the step's first
        hessian = Hessian(layer.get_submodule(step[0]).in_features, asymmetric=float_layer is not None)
        x_float = None if float_layer is None else _input_of(float_layer, step[0], float_hidden, kwargs)
        hessian.add(_input_of(layer, step[0], hidden, kwargs), x_float)
        cross = None if hessian.dxxt is None else hessian.matrix + spec.gptaq_alpha * hessian.dxxt
        floats = [layer.get_submodule(name).weight.detach().float().clone() for name in step]
        for name in step:
            weight = gptq_quantize(layer.get_submodule(name).weight, hessian.matrix, spec.bits,
                                   spec.group_size, spec.sym, spec.desc_act,
                                   percdamp=spec.damp, clip=WEIGHT_MSE if spec.clip else None,
                                   static_groups=spec.static_groups, clip_error=spec.clip_error,
                                   dxxt=hessian.dxxt, dxxt_alpha=spec.gptaq_alpha)
            if spec.refit:
                weight = refit_scales(weight, layer.get_submodule(name).weight, hessian.matrix, cross)
            _commit(layer, name, weight, spec, prefix, result)
        if spec.gains and step[0] in GAIN_TARGETS:
            quantized = torch.cat([layer.get_submodule(name).weight.float() for name in step])
            gains = channel_gains(quantized, torch.cat(floats), hessian.matrix, cross)
            _fold_gains(layer, GAIN_TARGETS[step[0]], gains, spec, prefix, result)


def _fold_gains(layer: nn.Module, target: str, gains: torch.Tensor, spec: QuantSpec, prefix: str,
                result: QuantizedModel) -> None:
    """Multiplies the input of a quantized step by gains [K]: into the RMSNorm weight that makes it,
    or into the output rows (scales and mins) of the quantized linear that makes it."""
    module = layer.get_submodule(target)
    if not isinstance(module, nn.Linear):
        module.weight.data = module.weight.data * gains.to(module.weight.dtype)
        return
    old = result.weights[prefix + target]
    scales = (old.scales * gains[:, None]).half().float().clamp(min=2**-24)
    zeros = torch.round(-old.mins / old.scales)
    _commit(layer, target, GroupedWeight(q=old.q, scales=scales, mins=-zeros * scales, group_size=old.group_size,
                                         perm=old.perm, bits=old.bits), spec, prefix, result)


def _awq_scale_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], spec: QuantSpec,
                     prefix: str, result: QuantizedModel) -> None:
    """AWQ's scale search per LLAMA_GROUPS group on the first AWQ_SEARCH_TOKENS tokens, folded in."""
    seen: dict[str, tuple[tuple, dict]] = {}
    watched = tuple(dict.fromkeys(LINEARS + tuple(g.inspect for g in LLAMA_GROUPS)))
    searched = hidden[:max(1, AWQ_SEARCH_TOKENS // hidden.shape[1])]  # [seqs, T, D]: the search's share
    _inputs_of(layer, watched, searched, kwargs, lambda name, args, kw: seen.setdefault(name, (args, kw)))
    for group in LLAMA_GROUPS:
        prev = layer.get_submodule(group.prev)
        linears = [layer.get_submodule(name) for name in group.linears]
        if isinstance(prev, nn.Linear) and prev.out_features != linears[0].in_features:
            continue  # e.g. v -> o under grouped-query attention: v's outputs are not o's inputs
        scales = search_scales(activation_scale(seen[group.linears[0]][0][0]), [m.weight for m in linears],
                               _inspector(layer, group.inspect, group.linears, seen[group.inspect]),
                               spec.group_size, spec.bits, spec.sym, duo=spec.awq_duo)
        result.awq_alphas[f"{prefix}{group.prev}"] = scales.alpha
        apply_awq_scales(prev, linears, scales.scales)


def _awq_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], spec: QuantSpec,
               prefix: str, result: QuantizedModel) -> None:
    """AWQ's rounding once its scales are folded: output-error clip (not q / k), then RTN."""
    hessians = {name: Hessian(layer.get_submodule(name).in_features) for name in LINEARS}
    if spec.clip:  # the inputs as the linears see them now, divided by the folded scales
        _inputs_of(layer, LINEARS, hidden, kwargs, lambda name, args, _kw: hessians[name].add(args[0]))
    for name in LINEARS:
        weight = layer.get_submodule(name).weight.float()
        if spec.clip and name not in AWQ_UNCLIPPED:
            quantized = clipped_grouped(weight, spec.group_size, spec.bits, spec.sym, OUTPUT_MSE,
                                        hessians[name].matrix)
        else:
            quantized = quantize_scaled(weight, spec.group_size, spec.bits, spec.sym)
        if spec.refit and spec.clip and name not in AWQ_UNCLIPPED:
            quantized = refit_scales(quantized, weight, hessians[name].matrix)
        _commit(layer, name, quantized, spec, prefix, result)


def apply_awq_scales(prev: nn.Module, linears: list[nn.Module], scales: torch.Tensor) -> None:
    """Folds 1/s into `prev` (an RMSNorm or a Linear) and s into the input columns of `linears`."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.data = fold_into_linear(prev.weight.data, scales)
            if prev.bias is not None:
                prev.bias.data = fold_into_linear(prev.bias.data[:, None], scales)[:, 0]
        else:
            prev.weight.data = fold_into_norm(prev.weight.data, scales)
            if getattr(prev, "bias", None) is not None:
                prev.bias.data = fold_into_norm(prev.bias.data, scales)
        for linear in linears:
            linear.weight.data = scale_inputs(linear.weight.data, scales)


def _inspector(layer: nn.Module, inspect: str, linears: tuple[str, ...],
               inputs: tuple[tuple, dict]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """ws -> output of layer.<inspect> on its recorded input with the group's weights replaced."""
    module = layer.get_submodule(inspect)
    relative = [name[len(inspect) + 1:] + ".weight" if name != inspect else "weight" for name in linears]
    args, kwargs = inputs

    def run(weights: list[torch.Tensor]) -> torch.Tensor:
        out = functional_call(module, dict(zip(relative, weights, strict=True)), args, kwargs)
        return out[0] if isinstance(out, tuple) else out

    return run
