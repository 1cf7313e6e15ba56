"""When each request of a load point is sent: seeded arrival processes, as `vllm bench serve`.

A load point is a request rate (requests/s, `inf` = all at once) or a fixed concurrency (a closed
loop: that many requests in flight, the next sent when one ends). For a rate, `send_offsets`
returns each request's send time in seconds after the start: `constant` spaces them exactly
1/rate apart; `poisson` draws exponential gaps (mean 1/rate); `gamma` draws gamma gaps with shape
`burstiness` and scale 1/(rate x burstiness) — mean 1/rate as well, burstier below 1, smoother
above 1, Poisson at 1 (vLLM's `--burstiness`). numpy's seeded Generator makes a run reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

ARRIVALS = ("constant", "poisson", "gamma")
Arrival = Literal["constant", "poisson", "gamma"]


@dataclass(frozen=True)
class LoadPoint:
    """kind `rate`: value requests/s (math.inf = all at t=0); kind `concurrency`: value requests in flight."""

    kind: Literal["rate", "concurrency"]
    value: float

    @property
    def label(self) -> str:
        if self.kind == "concurrency":
            return f"conc {int(self.value)}"
        return "inf req/s" if math.isinf(self.value) else f"{self.value:g} req/s"

    @property
    def tick(self) -> str:
        """Short axis label: `inf`, `2`, `c8`."""
        if self.kind == "concurrency":
            return f"c{int(self.value)}"
        return "inf" if math.isinf(self.value) else f"{self.value:g}"


@dataclass(frozen=True)
class Schedule:
    """How a rate's requests arrive (the seed also drives the dataset)."""

    arrival: Arrival = "poisson"
    burstiness: float = 1.0
    seed: int = 0


def send_offsets(num_requests: int, rate: float, arrival: Arrival = "poisson", burstiness: float = 1.0,
                 seed: int = 0) -> list[float]:
    """Send times in seconds from the start, non-decreasing, the first at 0."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (or inf), got {rate}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num_requests
    if arrival == "constant":
        gaps = np.full(num_requests - 1, 1.0 / rate)
    else:
        rng = np.random.default_rng(seed)
        shape = 1.0 if arrival == "poisson" else burstiness
        gaps = rng.gamma(shape, 1.0 / (rate * shape), num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
