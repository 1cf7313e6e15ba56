"""What the benchmark ran on, and the copy bandwidth that bounds decode speed.

Decode reads every weight and the whole KV cache each step, so the floor of a step's time is
bytes read / memory bandwidth. The bandwidth is measured here, in the same run: a large
tensor copied device to device, counting bytes read plus bytes written.
"""

from __future__ import annotations

import os
import platform
import time

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
