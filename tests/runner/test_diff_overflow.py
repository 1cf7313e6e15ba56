"""Block-table diffs that outgrow the step's staging buffer are uploaded in chunks first.

Aborting many running requests moves the last rows into the holes, and each move rewrites the
moved row's whole block table; those diffs wait for the next step's single upload. Found on
the GPU (400 running requests with 400-token contexts aborted at once): the next step's upload
exceeded the staging capacity and the step raised. The runner now applies oversized diffs in
separate chunks before the step's upload (ModelRunner._take_diffs).
"""

from __future__ import annotations

import numpy as np
from shardserve.workers.config import EngineConfig, ModelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams


def test_mass_abort_then_refill_keeps_the_device_table_in_step() -> None:
    config = EngineConfig(model=ModelConfig(model="dummy:tiny-llama", device="cpu", dtype="float32", max_model_len=512),
                          scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=256))
    engine = LLMEngine(config)
    runner = engine.runner
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    def add(prefix: str, count: int, prompt_len: int) -> None:
        for i in range(count):
            engine.add_request(f"{prefix}{i}", [int(t) for t in rng.integers(10, 250, prompt_len)], params)

    add("a", 128, 100)  # 7 blocks of 16 each
    while runner.batch.num_rows < 128 or engine.scheduler.waiting:
        engine.step()
    for i in range(127):  # oldest first: every abort moves the last row into the hole
        engine.abort_request(f"a{i}")
    add("b", 100, 20)
    diff_sizes: list[int] = []
    pending_diffs = runner.batch.pending_diffs

    def recorded() -> tuple[np.ndarray, np.ndarray]:
        index, values = pending_diffs()
        diff_sizes.append(2 * index.size)
        return index, values

    runner.batch.pending_diffs = recorded  # type: ignore[method-assign]
    for _ in range(3):
        engine.step()
    # The removals land in the next step, with the new requests' ~250 tokens beside them.
    assert max(diff_sizes) + 250 > runner.stager.capacity, "the case no longer overflows the staging buffer"
    rows = runner.batch.num_rows
    np.testing.assert_array_equal(runner.batch.block_table_device[:rows].numpy(), runner.batch.block_table[:rows])
    for _ in range(5):  # and it still generates
        assert engine.step()
