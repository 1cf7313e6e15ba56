"""Engine configuration: frozen dataclasses, validated on construction.

The YAML/CLI edge (cluster/config.py, cluster/cli.py) parses user input and builds these; the
engine, scheduler, KV cache and runner only ever read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DTYPES = ("auto", "float32", "float16", "bfloat16")
MAX_TIMEOUT_S = 86400.0  # upper bound of ParallelConfig.collective_timeout_s and step_timeout_s (one day)


# ModelConfig.quantization: methods applied at load, then checkpoint formats (workers/quant/formats/).
QUANTIZATION_METHODS = ("int8", "int4", "fp8", "gptq", "awq", "compressed-tensors", "gguf")
QUANTIZATION_GROUP_SIZES = (32, 64, 128, -1)


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to serve and how.

    model: a Hugging Face folder, a .gguf file, `dummy:<shape>` (seeded random weights of a
      named real shape, see workers/models/dummy.py) or `default` (the embedded SmolLM2).
    dtype: compute dtype; `auto` is bfloat16 on GPU and float32 on CPU.
    device: `auto` picks cuda when available.
    max_model_len: context length cap; None = the model's own max_position_embeddings.
    seed: seed of dummy weights and of unseeded sampling.
    quantization: weight quantization (workers/quant/). None: as the checkpoint is (a GPTQ, AWQ or
      compressed-tensors folder is detected from its config.json). int8 | int4 | fp8: quantize a
      float checkpoint at load (or name the folder's own format); gptq | awq | compressed-tensors |
      gguf: require that format (a GGUF file with Q4_0 / Q4_1 / Q8_0 projections is then read packed;
      with null a GGUF file is dequantized at load). A value that contradicts the folder is an error naming both.
    quantization_group_size: inputs per scale for `int4` at load: 32, 64, 128 or -1 (one per row).
    """

    model: str = "default"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    quantization: str | None = None
    quantization_group_size: int = 128

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be null or one of {QUANTIZATION_METHODS}, got {self.quantization!r}")
        if self.quantization_group_size not in QUANTIZATION_GROUP_SIZES:
            raise ValueError(f"quantization_group_size must be one of {QUANTIZATION_GROUP_SIZES}, "
                             f"got {self.quantization_group_size}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache.

    block_size: tokens per KV block (default 16).
    gpu_memory_utilization: on GPU, the fraction of total memory the engine may use
      (weights + activations + KV); the KV pool gets what is left after a profiling step.
    cpu_kv_cache_bytes: on CPU, the KV pool's size in bytes.
    num_blocks: an explicit pool size that overrides both budgets (tests use tiny pools).
    enable_prefix_caching: reuse full blocks whose chained token hash was computed before.
    """

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30
    num_blocks: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits and policy.

    max_num_seqs: requests in one step at most.
    max_num_batched_tokens: tokens (prefill chunks + decodes) in one step at most.
    enable_chunked_prefill: split long prompts over steps and mix them with decodes; when
      off, a prompt is prefilled whole in one step (it must fit max_num_batched_tokens).
    policy: `fcfs`, or `priority` (lower Request.priority first, then arrival).
    mode: `continuous` (requests join and leave every step) or `static` (a batch is admitted
      together and nothing joins until all of it finishes: the comparison baseline).
    max_queue_len: samples waiting at most (a request with n completions counts n); the async
      engine refuses more (QueueFullError, HTTP 429 / gRPC RESOURCE_EXHAUSTED) instead of
      queueing without bound; a request with n above it can never fit (ValueError naming n).
    max_queue_tokens: prompt tokens of the waiting requests at most, the same way (a burst of
      long prompts is refused before it holds the queue for minutes).
    min_admit_batch: continuous mode only — while requests are running, waiting ones join
      only once at least this many of them (or all that wait, if fewer) have a free slot.
      1 (default) admits at every step. Larger values trade a little TTFT for throughput on
      GPU: steps that carry a prefill run eagerly, pure decode steps replay a CUDA graph, so
      admitting in bursts makes most steps graph replays.
    async_scheduling: overlap the host work of step N+1 (scheduling, input preparation, launch)
      with the device work of step N: the engine keeps up to 2 batches in flight (async_depth) and schedules
      each request's next decode before its previous token is known on the host (a placeholder
      the runner fills on the device). Outputs equal the synchronous engine's. None (default):
      on whenever pipeline_parallel_size == 1 (pipeline parallelism keeps its own batches in
      flight); True with pipeline parallelism is an error. See workers/engine.py.
      What it buys: benchmarks/README.md.
    async_depth: batches in flight under async scheduling, 2 (default) to 4. At 3 the driver
      sends step N+2 before step N's output is in, so the ranks find it waiting when they finish
      N: the driver's turnaround leaves the host's critical path, which helps where a step is
      short (TP 4 batch 1: ~2.2 ms). A request that ends early (EOS, a stop string) costs up to
      depth - 1 wasted steps, whose results are dropped; outputs still equal the synchronous
      engine's.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    mode: Literal["continuous", "static"] = "continuous"
    max_queue_len: int = 1024
    max_queue_tokens: int = 1 << 20
    min_admit_batch: int = 1
    async_scheduling: bool | None = None
    async_depth: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.async_depth, bool) or not isinstance(self.async_depth, int) or not 2 <= self.async_depth <= 4:
            raise ValueError(f"async_depth must be an integer in [2, 4], got {self.async_depth!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be true, false or null (auto), got {self.async_scheduling!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be fcfs or priority, got {self.policy!r}")
        if not 1 <= self.min_admit_batch <= self.max_num_seqs:
            raise ValueError(f"min_admit_batch must be in [1, max_num_seqs={self.max_num_seqs}], got {self.min_admit_batch}")
        if self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1, got {self.max_queue_len}")
        if self.max_queue_tokens < 1:
            raise ValueError(f"max_queue_tokens must be >= 1, got {self.max_queue_tokens}")
        if self.mode not in ("continuous", "static"):
            raise ValueError(f"mode must be continuous or static, got {self.mode!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Model parallelism of one worker group (world = tensor x pipeline ranks; see parallel/state.py).

    tensor_parallel_size: ranks that split every layer's heads / features (one all-reduce per
      row-parallel layer).
    pipeline_parallel_size: stages that split the decoder layers; activations cross stages by
      send/recv.
    expert_parallel_size: ranks of a stage that split the MoE experts (1 = every rank holds every
      expert, split by features); must divide tensor_parallel_size.
    pipeline_layer_partition: decoder layers per stage (None = as even as possible).
    pipeline_micro_batches: batches the engine keeps in flight under pipeline parallelism, each
      about 1/this of the running requests (workers/engine.py). None = pipeline_parallel_size,
      just enough for every stage to hold one. When the oldest batch returns from the last stage
      the driver must apply it, schedule its next step and send that to stage 0 (several ms at
      ~500 requests); with P batches stage 0 has finished the others by then and idles for that
      turnaround, while one more (P + 1) gives it work meanwhile. Must be in [P, 2 * P] with
      P > 1; with one stage only None or 1 (async scheduling has its own depth of 2).
    expert_dispatch: `auto`, `all_to_all` or `all_reduce` (see parallel/expert.py).
    all_to_all_min_tokens: under `auto`, steps with at least this many tokens use all-to-all.
    collective_timeout_s: seconds a rank waits in a collective (all-reduce, pipeline send/recv, the
      rendezvous) for a peer before failing with a timeout (torch.distributed process-group
      timeout; parallel/state.py), in (0, MAX_TIMEOUT_S].
    step_timeout_s: seconds the driver waits for a step's output before it declares the worker
      group dead (WorkerGroupError; workers/worker/channel.py), in (0, MAX_TIMEOUT_S]. A rank
      that dies is noticed at once (closed pipe/socket); this bounds a rank that hangs.
    launcher: how a world of more than one rank is started: `multiproc` (local spawned processes,
      workers/worker/executor.py) or `ray` (one Ray actor per rank in a placement group,
      workers/group.py). A world of one always runs in the engine's process.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    pipeline_layer_partition: tuple[int, ...] | None = None
    pipeline_micro_batches: int | None = None
    expert_dispatch: Literal["auto", "all_to_all", "all_reduce"] = "auto"
    all_to_all_min_tokens: int = 32
    collective_timeout_s: float = 300.0
    step_timeout_s: float = 600.0
    launcher: Literal["multiproc", "ray"] = "multiproc"

    def __post_init__(self) -> None:
        if self.launcher not in ("multiproc", "ray"):
            raise ValueError(f"launcher must be multiproc or ray, got {self.launcher!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tensor_parallel_size % self.expert_parallel_size:
            raise ValueError(f"expert_parallel_size {self.expert_parallel_size} must divide "
                             f"tensor_parallel_size {self.tensor_parallel_size}")
        if self.pipeline_layer_partition is not None and len(self.pipeline_layer_partition) != \
                self.pipeline_parallel_size:
            raise ValueError(f"pipeline_layer_partition {self.pipeline_layer_partition} must have "
                             f"pipeline_parallel_size = {self.pipeline_parallel_size} entries")
        self._check_micro_batches()
        if self.expert_dispatch not in ("auto", "all_to_all", "all_reduce"):
            raise ValueError(f"expert_dispatch must be auto, all_to_all or all_reduce, got {self.expert_dispatch!r}")
        for name in ("collective_timeout_s", "step_timeout_s"):
            value = getattr(self, name)
            if not 0 < value <= MAX_TIMEOUT_S:
                raise ValueError(f"{name} must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {value!r}")

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


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

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
