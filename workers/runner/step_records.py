"""Per-step records of the model runner: timing, the small uploads that ride with a step, and a
launched step waiting to be finished (async scheduling launches step N+1 before finishing N).

`StepTimes` is what the benchmarks read; `StepUploads` names the optional host arrays packed
into the step's single pinned upload; `PendingStep` carries a launched step's sampled ids (still
on the device) and what `ModelRunner.finish` needs to build its ModelRunnerOutput.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from shardserve.workers.step_types import ModelRunnerOutput, TokenLogprobs


@dataclass
class StepTimes:
    """Per-step timing, collected only while `enabled` (CUDA events cost a little). The host
    times are kept on every device; gpu_s and gap_s on CUDA only."""

    enabled: bool = False
    host_s: list[float] = field(default_factory=list)  # launch() + finish() wall time minus the wait for the GPU
    wait_s: list[float] = field(default_factory=list)  # blocked on the sampled ids
    gpu_s: list[float] = field(default_factory=list)  # first upload -> sampled ids, on the GPU
    launch_s: list[float] = field(default_factory=list)  # launch() wall time alone (inputs, replay, sampler)
    replay_s: list[float] = field(default_factory=list)  # host time of a decode graph's replay call
    # decode-graph steps: launch() start -> the replay call (input preparation and upload: the
    # host work the device waits for when the host is late)
    prep_s: list[float] = field(default_factory=list)
    # worker ranks (proc.py's overlapped loop): the last finish (output sent) -> the driver's
    # next step message in: the driver's turnaround as this rank sees it, on the host's critical
    # path (in steady state: N finished after N+1's launch -> N+2 in, before the device is done with N+1)
    driver_s: list[float] = field(default_factory=list)
    # GPU time from the previous timed step's sampled ids to this step's first upload: ~0 when the
    # host keeps the device fed, the device's idle time when the host is late (CUDA events)
    gap_s: list[float] = field(default_factory=list)
    # Per non-empty step, in order: requests and tokens scheduled (the three lists above only
    # cover steps that sample; these cover every step, for per-step traces).
    rows: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    graph_steps: int = 0  # decode graphs
    mixed_graph_steps: int = 0  # token-count graphs (steps with prefill tokens)
    eager_steps: int = 0
    # verify steps run as decode rows (verify_decode.py), graph or eager; counted in the two above too
    verify_decode_steps: int = 0
    last_end: torch.cuda.Event | None = None  # the previous timed step's end event (for gap_s)

    def clear(self) -> None:
        self.host_s.clear()
        self.wait_s.clear()
        self.gpu_s.clear()
        self.launch_s.clear()
        self.replay_s.clear()
        self.prep_s.clear()
        self.driver_s.clear()
        self.gap_s.clear()
        self.last_end = None
        self.rows.clear()
        self.tokens.clear()
        self.graph_steps = self.mixed_graph_steps = self.eager_steps = self.verify_decode_steps = 0


@dataclass
class StepUploads:
    """Small per-step host arrays that ride with the step's single upload (None: not needed
    this step); `bind` maps the device views that came back onto the same names."""

    sample_tokens: np.ndarray | None = None  # token rows that sample, when not simply 0..n-1
    placeholder_index: np.ndarray | None = None  # token positions fed PLACEHOLDER (async)
    placeholder_rows: np.ndarray | None = None  # their persistent rows
    sample_rows: np.ndarray | None = None  # persistent rows that sample (async: last_sampled)
    # verify steps (async): per sampling request the index of its last sample (the draw after its
    # last draft), which last_sampled keeps for the next step's PLACEHOLDER; sample_rows then has one row each
    sample_last: np.ndarray | None = None

    _NAMES = ("sample_tokens", "placeholder_index", "placeholder_rows", "sample_rows", "sample_last")

    def arrays(self) -> list[np.ndarray]:
        return [a for a in (getattr(self, n) for n in self._NAMES) if a is not None]

    def bind(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        names = [n for n in self._NAMES if getattr(self, n) is not None]
        return dict(zip(names, views, strict=True))


@dataclass
class PendingStep:
    """A launched step: what `finish` needs once the sampled ids are read back.

    output: the ModelRunnerOutput so far (prompt logprobs); complete when `token_ids` is None.
    token_ids: [num_sampling] int64 on the device, logits order. request_ids / sample_rows: the
    sampling requests and their persistent rows at launch, same order.
    drafts: speculative steps only: per sampling request its draft tokens; such a request has
    1 + len(drafts) consecutive entries in token_ids / sample_rows (the target's token at the
    last known token and at each draft), the others one.
    """

    output: ModelRunnerOutput
    seq: int = -1  # launch number
    token_ids: torch.Tensor | None = None
    request_ids: list[str] = field(default_factory=list)
    sample_rows: np.ndarray | None = None
    logprobs: list[TokenLogprobs | None] | None = None
    has_penalties: bool = False
    drafts: list[tuple[int, ...]] | None = None
    # Async scheduling on CUDA: the ids' copy to pinned host memory, issued right after the
    # sampler, and the event that marks it done (a `.tolist()` at finish would be queued behind
    # the steps launched since, and wait for them too).
    host_token_ids: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    host_s: float = 0.0  # launch wall time
    timed: bool = False  # launched while step_times was enabled
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
