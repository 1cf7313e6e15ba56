"""KernelOptions: the performance switches of this process's kernels, set once at rank start.

Data flow: the engine's ParallelConfig (workers/config.py, where each switch is documented and
settable from YAML) builds a KernelOptions; `init_parallel` (every rank of a worker group) or the
engine itself (a world of one) installs it with `set_kernel_options` before the model is built.
Kernels and the custom all-reduce read `kernel_options()` — nothing here reads the environment
(environment overrides are applied to the config by workers/env_overrides.py, in the driver, so
every rank sees the same values). A process-wide value, like ParallelState, because the launch
sites (PDL, the decode GEMV) are deep in kernel calls that know nothing of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FusedProtocol = Literal["lamport", "flags"]


@dataclass(frozen=True)
class KernelOptions:
    """Defaults here are the engine's defaults (ParallelConfig reads them); docs live there."""

    pdl: bool = True
    decode_gemv: bool = True
    gemv_tiles: str | None = None
    custom_allreduce: bool = True
    custom_allreduce_max_bytes: int = 8 * 1024 * 1024
    custom_allreduce_one_shot_max_bytes: int = 256 * 1024
    fused_allreduce_norm: bool = True
    fused_allreduce_norm_bytes: int = 6 * 1024 * 1024
    fused_allreduce_protocol: FusedProtocol = "lamport"
    l2_prefetch_mb: float = 0.0


DEFAULT_KERNEL_OPTIONS = KernelOptions()
_current = DEFAULT_KERNEL_OPTIONS


def set_kernel_options(options: KernelOptions) -> None:
    global _current
    _current = options


def kernel_options() -> KernelOptions:
    return _current
