"""One host-to-device upload per step: numpy arrays packed into pinned memory, copied once.

Data flow: the runner hands `upload([a, b, c])` the step's int64 host arrays (token ids,
positions, slots, seq lens, block-table diffs ...). They are written back to back into one
of two pinned host buffers, copied with one `non_blocking` copy into a persistent device
buffer, and returned as contiguous device views in the same order. The two host buffers
alternate; before a buffer is rewritten, the event recorded after its last copy is awaited,
so a step that does not synchronise (a prefill chunk that samples nothing) never has its
pending copy overwritten. The device buffer is reused every call: kernels that read an
earlier upload were enqueued before the next copy on the same stream, so they run first.
On CPU the arrays become tensors directly (no copy engine to feed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class PinnedStager:
    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity  # int64 elements per upload
        self.device = device
        self._is_cuda = device.type == "cuda"
        if self._is_cuda:
            self._host = [torch.empty(capacity, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._host_np = [h.numpy() for h in self._host]
            self._events: list[torch.cuda.Event | None] = [None, None]
            self._device_buf = torch.empty(capacity, dtype=torch.int64, device=device)
        self._next = 0

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Device int64 copies of `arrays` (1-D), one host-to-device copy in all."""
        total = sum(int(a.size) for a in arrays)
        if total > self.capacity:
            raise ValueError(f"upload of {total} int64 values exceeds the staging capacity {self.capacity}")
        if not self._is_cuda:
            return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).clone() for a in arrays]
        slot = self._next
        self._next ^= 1
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # the copy that last read this host buffer has finished
        host = self._host_np[slot]
        offset = 0
        for a in arrays:
            host[offset : offset + a.size] = a.reshape(-1)
            offset += a.size
        dst = self._device_buf[:total]
        dst.copy_(self._host[slot][:total], non_blocking=True)
        if self._events[slot] is None:
            self._events[slot] = torch.cuda.Event()
        self._events[slot].record()
        views = []
        offset = 0
        for a in arrays:
            views.append(dst[offset : offset + a.size])
            offset += a.size
        return views
