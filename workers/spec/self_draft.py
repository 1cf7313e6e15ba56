"""Self-speculation: the draft is the target's own model, cut to its first L decoder layers.

`truncate_layers(loaded, L)` keeps the first L layers of a draft model object (the final norm and
LM head stay). When the draft would load exactly the target's weights and the target's model
lives in this process (TP 1), `shares_target_weights` says so and `shared_view(target_model)`
gives the draft a model object over the target's own modules instead of a second copy: the
decoder layers, the embedding, the final norm and the LM head (with their tensors, packed
quantized weights and the packed CPU LM head) are the target's objects; only the two containers
(the CausalLM and its decoder stack) are new, so truncating the view's layer list leaves the
target's intact. Sharing is safe because a layer holds no per-engine state: KV caches and
attention metadata come in with each forward, so the draft's engine runs the same layers over its
own KV pool. (What the target's runner sets on shared layers, e.g. `cpu_activations` resolved to
int8, applies to the draft's forwards too: it changes drafts, never the verified output; the draft's
own config follows the target's resolved value, draft.py, so a float target's layers stay float.) Under TP > 1
the target's weights are shards in the rank processes while the draft runs whole in the driver
(draft.py): no tensor to share there, so the draft loads its own copy.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from shardserve.workers.config import ModelConfig
from shardserve.workers.models.llama import UNBUILT
from shardserve.workers.models.loader import DUMMY_PREFIX, LoadedModel, default_model_path
from torch import nn


def shares_target_weights(draft: ModelConfig, target: ModelConfig, target_loaded: LoadedModel) -> bool:
    """The draft's ModelConfig loads what the target's did (the same source, quantization, group
    size and GGUF cache; draft.py gives it the target's dtype and device) and the target's model
    is in this process, with the decoder layout `shared_view` and `truncate_layers` know."""
    if target_loaded.model is None or not _has_layer_list(target_loaded.model):
        return False
    same = (draft.quantization, draft.quantization_group_size, draft.gguf_cache_dir, draft.seed) == \
        (target.quantization, target.quantization_group_size, target.gguf_cache_dir, target.seed)
    return same and _source(draft.model) == _source(target.model)


def shared_view(model: nn.Module) -> nn.Module:
    """A CausalLM object whose every submodule but its decoder stack is `model`'s own, and whose
    decoder stack is a new container of `model`'s layers (so `truncate_layers` may cut it)."""
    view = _container_copy(model)
    view.model = _container_copy(model.model)
    view.model.cpu_stack = UNBUILT  # its own C++ decode stack over its layers (references, no copy)
    return view


def truncate_layers(loaded: LoadedModel, num_layers: int) -> LoadedModel:
    """Keep the first `num_layers` decoder layers (the final norm and LM head stay): the model's
    forward runs `model.layers[start:end]` and its KV spec sizes one cache tensor per layer."""
    model = loaded.model
    if not _has_layer_list(model):
        raise ValueError(f"draft_num_layers: the layers of {type(model).__name__} cannot be truncated")
    inner = model.model
    if num_layers == len(inner.layers):
        return loaded
    inner.layers = nn.ModuleList(list(inner.layers)[:num_layers])
    inner.end_layer = min(inner.end_layer, num_layers)
    model.kv_cache_spec = replace(model.kv_cache_spec, num_layers=num_layers)
    hf_config = copy.deepcopy(loaded.hf_config)
    hf_config.num_hidden_layers = num_layers
    model.config = hf_config
    return replace(loaded, hf_config=hf_config, name=f"{loaded.name}[:{num_layers} layers]")


def parameter_bytes(model: nn.Module, exclude: nn.Module | None = None) -> int:
    """Bytes of `model`'s parameters and buffers, less those whose storage `exclude` holds too."""
    taken = set() if exclude is None else {t.untyped_storage().data_ptr() for t in _tensors(exclude)}
    return sum(t.untyped_storage().nbytes() for t in _unique_storages(model)
               if t.untyped_storage().data_ptr() not in taken)


def _tensors(model: nn.Module) -> list:
    return [*model.parameters(), *model.buffers()]


def _unique_storages(model: nn.Module) -> list:
    seen, tensors = set(), []
    for tensor in _tensors(model):
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            tensors.append(tensor)
    return tensors


def _has_layer_list(model: nn.Module | None) -> bool:
    inner = getattr(model, "model", None)
    return isinstance(getattr(inner, "layers", None), nn.ModuleList) and hasattr(model, "kv_cache_spec")


def _container_copy(module: nn.Module) -> nn.Module:
    """A shallow copy with its own registries: reassigning a submodule of the copy leaves `module`'s."""
    clone = copy.copy(module)
    for registry in ("_parameters", "_buffers", "_modules"):
        clone.__dict__[registry] = copy.copy(module.__dict__[registry])
    return clone


def _source(spec: str) -> str:
    """A model spec as one comparable string: `default` and paths resolved, `dummy:` shapes as given."""
    if spec.startswith(DUMMY_PREFIX):
        return spec
    path = default_model_path() if spec == "default" else Path(spec).expanduser()
    return str(path.resolve())
