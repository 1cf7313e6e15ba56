"""Kernel profiles of engine steps: profiler events -> per-kernel times -> a category split.

Two ways in, one way out:
  in-process (benchmarks/profile_gpu.py): the script wraps engine steps in `torch.profiler`
    itself and passes the profiler to `profiled_kernels`;
  worker ranks (benchmarks/profile_tp.py): `profile_ranks(engine, run_steps)` passes a
    `KernelProfileProbe` (a RankProbe, workers/worker/probe.py) to every rank with the Worker
    calls `probe_start` / `probe_stop` (ConnectionGroup.call, proc.py); each rank runs its own
    profiler around the steps it executes (`start_profiler` / `stop_profiler`) and answers with
    a picklable `RankProfile` (kernel names and times, no profiler objects cross the pipe). The
    ranks unpickle the probe by this module's name: they are spawned with the driver's sys.path,
    which holds benchmarks/ wherever this module was imported from.
Either way the kernels go through `summarize` (per-step totals, `categorize` by CATEGORY_RULES,
top kernels). On a GPU the "kernels" are the device kernels, copies and memsets (CUPTI); on CPU
they are the aten ops with their self CPU time.

The sampler split (`in_sampler`: kernels launched inside the SAMPLER_RANGE profiler range) needs
the caller to wrap the runner's sampler in that range, which profile_gpu.py does in its own
process; rank profiles do not, so their kernels are categorised by name only.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from shardserve.workers.bench.device import device_name
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

if TYPE_CHECKING:
    from shardserve.workers.engine import LLMEngine
    from shardserve.workers.worker.probe import RankInfo

ENV_TRACE_DIR = "SHARDSERVE_PROFILE_TRACE_DIR"  # where stop_profiler writes Chrome traces (unset: none)
SAMPLER_RANGE = "profile_gpu.sampler"  # wraps the runner's sampler call while profiling
DEVICE_WORK = {"kernel", "gpu_memcpy", "gpu_memset"}  # kineto activity types that are device work
TOP_KERNELS = 15

# Kernel name -> category: the first matching rule wins (lower-cased name, re.search). Two rules
# are not about the name: kernels launched inside the sampler call are "sampling/logits" (the
# LM-head GEMM runs before it and stays "gemm"), and on an MoE model the generic routing kernels
# outside the sampler (softmax, top-k, sort, scatter, cumsum, bucketize) are "moe".
CATEGORIES = ("gemm", "attention", "moe", "norm", "rotary/kv-write", "activation", "sampling/logits",
              "communication", "memcpy/memset", "other")
CATEGORY_RULES: tuple[tuple[str, str], ...] = (
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|cross_device|custom_ar"),
    ("memcpy/memset", r"memcpy|memset|direct_copy|aten::copy_|aten::_to_copy|aten::fill_|aten::zero_"),
    ("moe", r"moe|expert"),  # before gemm: _moe_gemm_kernel
    ("attention", r"attention|attn|flash|fmha|sdpa|_decode_stage|_extend_kernel"),
    ("gemm", r"gemm|gemv|matmul|linear_kernel|nvjet|cutlass|xmma|cublas|splitkreduce|aten::(addmm|mm|bmm|linear)\b"),
    ("norm", r"rms_?norm|layer_?norm|norm(?!al)"),
    ("rotary/kv-write", r"rotary|rope|kv_cache|cache_write|reshape_and_cache|store_kv|aten::index_copy_"),
    ("activation", r"silu|gelu|swiglu|act_and_mul|sigmoid"),
    ("sampling/logits", r"argmax|softmax|top_?k|sort|exponential|multinomial|sampl|logit|cumsum|gumbel"),
)
MOE_ROUTING = r"softmax|top_?k|sort|radix|scatter|cumsum|scan|bucketize|searchsorted"


def categorize(name: str, in_sampler: bool, is_moe: bool) -> str:
    low = name.lower()
    for category, pattern in CATEGORY_RULES[:2]:  # copies and collectives, wherever they run
        if re.search(pattern, low):
            return category
    if in_sampler:
        return "sampling/logits"
    if is_moe and re.search(MOE_ROUTING, low):
        return "moe"
    return next((c for c, pattern in CATEGORY_RULES[2:] if re.search(pattern, low)), "other")


@dataclass(frozen=True)
class Kernel:
    name: str
    us: float
    in_sampler: bool


def activities(on_cuda: bool) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])


def profiled_kernels(prof: profile, on_cuda: bool) -> list[Kernel]:
    """Device kernels, copies and memsets (GPU), or aten ops with their self time (CPU)."""
    events = prof.events()
    ranges = [e.time_range for e in events if e.name == SAMPLER_RANGE and e.device_type == DeviceType.CPU]

    def in_sampler(start_us: float) -> bool:
        return any(r.start <= start_us <= r.end for r in ranges)

    if not on_cuda:
        return [Kernel(e.name, e.self_cpu_time_total, in_sampler(e.time_range.start)) for e in events
                if e.device_type == DeviceType.CPU and _activity(e) == "cpu_op"]
    # CPU ops by correlation id (frontend events: linked id 0), as torch links kernels to ops
    # (torch builds without `linked_correlation_id` leave the sampler split to the name rules.)
    ops = {e.id: e for e in events
           if e.device_type == DeviceType.CPU and not e.is_async and getattr(e, "linked_correlation_id", None) == 0}
    kernels = []
    for e in events:
        if e.device_type != DeviceType.CUDA or not _is_device_work(e):
            continue
        launcher = ops.get(getattr(e, "linked_correlation_id", -1))  # the CPU op that launched it (none: graph replay)
        kernels.append(Kernel(e.name, e.time_range.elapsed_us(),
                              launcher is not None and in_sampler(launcher.time_range.start)))
    return kernels


def _activity(event) -> str:
    return str(getattr(event, "activity_type", "") or "")


def _is_device_work(event) -> bool:
    kind = _activity(event)
    return kind in DEVICE_WORK if kind else not event.is_user_annotation


def summarize(kernels: list[Kernel], num_batches: int, is_moe: bool) -> dict:
    """Per-batch totals, the category split (sums to the total) and the top kernels."""
    per = max(num_batches, 1)
    categories = dict.fromkeys(CATEGORIES, 0.0)
    by_kernel: dict[tuple[str, str], list[float]] = {}  # (name, category): the same name may run in both
    for k in kernels:
        category = categorize(k.name, k.in_sampler, is_moe)
        categories[category] += k.us
        by_kernel.setdefault((k.name, category), []).append(k.us)
    total_us = sum(categories.values())
    top = sorted(by_kernel.items(), key=lambda item: -sum(item[1]))[:TOP_KERNELS]
    return {
        "kernel_ms_per_step": total_us / per / 1e3,
        "kernels_per_step": len(kernels) / per,
        "categories_ms_per_step": {c: us / per / 1e3 for c, us in categories.items()},
        "top_kernels": [{"name": name, "category": category, "count_per_step": len(t) / per,
                         "ms_per_step": sum(t) / per / 1e3, "mean_us": statistics.fmean(t),
                         "share": sum(t) / total_us if total_us else 0.0} for (name, category), t in top],
    }


# ---- worker ranks ----------------------------------------------------------------------


@dataclass(frozen=True)
class RankProfile:
    """One rank's profile window, as it crosses the pipe back to the driver (picklable)."""

    rank: int  # global rank
    tp_rank: int
    pp_rank: int
    ep_rank: int
    device: str  # the rank's device name (workers/bench/device.py), e.g. "NVIDIA H100 80GB HBM3"
    kernels: tuple[tuple[str, float], ...]  # (name, microseconds) in recorded order

    def as_kernels(self) -> list[Kernel]:
        return [Kernel(name, us, False) for name, us in self.kernels]  # no sampler range on ranks


def start_profiler(device: torch.device) -> profile:
    """A running profiler (CPU activity, plus CUDA on a GPU); the caller keeps it until stop."""
    prof = profile(activities=activities(device.type == "cuda"))
    prof.start()
    return prof


def stop_profiler(prof: profile, device: torch.device, trace_name: str | None = None) -> list[Kernel]:
    """Stop `prof` once the device has run everything launched inside the window; with
    SHARDSERVE_PROFILE_TRACE_DIR set, also write its Chrome trace there as `<trace_name>.json`."""
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
    prof.stop()
    trace_dir = os.environ.get(ENV_TRACE_DIR)
    if trace_dir:  # the whole timeline (host ops, launches, kernels) for chrome://tracing / Perfetto
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace_dir, f"{trace_name or 'trace'}.json"))
    return profiled_kernels(prof, on_cuda)


class KernelProfileProbe:
    """The RankProbe that runs torch.profiler on a rank over the window and reports its RankProfile;
    with SHARDSERVE_PROFILE_TRACE_DIR set, each rank also writes its Chrome trace `rank<r>.json`."""

    def __init__(self) -> None:
        self._info: RankInfo | None = None
        self._profiler: profile | None = None

    def start(self, info: RankInfo) -> None:
        self._info, self._profiler = info, start_profiler(info.device)

    def stop(self) -> RankProfile:
        info, prof = self._info, self._profiler
        assert info is not None and prof is not None, "stop before start"
        kernels = stop_profiler(prof, info.device, trace_name=f"rank{info.rank}")
        return RankProfile(info.rank, info.tp_rank, info.pp_rank, info.ep_rank, device_name(info.device),
                           tuple((k.name, k.us) for k in kernels))


def profile_ranks(engine: LLMEngine, run_steps: Callable[[], None]) -> list[RankProfile]:
    """Profile every worker rank while `run_steps()` steps the engine; one RankProfile per rank.

    Steps may be in flight at either end (async scheduling): a rank handles a CALL after
    finishing the steps it received before it, so the window holds exactly the steps submitted
    between the two calls. A single-process engine (LocalExecutor) has no ranks: profile it in
    process, as benchmarks/profile_gpu.py does.
    """
    call = getattr(engine.executor, "call", None)
    if call is None:
        raise TypeError(f"{type(engine.executor).__name__} runs the model in this process, not on worker ranks: "
                        "profile it with torch.profiler directly (benchmarks/profile_gpu.py)")
    call("probe_start", KernelProfileProbe())
    try:
        run_steps()
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: leave no rank profiling (a dead group raises again)
            call("probe_stop")
        raise
    return call("probe_stop")
