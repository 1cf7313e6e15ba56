"""Opt-in: read a linear layer's weight into the GPU's L2 on a side stream, ahead of its matmul.

Why: at batch-1 decode the kernels between a layer's qkv projection and its o_proj (rotary +
KV write, paged attention) barely use DRAM, and o_proj then reads its weight at a poor fraction
of bandwidth. `L2Prefetcher.prefetch(weight)` launches workers/kernels/l2_prefetch.py on a side
stream that starts after everything already queued on the current stream (the qkv GEMM: the
prefetch should fill the idle DRAM time after it, not compete with it), so it runs alongside
the kernels queued next; `join()` makes the current stream wait for the side stream, which only
orders the work queued after it (call it after launching the matmul that uses the weight).

Switches (read when a model is built): `SHARDSERVE_L2_PREFETCH=1` turns it on (default off:
no stream, no event, no launch); `SHARDSERVE_L2_PREFETCH_MB` caps the bytes read per weight (the
first N MiB; default the whole weight); `SHARDSERVE_L2_PREFETCH_PROGRAMS` sets the kernel's grid
(default 32 programs, so the prefetch leaves most SMs to the kernels beside it). Only CUDA
weights of unquantized layers (a plain floating-point `weight` Parameter) are prefetched.

CUDA graphs: `side.wait_stream(current)` / `current.wait_stream(side)` are an event record and
an event wait, which a capture turns into a fork and a join of the captured graph; every
`prefetch` must be followed by a `join` before the capture ends (LlamaAttention does both in
one forward). Allocator: the side stream reads only the weight (a long-lived parameter) and the
kernel's per-device sink (allocated here, before any capture, and never freed), so no tensor it
uses can be freed and handed to another stream while it runs.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence

import torch
from shardserve.parallel.quant import UnquantizedLinearMethod
from torch import nn

# The kernel module is imported inside the functions that use it: the kernel tests re-import
# kernel modules under Triton's interpreter, and names bound here at import time would keep the
# compiled versions.
logger = logging.getLogger(__name__)

ENV_ENABLE = "SHARDSERVE_L2_PREFETCH"
ENV_MAX_MB = "SHARDSERVE_L2_PREFETCH_MB"
ENV_PROGRAMS = "SHARDSERVE_L2_PREFETCH_PROGRAMS"
DEFAULT_PROGRAMS = 32
# (device, max_bytes, programs) -> the one prefetcher (and side stream) the layers share
_PREFETCHERS: dict[tuple[torch.device, int | None, int], L2Prefetcher] = {}
_WARNED: set[tuple[str, str]] = set()  # (variable, value) already warned about: once, not once per layer


def _warn_once(variable: str, raw: str, message: str, *args: object) -> None:
    if (variable, raw) not in _WARNED:
        _WARNED.add((variable, raw))
        logger.warning(message, *args)


def enabled_by_env() -> bool:
    return os.environ.get(ENV_ENABLE, "0").strip().lower() in ("1", "true", "yes", "on")


def max_bytes_from_env() -> int | None:
    """The per-weight cap in bytes (SHARDSERVE_L2_PREFETCH_MB, MiB, fractions allowed); None: no cap."""
    raw = os.environ.get(ENV_MAX_MB, "").strip()
    if not raw:
        return None
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if not mib >= 0:  # also catches nan
        _warn_once(ENV_MAX_MB, raw, "ignoring %s=%r (a number of MiB >= 0): prefetching whole weights",
                   ENV_MAX_MB, raw)
        return None
    return int(mib * 2**20)


def num_programs_from_env() -> int:
    from shardserve.workers.kernels.l2_prefetch import MAX_PROGRAMS

    raw = os.environ.get(ENV_PROGRAMS, "").strip()
    try:
        value = DEFAULT_PROGRAMS if not raw else int(raw)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_PROGRAMS:
        _warn_once(ENV_PROGRAMS, raw, "ignoring %s=%r (an integer in [1, %d])", ENV_PROGRAMS, raw, MAX_PROGRAMS)
        return DEFAULT_PROGRAMS
    return value


def skip_reason(linear: nn.Module) -> str | None:
    """Why `linear.weight` is not prefetched (None: it is)."""
    if not enabled_by_env():
        return f"{ENV_ENABLE} is off"
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        return "no floating-point weight Parameter"
    if not isinstance(getattr(linear, "quant_method", UnquantizedLinearMethod()), UnquantizedLinearMethod):
        return f"quantized ({type(linear.quant_method).__name__})"  # its scales would need reading too
    if weight.device.type != "cuda":
        return f"weight on {weight.device.type}, not CUDA"
    if not weight.is_contiguous():
        return "weight not contiguous"
    return None


class L2Prefetcher:
    """A side stream on one CUDA device that reads weights into L2 (see the module docstring)."""

    def __init__(self, device: torch.device, max_bytes: int | None, num_programs: int) -> None:
        from shardserve.workers.kernels.l2_prefetch import sink_for

        self.device, self.max_bytes, self.num_programs = device, max_bytes, num_programs
        self.side = torch.cuda.Stream(device=device)
        sink_for(device)  # allocate the kernel's sink now, outside any graph capture

    def prefetch(self, weight: torch.Tensor) -> None:
        """Start reading `weight` into L2 once the work queued so far on the current stream is done."""
        from shardserve.workers.kernels.l2_prefetch import prefetch_to_l2

        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            prefetch_to_l2(weight, self.max_bytes, self.num_programs)

    def join(self) -> None:
        """Make work queued next on the current stream wait for the prefetches (work already queued
        is not delayed)."""
        torch.cuda.current_stream(self.device).wait_stream(self.side)


def prefetcher_for(linear: nn.Module) -> L2Prefetcher | None:
    """The prefetcher for `linear.weight`, shared by every layer on its device; None where
    `skip_reason` says no (with the switch off: right away, creating nothing)."""
    if skip_reason(linear) is not None:
        return None
    device = linear.weight.device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, max_bytes_from_env(), num_programs_from_env())
    prefetcher = _PREFETCHERS.get(key)
    if prefetcher is None:
        prefetcher = _PREFETCHERS[key] = L2Prefetcher(*key)
    return prefetcher


def log_plan(name: str, layers: Sequence[tuple[nn.Module, L2Prefetcher | None]]) -> None:
    """Log once per model which of its `name` weights (linear, its prefetcher) are prefetched;
    silent with the switch off."""
    if not enabled_by_env() or not layers:
        return
    chosen = [(linear, p) for linear, p in layers if p is not None]
    if chosen:
        linear, p = chosen[0]
        cap = "whole weight" if p.max_bytes is None else f"first {p.max_bytes / 2**20:.1f} MiB"
        logger.info("L2 prefetch of %s in %d of %d layers (%.1f MiB each, %s, %d programs, side stream on %s)",
                    name, len(chosen), len(layers), linear.weight.nbytes / 2**20, cap, p.num_programs, p.device)
    skipped = Counter(skip_reason(linear) for linear, p in layers if p is None)
    for reason, count in skipped.items():
        logger.info("L2 prefetch of %s skipped in %d layers: %s", name, count, reason)
