"""YAML schema of a shardserve deployment: the only parser of serve config files.

Data flow: `load_config(path)` reads YAML → `ServeConfig.model_validate(dict)` checks every
field (extra keys are refused, names must be unique) → `build_app(config)` in cluster/app.py
turns each `ModelSection` into one LLMServer deployment, and `ModelSection.to_engine_config()`
gives the frozen `EngineConfig` the engine reads. The Helm chart renders exactly these names
into a RayService's serveConfigV2 `args`, which reach `app_builder(args)` and this schema again
(minus the `ray` section, which only `shardserve serve` uses). The engine sections (cache,
scheduler, parallel and a model's engine fields) are generated from workers/config.py
(cluster/config_fields.py) and run the engine's own checks; the rest is the cluster's. Errors are
`ConfigError`s whose lines name the path of the bad field, e.g.
`models[0].parallel.tensor_parallel_size: must be >= 1, got 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    model_validator,
)
from shardserve.cluster.config_fields import engine_section
from shardserve.workers.config import (
    CacheConfig,
    CostConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)

# Default stream interval on GPUs: at 64 concurrent streams on 2 H100s the served throughput was
# 0.45 of the engine's offline figure with one message per step and 1.01 with 50 ms.
GPU_STREAM_INTERVAL_MS = 50.0


class ConfigError(ValueError):
    """A config file or dict failed validation; each line names the bad field's path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RaySection(_Section):
    address: str | None = Field(
        None, description="Ray cluster to join: null starts a local Ray, `auto` or `ray://host:port` joins one."
    )
    namespace: str = Field("shardserve", min_length=1, description="Ray namespace of the Serve application.")


class HttpSection(_Section):
    host: str = Field(
        "0.0.0.0",
        description="Interface the HTTP server binds (Serve's proxy; the Ingress replicas with tls.require_client_auth).",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API, 1..65535.")


class GrpcSection(_Section):
    port: int = Field(9000, ge=1, le=65535, description="gRPC port of shardserve.v1.LLMService, 1..65535.")


class IngressSection(_Section):
    num_replicas: int = Field(
        1,
        ge=1,
        description=(
            "Ingress replicas (each one Python process relaying every stream's messages), >= 1. More spread "
            "that CPU over cores; each keeps its own prefix-affinity table, so affinity weakens with several."
        ),
    )


class TlsSection(_Section):
    """TLS of both APIs. Paths are read where the servers run (the Serve proxies for HTTP, or the Ingress
    replicas with require_client_auth; the Ingress replicas for gRPC); the Helm chart mounts them from a
    Kubernetes Secret."""

    cert_file: str = Field(..., min_length=1, description="PEM certificate (chain) the HTTP and gRPC servers present.")
    key_file: str = Field(..., min_length=1, description="PEM private key of cert_file (unencrypted).")
    ca_file: str | None = Field(
        None, min_length=1,
        description="PEM CA bundle that signs client certificates; required when require_client_auth is true.",
    )
    require_client_auth: bool = Field(
        False,
        description=(
            "Mutual TLS on both APIs: refuse, at the TLS handshake, clients without a certificate signed by "
            "ca_file. HTTP is then served by the Ingress replicas themselves on http.port (on the head node; "
            "Ray Serve's HTTP proxy cannot require client certificates and is not started)."
        ),
    )

    @model_validator(mode="after")
    def _check_client_auth(self) -> TlsSection:
        if self.require_client_auth and self.ca_file is None:
            raise ValueError("require_client_auth: true needs ca_file (the CA that signs client certificates)")
        return self


class ApiKeySection(_Section):
    """One API key. Its name is the tenant: it goes on every request the key sends (metrics, cost)."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9._:-]+$", description="Tenant name of this key.")
    key: SecretStr | None = Field(
        None, min_length=8, description="The key itself (>= 8 characters). Prefer key_env or key_file."
    )
    key_env: str | None = Field(
        None, min_length=1, description="Environment variable of the Ingress processes that holds the key."
    )
    key_file: str | None = Field(None, min_length=1, description="File that holds the key (surrounding spaces dropped).")
    requests_per_minute: float | None = Field(
        None, gt=0,
        description=(
            "Rate limit of this key, > 0; null = unlimited. A token bucket per Ingress replica holding one "
            "minute's worth of requests: over it, HTTP 429 with Retry-After / gRPC RESOURCE_EXHAUSTED."
        ),
    )
    tokens_per_minute: float | None = Field(
        None, gt=0,
        description=(
            "Token budget of this key, > 0; null = unlimited. A bucket per Ingress replica holding one minute's "
            "worth; a request takes max_tokens x n when admitted (refused with HTTP 429 + Retry-After / gRPC "
            "RESOURCE_EXHAUSTED when the bucket holds less, 400 when it never could) and its prompt's tokens once "
            "the engine has counted them (a debt that later requests wait out)."
        ),
    )

    @field_serializer("key", when_used="json")
    def _reveal_key(self, key: SecretStr | None) -> str | None:
        # build_app hands the Ingress its config as JSON: the key must survive that; repr() still hides it.
        return None if key is None else key.get_secret_value()

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeySection:
        given = [f for f in ("key", "key_env", "key_file") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"api key {self.name!r}: set exactly one of key, key_env, key_file, got {given or 'none'}")
        return self


class AuthSection(_Section):
    api_keys: list[ApiKeySection] = Field(
        default_factory=list,
        description=(
            "Accepted API keys (HTTP `Authorization: Bearer <key>`, gRPC `authorization` metadata). Empty and no "
            "SHARDSERVE_API_KEY in the environment = open API. SHARDSERVE_API_KEY, when set, is one more key, "
            "tenant `default`, unlimited."
        ),
    )

    @model_validator(mode="after")
    def _unique_names(self) -> AuthSection:
        names = [k.name for k in self.api_keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"api key names must be unique, repeated: {dupes}")
        return self


# Launcher: a replica's world of several ranks always runs as Ray actors (cluster/server.py).
ParallelSection = engine_section(ParallelConfig, "ParallelSection", skip=("launcher",))


class AutoscalingSection(_Section):
    min_replicas: int = Field(1, ge=0, description="Fewest LLMServer replicas (worker groups), >= 0.")
    max_replicas: int = Field(1, ge=1, description="Most LLMServer replicas, >= 1 and >= min_replicas.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Requests in flight per replica the autoscaler aims for, > 0."
    )
    upscale_delay_s: float = Field(
        30, ge=0, le=3600,
        description="Seconds the load must call for more replicas before one is added, in [0, 3600]. "
        "Scaling up from zero replicas never waits: a request held at zero starts one at once.",
    )
    downscale_delay_s: float = Field(
        600, ge=0, le=86400,
        description="Seconds the load must call for fewer replicas before one is removed (also the idle "
        "time before the last one goes when min_replicas is 0), in [0, 86400].",
    )
    look_back_period_s: float = Field(
        30, gt=10, le=3600,
        description="Seconds over which the autoscaler averages requests in flight, in (10, 3600] (Ray Serve "
        "wants it above its 10 s metrics interval); a replica counts as idle only once this window holds no "
        "request.",
    )

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingSection:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas must be >= min_replicas={self.min_replicas}, got {self.max_replicas}"
            )
        return self


class ResourcesSection(_Section):
    num_gpus_per_worker: float = Field(0, ge=0, description="GPUs per rank of a worker group, >= 0.")
    num_cpus_per_worker: float = Field(1, ge=0, description="CPUs per rank of a worker group, >= 0.")


CacheSection = engine_section(CacheConfig, "CacheSection")
SpeculativeSection = engine_section(SpeculativeConfig, "SpeculativeSection", renames={"speculative_method": "method"})
# The price; the devices it multiplies come from `resources` (ModelSection.to_engine_config).
CostSection = engine_section(CostConfig, "CostSection", skip=("gpus_per_rank", "cpus_per_rank"))
SchedulerSection = engine_section(SchedulerConfig, "SchedulerSection")


class RouterSection(_Section):
    prefix_affinity: bool = Field(
        True, description="Send requests sharing a prompt prefix to the replica that served it (prefix cache)."
    )
    max_load_imbalance: int = Field(
        8,
        ge=0,
        description="Affinity yields when its replica has more than this many requests above the least loaded, >= 0.",
    )
    direct_stream: bool | None = Field(
        None,
        description=(
            "Stream each generate call from the Ingress straight to the replica this router picked, over the "
            "replica's own TCP port (Ray's auth token; TLS with Ray's certificates when RAY_USE_TLS is set), "
            "instead of through Serve's handle, which stays the fallback: about a millisecond less per request. "
            "null = on unless `autoscaling` is set; true with `autoscaling` is refused (Serve's autoscaler counts "
            "only handle calls)."
        ),
    )


class LimitsSection(_Section):
    """Per-request limits the Ingress enforces on both APIs (HTTP 400 / gRPC INVALID_ARGUMENT, 413 for the body)."""

    max_n: int = Field(16, ge=1, le=1024, description="Most completions one request may ask for (`n`), 1..1024.")
    max_stop_strings: int = Field(16, ge=0, le=1024, description="Most `stop` strings per request, 0..1024.")
    max_stop_string_chars: int = Field(
        256, ge=1, le=65536, description="Longest `stop` string, in characters, 1..65536."
    )
    max_prompt_chars: int = Field(
        2_000_000, ge=1, le=1 << 30,
        description="Longest prompt (or all chat messages together), in characters, 1..2**30.",
    )  # fmt: skip
    max_body_bytes: int = Field(
        8 << 20, ge=1024, le=1 << 30,
        description="Largest HTTP request body in bytes, 1024..2**30 (HTTP 413 above it).",
    )  # fmt: skip
    strict_max_tokens: bool = Field(
        False,
        description=(
            "true: `max_tokens` above the model's max_model_len is refused (400 / INVALID_ARGUMENT); needs "
            "max_model_len set on every model. false: it is accepted and generation stops at the context "
            "length (finish_reason `length`), as vLLM does."
        ),
    )


# The engine's model fields, flat in a `models[]` entry; `model` is called `source` there.
_ModelFields = engine_section(ModelConfig, "_ModelFields", renames={"model": "source"})


class ModelSection(_ModelFields):  # type: ignore[misc, valid-type]
    name: str = Field(
        ..., min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$", description="Model name clients send (`model` field)."
    )
    parallel: ParallelSection = Field(default_factory=ParallelSection, description="Parallelism of one group.")
    replicas: int | None = Field(
        None, ge=1, description="Fixed number of LLMServer replicas (data parallelism), >= 1; default 1."
    )
    autoscaling: AutoscalingSection | None = Field(
        None, description="Autoscale replicas instead of a fixed count (exclusive with `replicas`)."
    )
    resources: ResourcesSection = Field(default_factory=ResourcesSection, description="Per-rank resources.")
    cache: CacheSection = Field(default_factory=CacheSection, description="Paged KV cache.")
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection, description="Batching limits.")
    speculative: SpeculativeSection = Field(
        default_factory=SpeculativeSection, description="Speculative decoding (off unless `method` is set).")
    router: RouterSection = Field(default_factory=RouterSection, description="Request routing between replicas.")
    cost: CostSection = Field(
        default_factory=CostSection,
        description=("Price of the worker group's devices: each request's measured share of the engine's busy time "
                     "x tp x pp ranks x (resources.num_gpus_per_worker x gpu_hour_usd + num_cpus_per_worker x "
                     "cpu_hour_usd) is returned as usage.cost_usd (workers/cost.py)."),
    )
    stream_interval_ms: float | None = Field(
        None, ge=0, le=1000,
        description=("Least time between two streamed messages of one request, 0..1000 ms; the first token and "
                     "the end are never held. 0 = one message per engine step. Larger values send fewer, bigger "
                     "messages, merged when the path lags (throughput under many concurrent streams). "
                     f"null = {GPU_STREAM_INTERVAL_MS:g} on GPUs (device cuda or GPUs per rank), 0 on CPU."),
    )
    health_check_period_s: float = Field(
        2.0,
        ge=0.5,
        le=600,
        description=(
            "Seconds between Serve's health checks of an LLMServer replica (engine alive, every rank of its worker "
            "group alive), 0.5..600. Serve replaces a replica after 3 failed checks in a row, so a dead worker "
            "group is replaced about 3 periods after it died (Serve's own default of 10 s: ~30 s). A check is "
            "one zero-timeout look at the ranks between two engine steps."
        ),
    )
    health_check_timeout_s: float = Field(
        30.0,
        ge=0.5,
        le=3600,
        description=(
            "Seconds a health check may take before it counts as failed, 0.5..3600. The check waits for the "
            "engine's current step, so keep it above the slowest step."
        ),
    )

    @model_validator(mode="after")
    def _check_scaling(self) -> ModelSection:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("replicas and autoscaling are mutually exclusive: set one of them")
        if self.router.direct_stream and self.autoscaling is not None:
            raise ValueError(
                "router.direct_stream: true needs a fixed replica count: Serve's autoscaler counts only handle "
                "calls (leave it null or false with autoscaling)"
            )
        return self

    @property
    def direct_stream(self) -> bool:
        """Whether the Ingress streams this model's generate calls directly (router.direct_stream resolved)."""
        return self.autoscaling is None if self.router.direct_stream is None else self.router.direct_stream

    @model_validator(mode="after")
    def _check_engine(self) -> ModelSection:
        # The whole EngineConfig's rules and messages (each section ran its own already), so
        # `config validate` refuses what the engine refuses, e.g. async_scheduling with pp > 1.
        self.to_engine_config()
        return self

    @property
    def num_replicas(self) -> int:
        return 1 if self.replicas is None else self.replicas

    @property
    def world_size(self) -> int:
        return self.parallel.tensor_parallel_size * self.parallel.pipeline_parallel_size

    def effective_stream_interval_ms(self) -> float:
        """`stream_interval_ms`, with null resolved: GPU engines make tokens faster than one Serve
        message per token per stream can carry (benchmarks/README.md, serving rows)."""
        if self.stream_interval_ms is not None:
            return self.stream_interval_ms
        on_gpu = self.device.startswith("cuda") or self.resources.num_gpus_per_worker > 0
        return GPU_STREAM_INTERVAL_MS if on_gpu else 0.0

    def to_engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.to_engine(),
            cache=self.cache.to_engine(),
            scheduler=self.scheduler.to_engine(),
            parallel=self.parallel.to_engine(),
            speculative=self.speculative.to_engine(),
            cost=CostConfig(**self.cost.engine_kwargs(), gpus_per_rank=self.resources.num_gpus_per_worker or None,
                            cpus_per_rank=self.resources.num_cpus_per_worker),
        )


class AppConfig(_Section):
    """What `app_builder(args)` accepts: everything but the `ray` section."""

    http: HttpSection = Field(default_factory=HttpSection, description="OpenAI-compatible HTTP API.")
    grpc: GrpcSection = Field(default_factory=GrpcSection, description="gRPC API (shardserve.v1.LLMService).")
    ingress: IngressSection = Field(default_factory=IngressSection, description="The Ingress deployment.")
    models: list[ModelSection] = Field(..., min_length=1, description="Models served; clients pick by name.")
    limits: LimitsSection = Field(default_factory=LimitsSection, description="Per-request limits (both APIs).")
    tls: TlsSection | None = Field(None, description="TLS (and mutual TLS) for both APIs; null = plaintext.")
    auth: AuthSection = Field(default_factory=AuthSection, description="API keys (tenants) and their rate limits.")
    log_prompts: bool = Field(
        False, description="Log each request's prompt text in the Ingress log (off: only id, model and tenant)."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model names must be unique, {model.name!r} appears twice")
            seen.add(model.name)
        if self.limits.strict_max_tokens:
            unknown = [m.name for m in self.models if m.max_model_len is None]
            if unknown:
                raise ValueError(
                    f"limits.strict_max_tokens needs max_model_len set on every model (the Ingress checks "
                    f"max_tokens against it); it is null for {unknown}"
                )
        return self

    def model(self, name: str) -> ModelSection:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)


class ServeConfig(AppConfig):
    ray: RaySection = Field(default_factory=RaySection, description="Ray cluster to start or join.")

    def app_args(self) -> dict[str, Any]:
        """The `args` of a Serve config file / RayService (what app_builder receives)."""
        return self.model_dump(mode="json", exclude={"ray"})


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        path = ""
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = item["msg"].removeprefix("Value error, ")
        message = _friendly(item, message)
        lines.append(f"{path or '<root>'}: {message}")
    return "\n".join(lines)


def _friendly(item: dict[str, Any], message: str) -> str:
    ctx = item.get("ctx") or {}
    got = item.get("input")
    if item["loc"] and item["loc"][-1] == "key":  # an API key: never echo it
        got = "<hidden>"
    kind = item["type"]
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}, got {got!r}"
    if kind == "extra_forbidden":
        return "unknown field (not in the schema; see `shardserve config schema`)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got!r}"
    return message if kind == "value_error" else f"{message}, got {got!r}"


def parse_config(data: Any, cls: type[AppConfig] = ServeConfig) -> AppConfig:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path, speculative: dict[str, Any] | None = None) -> ServeConfig:
    """The validated config of a YAML file; `speculative` (YAML names) is merged into every model's
    `speculative` section first (`shardserve serve --speculative-method ...`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: <root>: must be a mapping with a `models` list, got {type(data).__name__}")
    if speculative and isinstance(data.get("models"), list):
        for model in data["models"]:
            if isinstance(model, dict):
                model["speculative"] = {**(model.get("speculative") or {}), **speculative}
    try:
        return parse_config(data, ServeConfig)  # type: ignore[return-value]
    except ConfigError as err:
        raise ConfigError(f"{path}:\n{err}") from None


def json_schema() -> dict[str, Any]:
    return ServeConfig.model_json_schema()
