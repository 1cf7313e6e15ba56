"""The only reader of SHARDSERVE_* environment variables in the product.

Data flow: `apply_env_overrides(config)` runs once where an engine starts (LLMEngine.__init__):
each variable of OVERRIDES that is set replaces its EngineConfig field, parsed by the field's type
and checked by the config's own `__post_init__`, so a bad value is refused with the field's
message, never ignored. The engine hands the resulting config to its worker ranks (pickled over the
pipe or to the Ray actors), so every rank sees the driver's values, whatever its own environment.
These exist for A/B runs of the kernel switches; YAML fields (documented in the schema) are the
way to configure a deployment. Two more start-up values live here for the same reason: the
default GGUF cache folder and the Ingress's single API key (the Helm chart's Secret).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from shardserve.workers.config import SECTIONS, EngineConfig

PREFIX = "SHARDSERVE_"
OVERRIDES: dict[str, tuple[str, str]] = {  # variable -> (EngineConfig section, field)
    f"{PREFIX}PDL": ("parallel", "pdl"),
    f"{PREFIX}DECODE_GEMV": ("parallel", "decode_gemv"),
    f"{PREFIX}GEMV_TILES": ("parallel", "gemv_tiles"),
    f"{PREFIX}CUSTOM_ALLREDUCE": ("parallel", "custom_allreduce"),
    f"{PREFIX}CUSTOM_ALLREDUCE_MAX_BYTES": ("parallel", "custom_allreduce_max_bytes"),
    f"{PREFIX}CUSTOM_ALLREDUCE_ONE_SHOT_MAX_BYTES": ("parallel", "custom_allreduce_one_shot_max_bytes"),
    f"{PREFIX}FUSED_ALLREDUCE_NORM": ("parallel", "fused_allreduce_norm"),
    f"{PREFIX}FUSED_ALLREDUCE_NORM_BYTES": ("parallel", "fused_allreduce_norm_bytes"),
    f"{PREFIX}FUSED_ALLREDUCE_PROTOCOL": ("parallel", "fused_allreduce_protocol"),
    f"{PREFIX}L2_PREFETCH_MB": ("parallel", "l2_prefetch_mb"),
}
# Switches of the other polarity that earlier versions read: refused with the one to use instead.
RENAMED = {
    f"{PREFIX}DISABLE_CUSTOM_ALLREDUCE": f"{PREFIX}CUSTOM_ALLREDUCE=0 (or parallel.custom_allreduce: false)",
    f"{PREFIX}DISABLE_FUSED_ALLREDUCE_NORM": f"{PREFIX}FUSED_ALLREDUCE_NORM=0 (or parallel.fused_allreduce_norm: false)",
}
CACHE_DIR_ENV = f"{PREFIX}CACHE_DIR"  # default of ModelConfig.gguf_cache_dir
API_KEY_ENV = f"{PREFIX}API_KEY"  # one more accepted API key, tenant `default` (cluster/ingress/auth.py)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(variable: str, raw: str, kind: Any) -> Any:
    options = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    base = options[0]
    text = raw.strip()
    if base is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{variable} must be one of {'/'.join(_TRUE + _FALSE)}, got {raw!r}")
    if base in (int, float):
        try:
            return base(text)
        except ValueError:
            raise ValueError(f"{variable} must be {'an integer' if base is int else 'a number'}, got {raw!r}") from None
    return text or None  # str and Literal fields (the config checks the choices)


def apply_env_overrides(config: EngineConfig, environ: Mapping[str, str] = os.environ) -> EngineConfig:
    """`config` with every SHARDSERVE_* override that is set applied (ValueError on a bad value)."""
    for old, new in RENAMED.items():
        if old in environ:
            raise ValueError(f"{old} is no longer read; use {new}")
    updates: dict[str, dict[str, Any]] = {}
    for variable, (section, name) in OVERRIDES.items():
        if variable in environ:
            kind = typing.get_type_hints(SECTIONS[section])[name]
            updates.setdefault(section, {})[name] = _parse(variable, environ[variable], kind)
    try:
        return replace(config, **{s: replace(getattr(config, s), **u) for s, u in updates.items()})
    except ValueError as err:
        names = [v for v, (s, n) in OVERRIDES.items() if n in updates.get(s, {})]
        raise ValueError(f"{err} (from the environment: {', '.join(names)})") from None


def gguf_cache_dir(configured: str | None) -> Path:
    """The GGUF conversion cache: the configured folder, else $SHARDSERVE_CACHE_DIR, else ~/.cache/shardserve."""
    return Path(configured or os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "shardserve").expanduser()


def api_key() -> str | None:
    """$SHARDSERVE_API_KEY of this process (the Ingress), None when unset or empty."""
    return os.environ.get(API_KEY_ENV) or None

