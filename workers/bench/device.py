"""What the benchmark ran on, and the copy bandwidth that bounds decode speed.

Decode reads every weight and the whole KV cache each step, so the floor of a step's time is
bytes read / memory bandwidth. The bandwidth is measured here, in the same run: a large
tensor copied device to device, counting bytes read plus bytes written.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def copy_bandwidth(device: torch.device, num_bytes: int | None = None, repeats: int = 10) -> float:
    """Measured copy bandwidth in bytes/s (read + write), median of `repeats` copies."""
    num_bytes = num_bytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(num_bytes // 2, dtype=torch.float16, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    return 2 * num_bytes / times[len(times) // 2]


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def gpu_time_ms(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Median GPU time of fn() in ms over `iters` runs (CUDA events), each after an L2 flush:
    zeroing 512 MiB (~0.2 ms of GPU work) evicts L2 and hides the Python launch of fn."""
    flush = _L2_FLUSH.get(device)
    if flush is None:
        flush = _L2_FLUSH[device] = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 20, skip: int = 3) -> float:
    """Median time in ms of one replay of a captured CUDA graph (CUDA events), the first `skip` dropped."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[skip:])
