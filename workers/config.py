"""Engine configuration: frozen dataclasses, the one source of every engine setting.

Each field carries its documentation and range in `field(metadata=...)` (`description`, and
`ge`/`gt`/`le`/`lt` bounds, `min_length`, `pattern`); `check_fields` enforces those and Literal
choices in every `__post_init__`, next to the cross-field rules, so each rule lives here once.
The edges are generated from these classes: the YAML and Helm schemas (cluster/config_fields.py
builds the pydantic sections of cluster/config.py from `dataclasses.fields()`), the `generate`
flags (cluster/commands/engine_flags.py) and `LLM(**kwargs)` (workers/llm.py); SHARDSERVE_*
overrides are applied in workers/env_overrides.py. The engine, scheduler, KV cache and runner
only ever read them.
"""

from __future__ import annotations

import functools
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from shardserve.parallel.options import DEFAULT_KERNEL_OPTIONS as _K
from shardserve.parallel.options import FusedProtocol, KernelOptions

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
DTYPES = typing.get_args(Dtype)
MAX_TIMEOUT_S = 86400.0  # upper bound of ParallelConfig.collective_timeout_s and step_timeout_s (one day)
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
RULES = (*BOUNDS, "min_length", "pattern")  # metadata keys that are also pydantic Field arguments


def setting(default: Any, description: str, **rules: Any) -> Any:
    """A dataclass field with its description and rules (ge/gt/le/lt, min_length, pattern, unit) as metadata."""
    unknown = set(rules) - {*RULES, "unit"}  # unit: for messages only, e.g. "seconds"
    if unknown:
        raise TypeError(f"unknown rules {unknown}")
    return field(default=default, metadata={"description": description, **rules})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any) -> None:
    """Raise ValueError naming the field for a value outside its Literal choices or bounds."""
    hints = _hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        choices = [a for arg in (hints[f.name], *typing.get_args(hints[f.name]))
                   if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        if choices and value not in choices:
            null = "null or " if type(None) in typing.get_args(hints[f.name]) else ""
            raise ValueError(f"{f.name} must be {null}one of {', '.join(map(str, choices))}, got {value!r}")
        min_length, pattern = f.metadata.get("min_length", 0), f.metadata.get("pattern", "")
        if (min_length or pattern) and (not isinstance(value, str) or len(value) < min_length
                                        or not re.search(pattern, value)):
            rule = f"match {pattern}" if pattern else f"be a string of at least {min_length} character(s)"
            raise ValueError(f"{f.name} must {rule}, got {value!r}")
        bounds = {key: f.metadata[key] for key in BOUNDS if key in f.metadata}
        if not bounds:
            continue
        integer = hints[f.name] in (int, int | None)
        number = not isinstance(value, bool) and isinstance(value, int if integer else int | float)
        if not number or not all({"ge": value >= limit, "gt": value > limit, "le": value <= limit,
                                  "lt": value < limit}[key] for key, limit in bounds.items()):
            kind = "an integer " if integer and (not number or len(bounds) > 1) else "" if number else "a number "
            unit = f" {f.metadata['unit']}" if "unit" in f.metadata else ""
            raise ValueError(f"{f.name} must be {kind}{_range_text(bounds)}{unit}, got {value!r}")


def _range_text(bounds: dict[str, float]) -> str:
    """`>= 1`, or `in [2, 4]` / `in (0, 1]` with both ends."""
    low = [(k, v) for k, v in bounds.items() if k in ("ge", "gt")]
    high = [(k, v) for k, v in bounds.items() if k in ("le", "lt")]
    if low and high:
        (lk, lv), (hk, hv) = low[0], high[0]
        return f"in {'[' if lk == 'ge' else '('}{lv:g}, {hv:g}{']' if hk == 'le' else ')'}"
    key, limit = next(iter(bounds.items()))
    return f"{BOUNDS[key]} {limit:g}"


# ModelConfig.quantization: methods applied at load, then checkpoint formats (workers/quant/formats/).
Quantization = Literal["int8", "int4", "fp8", "gptq", "awq", "compressed-tensors", "gguf"]
QUANTIZATION_METHODS = typing.get_args(Quantization)
QuantizationGroupSize = Literal[32, 64, 128, -1]
QUANTIZATION_GROUP_SIZES = typing.get_args(QuantizationGroupSize)
CpuActivations = Literal["auto", "float", "int8"]
CPU_ACTIVATIONS = typing.get_args(CpuActivations)
ResolvedCpuActivations = Literal["float", "int8"]  # what `auto` becomes once the model is loaded (runner)


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to serve and how."""

    model: str = setting(
        "default", "Weights: `default` (the embedded SmolLM2), a Hugging Face folder, a .gguf file or "
        "`dummy:<shape>` (seeded random weights of a named real shape, workers/models/dummy.py).", min_length=1)
    dtype: Dtype = setting("auto", "Compute dtype; `auto` is bfloat16 on GPU and float32 on CPU.")
    device: str = setting("auto", "`auto` (cuda when available), `cpu`, `cuda` or `cuda:N`.",
                          pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    max_model_len: int | None = setting(None, "Context length cap; null = the model's own max_position_embeddings.",
                                        ge=1)
    seed: int = setting(0, "Seed of dummy weights and of unseeded sampling, >= 0.", ge=0)
    quantization: Quantization | None = setting(
        None, "Weight quantization (workers/quant/). null: as the checkpoint is (a GPTQ, AWQ or compressed-tensors "
        "folder is detected from its config.json). int8 | int4 | fp8: quantize a float checkpoint at load (or name "
        "the folder's own format; MoE experts included); gptq | awq | compressed-tensors | gguf: require that format (a GGUF file with "
        "Q4_0 / Q4_1 / Q8_0 projections is then read packed; with null a GGUF file is dequantized at load; a MoE "
        "model takes int8 | int4 | fp8 only). A value that contradicts the folder is an error naming both.")
    quantization_group_size: QuantizationGroupSize = setting(
        128, "Inputs per scale for `int4` at load: 32, 64, 128 or -1 (one scale per output row).")
    cpu_activations: CpuActivations = setting(
        "auto", "On CPU, how the matmuls of weights kept quantized (the 4/8-bit kernels of "
        "workers/quant/cpu_kernels, and the GGUF's Q8_0 LM head) meet the activations: auto | float | int8. "
        "`float`: exact up to summation order. `int8`: activations rounded to int8 per 32 inputs, llama.cpp's way "
        "(~1.4x faster matmuls, different rounding: perplexity +0.22 % on SmolLM2 Q4_1, benchmarks/README.md); "
        "on a GPU, or on a model with no layer on those kernels, it is an error. `auto` (default): `int8` where "
        "the engine runs on CPU and at least one decoder linear layer runs on those kernels (e.g. quantization: "
        "gguf, int4 or int8), else `float` (GPU engines, float weights: a float model's lossless Q8_0 LM head "
        "stays float); never an error. The engine logs the resolved value at start-up and reports it in its "
        "stats (`cpu_activations`, /v1/stats).")
    gguf_cache_dir: str | None = setting(
        None, "Folder of the converted copies of GGUF files (the first load writes one, later loads read it); "
        "null = $SHARDSERVE_CACHE_DIR, else ~/.cache/shardserve.")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache."""

    block_size: int = setting(16, "Tokens per paged-KV block, >= 1.", ge=1)
    gpu_memory_utilization: float = setting(
        0.9, "On GPU, the fraction of total memory the engine may use (weights + activations + KV), in (0, 1]; "
        "the KV pool gets what is left after a profiling step.", gt=0, le=1)
    cpu_kv_cache_bytes: int = setting(1 << 30, "On CPU, the KV pool's size in bytes, >= 1.", ge=1)
    num_blocks: int | None = setting(
        None, "An explicit KV pool size in blocks that overrides both budgets, >= 1; null = from the budget.", ge=1)
    enable_prefix_caching: bool = setting(
        True, "Reuse full KV blocks of prompt prefixes seen before (chained token hashes).")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits and policy."""

    max_num_seqs: int = setting(256, "Requests in one engine step at most, >= 1.", ge=1)
    max_num_batched_tokens: int = setting(
        2048, "Tokens (prefill chunks + decodes) in one engine step at most, >= 1.", ge=1)
    enable_chunked_prefill: bool = setting(
        True, "Split long prompts over steps, mixed with decodes; off: a prompt is prefilled whole in one step "
        "(it must fit max_num_batched_tokens).")
    policy: Literal["fcfs", "priority"] = setting(
        "fcfs", "Queue order: `fcfs`, or `priority` (lower request priority first, then arrival).")
    mode: Literal["continuous", "static"] = setting(
        "continuous", "`continuous` (requests join and leave every step) or `static` (a batch is admitted together "
        "and nothing joins until all of it finishes: the comparison baseline).")
    max_queue_len: int = setting(
        1024, "Waiting samples per engine (a request with n completions counts n) before new requests are refused "
        "(HTTP 429 / RESOURCE_EXHAUSTED), >= 1; a request with n above it can never fit (400).", ge=1)
    max_queue_tokens: int = setting(
        1 << 20, "Prompt tokens of the waiting requests per engine before new ones are refused (429), >= 1.", ge=1)
    min_admit_batch: int = setting(
        1, "Continuous mode: while requests run, waiting ones join only once at least this many of them (or all "
        "that wait, if fewer) have a free slot, in [1, max_num_seqs]. Larger values make most steps CUDA-graph "
        "replays (pure decode) for a little TTFT.", ge=1)
    async_scheduling: bool | None = setting(
        None, "Overlap the host work of step N+1 with the device work of step N (async_depth batches in flight; "
        "outputs equal the synchronous engine's). null = on whenever pipeline_parallel_size is 1; true with "
        "pipeline parallelism is an error.")
    async_depth: int = setting(
        2, "Batches in flight under async scheduling, in [2, 4]. 3 takes the driver's turnaround off the host's "
        "critical path where steps are short; a request that ends early costs up to depth - 1 wasted steps.",
        ge=2, le=4)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be true, false or null (auto), got {self.async_scheduling!r}")
        if not 1 <= self.min_admit_batch <= self.max_num_seqs:
            raise ValueError(f"min_admit_batch must be in [1, max_num_seqs={self.max_num_seqs}], got {self.min_admit_batch}")


@dataclass(frozen=True)
class ParallelConfig:
    """Model parallelism of one worker group (world = tensor x pipeline ranks; see parallel/state.py)
    and the performance switches of its kernels (parallel/options.py KernelOptions)."""

    tensor_parallel_size: int = setting(
        1, "Ranks (GPUs) every layer's heads / features are split over (one all-reduce per row-parallel layer), "
        ">= 1.", ge=1)
    pipeline_parallel_size: int = setting(
        1, "Pipeline stages the decoder layers are split into (activations cross stages by send/recv), >= 1.", ge=1)
    expert_parallel_size: int = setting(
        1, "Ranks of a stage the MoE experts are spread over, >= 1; must divide tensor_parallel_size (1 = every "
        "rank holds every expert, split by features).", ge=1)
    pipeline_layer_partition: tuple[int, ...] | None = setting(
        None, "Decoder layers per pipeline stage, one entry per stage; null = as even as possible.")
    pipeline_micro_batches: int | None = setting(
        None, "Batches in flight under pipeline parallelism, in [pp, 2 x pp]; null = pp. pp + 1 keeps the first "
        "stage busy while the driver turns a returned batch around. With one stage only null or 1.", ge=1)
    expert_dispatch: Literal["auto", "all_to_all", "all_reduce"] = setting(
        "auto", "How MoE layers under expert parallelism move tokens: `all_to_all`, `all_reduce`, or `auto` "
        "(all-reduce below all_to_all_min_tokens tokens in a step; parallel/expert.py).")
    all_to_all_min_tokens: int = setting(
        32, "Under expert_dispatch `auto`, steps with at least this many tokens use all-to-all, >= 0.", ge=0)
    collective_timeout_s: float = setting(
        300.0, "Seconds a rank waits in a collective (all-reduce, pipeline send/recv, the start-up rendezvous) for "
        "a peer before it fails with a timeout instead of hanging, in (0, 86400].", gt=0, le=MAX_TIMEOUT_S, unit="seconds")
    step_timeout_s: float = setting(
        600.0, "Seconds the engine waits for a step's result from the worker group before declaring the group dead "
        "(requests in flight end with UNAVAILABLE, the replica is replaced), in (0, 86400]; must cover the "
        "slowest step, prefill of a full batch included.", gt=0, le=MAX_TIMEOUT_S, unit="seconds")
    launcher: Literal["multiproc", "ray"] = setting(
        "multiproc", "How a world of more than one rank starts: `multiproc` (local processes) or `ray` (one Ray "
        "actor per rank in a placement group). A world of one runs in the engine's process.")
    # Performance switches (KernelOptions): on GPU only; A/B runs turn them off.
    pdl: bool = setting(
        _K.pdl, "Programmatic dependent launch of the small decode kernels (Hopper and newer; off elsewhere).")
    decode_gemv: bool = setting(
        _K.decode_gemv, "The batch-1 decode projection kernel (parallel/kernels/decode_linear.py); off = cuBLAS.")
    gemv_tiles: str | None = setting(
        _K.gemv_tiles, "A JSON table of tuned decode-GEMV tiles; null = the table shipped for the card, if any.")
    custom_allreduce: bool = setting(
        _K.custom_allreduce, "The symmetric-memory all-reduce for small TP messages on one host; off = NCCL.")
    custom_allreduce_max_bytes: int = setting(
        _K.custom_allreduce_max_bytes, "Largest message the custom all-reduce takes (its buffer), >= 0; larger "
        "ones use NCCL. Rounded up to 16 bytes.", ge=0)
    custom_allreduce_one_shot_max_bytes: int = setting(
        _K.custom_allreduce_one_shot_max_bytes, "Largest one-shot message on more than 2 ranks (two-shot above), "
        ">= 0.", ge=0)
    fused_allreduce_norm: bool = setting(
        _K.fused_allreduce_norm, "Fuse the TP all-reduce with the residual add and RMSNorm after it (needs the "
        "custom all-reduce); off = the two run apart.")
    fused_allreduce_norm_bytes: int = setting(
        _K.fused_allreduce_norm_bytes, "Bytes of each of the fused all-reduce's two buffer halves, >= 0 (0 = off); "
        "rounded up to 16.", ge=0)
    fused_allreduce_protocol: FusedProtocol = setting(
        _K.fused_allreduce_protocol, "Synchronisation of the fused all-reduce: `lamport` (the data is its own "
        "flag) or `flags`.")
    l2_prefetch_mb: float = setting(
        _K.l2_prefetch_mb, "Experimental: MiB of the next layer's weights hinted into L2 behind each fused TP "
        "all-reduce at decode size, >= 0 (0 = off).", ge=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tensor_parallel_size % self.expert_parallel_size:
            raise ValueError(f"expert_parallel_size {self.expert_parallel_size} must divide "
                             f"tensor_parallel_size {self.tensor_parallel_size}")
        if self.pipeline_layer_partition is not None and len(self.pipeline_layer_partition) != \
                self.pipeline_parallel_size:
            raise ValueError(f"pipeline_layer_partition {self.pipeline_layer_partition} must have "
                             f"pipeline_parallel_size = {self.pipeline_parallel_size} entries")
        self._check_micro_batches()

    def _check_micro_batches(self) -> None:
        value, pp = self.pipeline_micro_batches, self.pipeline_parallel_size
        if value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"pipeline_micro_batches must be an integer or None, got {value!r}")
        if pp == 1 and value != 1:
            raise ValueError(f"pipeline_micro_batches must be None (null) or 1 with pipeline_parallel_size = 1, got {value}")
        if pp > 1 and not pp <= value <= 2 * pp:
            raise ValueError(f"pipeline_micro_batches must be in [pipeline_parallel_size, 2 x pipeline_parallel_size] "
                             f"= [{pp}, {2 * pp}], got {value}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def pipeline_depth(self) -> int:
        """Batches the engine keeps in flight for the pipeline: pipeline_micro_batches resolved
        (1 with one stage, where async scheduling decides the engine's depth)."""
        if self.pipeline_parallel_size == 1:
            return 1
        return self.pipeline_micro_batches or self.pipeline_parallel_size

    def kernel_options(self) -> KernelOptions:
        """The performance switches, for `set_kernel_options` / `init_parallel` of each rank."""
        return KernelOptions(**{f.name: getattr(self, f.name) for f in fields(KernelOptions)})


# SpeculativeConfig.method: proposers of draft tokens (workers/spec/).
SpeculativeMethod = Literal["ngram", "suffix", "draft"]
SPECULATIVE_METHODS = typing.get_args(SpeculativeMethod)
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer drafts tokens, one target step verifies them (workers/spec/).
    YAML `models[].speculative: {method, num_speculative_tokens, ...}` (`method` is `speculative_method`
    here, as in `LLM(speculative_method=...)` and `--speculative-method`); `LLM(speculative={...})`."""

    speculative_method: SpeculativeMethod | None = setting(
        None, "Draft-token proposer: `ngram` (prompt lookup: the longest earlier match of the context's suffix in "
        "its own prompt and output), `suffix` (earlier requests' outputs and the request's own tokens, "
        "SuffixDecoding), `draft` (a draft model run greedily by a nested engine: draft_model, workers/spec/draft.py); "
        "null = off.")
    num_speculative_tokens: int = setting(
        4, f"Draft tokens proposed per request and step at most (k), in [1, {MAX_SPECULATIVE_TOKENS}]; each request's "
        "own k adapts to its acceptance.", ge=1, le=MAX_SPECULATIVE_TOKENS)
    prompt_lookup_min: int = setting(
        2, "ngram: shortest suffix of the context matched, in [1, 32].", ge=1, le=32)
    prompt_lookup_max: int = setting(
        4, "ngram: longest suffix of the context matched (the longest match wins), in [prompt_lookup_min, 32].",
        ge=1, le=32)
    max_verify_tokens: int = setting(
        128, "Speculate in a step only while its decoding requests x (1 + k) stay at or below this many tokens, "
        ">= 1; a larger batch already keeps the device busy, so it decodes plainly (speculation never costs "
        "throughput under load).", ge=1)
    suffix_max_cached_tokens: int = setting(
        200_000, "suffix: output tokens of finished requests kept for proposals (oldest dropped first), >= 0.", ge=0)
    suffix_max_depth: int = setting(
        24, "suffix: longest context suffix matched, in [1, 64].", ge=1, le=64)
    suffix_min_probability: float = setting(
        0.1, "suffix: stop a draft once its estimated probability falls below this, in [0, 1].", ge=0, le=1)
    draft_model: str | None = setting(
        None, "draft: the draft model's weights, as ModelConfig.model takes them (`default` = the embedded "
        "SmolLM2, a Hugging Face folder, a .gguf file, `dummy:<shape>`); required with method `draft`, refused "
        "with any other. Its vocabulary must be the target's (refused at start-up otherwise). It runs on the "
        "target's device in the target's dtype, tensor parallel 1.", min_length=1)
    draft_quantization: Quantization | None = setting(
        None, "draft: weight quantization of the draft model, the values of ModelConfig.quantization (a quantized "
        "copy of the target is a draft); null = as its checkpoint is. Only with method `draft`.")
    draft_num_layers: int | None = setting(
        None, "draft: layer-truncated self-speculation — keep the first L decoder layers (+ final norm and LM head) "
        "of the draft model, L in [1, its num_hidden_layers] (checked at start-up); null = all layers. A draft that "
        "is the target's own model (same source and quantization) at tensor parallel 1 runs over the target's "
        "tensors (no second copy). Only with method `draft`.", ge=1)
    draft_num_blocks: int | None = setting(
        None, "draft: the draft's own paged KV pool in blocks of cache.block_size, >= 2 (prefix caching on); "
        "null = as many blocks as the target's pool (the draft holds as many tokens as the target), or what 80 % of "
        "the device's free memory after the draft's weights holds if less (a GPU the target's pool fills). Refused "
        "at start-up when a given value does not fit that free memory, or when null leaves less than one "
        "full-length context (on GPU: lower cache.gpu_memory_utilization to leave room). Only with method "
        "`draft`.", ge=2)

    def __post_init__(self) -> None:
        check_fields(self)
        self._check_draft_fields()
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max must be >= prompt_lookup_min = {self.prompt_lookup_min}, "
                             f"got {self.prompt_lookup_max}")

    def _check_draft_fields(self) -> None:
        """method `draft` needs draft_model; the draft_* fields mean nothing (so are refused) with another."""
        if self.speculative_method == "draft":
            if self.draft_model is None:
                raise ValueError("speculative method `draft` requires draft_model (e.g. `default`, a Hugging Face "
                                 "folder or a .gguf file)")
            return
        given = [f.name for f in fields(self) if f.name.startswith("draft_") and getattr(self, f.name) is not None]
        if given:
            raise ValueError(f"{given[0]} is only used with speculative method `draft`, got method "
                             f"{self.speculative_method!r}")

    @property
    def enabled(self) -> bool:
        return self.speculative_method is not None


@dataclass(frozen=True)
class CostConfig:
    """Price of the worker group's devices; the engine splits its measured busy time x price over the
    requests (workers/cost.py). Both prices null = no cost is reported."""

    gpu_hour_usd: float | None = setting(
        None, "US dollars per GPU-hour of one GPU of the worker group, >= 0; null = GPUs are not priced.",
        ge=0, unit="USD per GPU-hour")
    cpu_hour_usd: float | None = setting(
        None, "US dollars per CPU-hour of one CPU (core) of the worker group, >= 0; null = CPUs are not priced. "
        "Set it to price a CPU-only engine.", ge=0, unit="USD per CPU-hour")
    gpus_per_rank: float | None = setting(
        None, "GPUs each rank holds, >= 0; null = 1 on a cuda device, 0 on CPU. The Serve app sets it from "
        "resources.num_gpus_per_worker.", ge=0)
    cpus_per_rank: float | None = setting(
        None, "CPUs each rank holds, >= 0; null = this process's torch threads. The Serve app sets it from "
        "resources.num_cpus_per_worker.", ge=0)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def priced(self) -> bool:
        return self.gpu_hour_usd is not None or self.cpu_hour_usd is not None


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    cost: CostConfig = field(default_factory=CostConfig)

    @property
    def use_async_scheduling(self) -> bool:
        """SchedulerConfig.async_scheduling resolved: None means on without pipeline parallelism."""
        if self.scheduler.async_scheduling is None:
            return self.parallel.pipeline_parallel_size == 1
        return self.scheduler.async_scheduling

    def __post_init__(self) -> None:
        if self.scheduler.async_scheduling is True and self.parallel.pipeline_parallel_size > 1:
            raise ValueError("async_scheduling requires pipeline_parallel_size == 1 (pipeline parallelism "
                             f"already keeps batches in flight), got {self.parallel.pipeline_parallel_size}")
        if self.speculative.enabled and self.parallel.pipeline_parallel_size > 1:
            raise ValueError("speculative decoding requires pipeline_parallel_size == 1, got "
                             f"{self.parallel.pipeline_parallel_size}")


SECTIONS: dict[str, type] = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                             "parallel": ParallelConfig, "speculative": SpeculativeConfig, "cost": CostConfig}


def field_default(f: Any) -> Any:
    """A dataclass field's default (MISSING when it has none)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default
