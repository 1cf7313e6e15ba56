"""The fused all-reduce + RMSNorm around its kernel, on CPU: selection, env switches, the comm and
RMSNorm wiring, and the setup agreement on 2 gloo ranks.

The kernel's protocol (several ranks spinning on each other's flags) and the self-test run
through the interpreter in tests/kernels/test_allreduce_rmsnorm.py; on 2 GPUs the engine with
and without it is compared in test_tp_fused_allreduce_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from parallel_helpers import spawn_ranks
from shardserve.parallel import comm
from shardserve.parallel import custom_allreduce as car
from shardserve.parallel import fused_allreduce_norm as fan
from shardserve.parallel.options import KernelOptions
from shardserve.parallel.state import GroupInfo, ParallelState, get_parallel_state, set_parallel_state
from shardserve.workers.models.layers import RMSNorm


def reason(shape=(4, 4096), *, device_type="cuda", dtype=torch.bfloat16, last_stride=1, residual_shape="same",
           half_bytes=fan.DEFAULT_HALF_BYTES, world_size=2, protocol=fan.DEFAULT_PROTOCOL):
    residual_shape = shape if residual_shape == "same" else residual_shape
    return fan.fused_reason(device_type=device_type, dtype=dtype, shape=shape, last_stride=last_stride,
                            has_residual=residual_shape is not None, residual_shape=residual_shape,
                            half_bytes=half_bytes, world_size=world_size, protocol=protocol)


def test_selection_depends_only_on_shapes() -> None:
    assert reason() is None
    assert reason((256, 4096)) is None  # the default buffer: 256 rows of 4,096 bf16 at 2 ranks
    assert reason((384, 4096), protocol="flags") is None  # flags' two halves hold more
    assert reason((257, 4096)) == "257 rows over the 256-row buffer"
    assert reason((129, 4096), world_size=4) == "129 rows over the 128-row buffer"
    assert reason((64, 4096), dtype=torch.float32) is None and reason((129, 4096), dtype=torch.float32) is not None
    assert reason(device_type="cpu") == "not a CUDA tensor"
    assert reason(dtype=torch.int8) == "dtype torch.int8 unsupported"
    assert reason(last_stride=2) == "not [tokens, hidden] with a contiguous last dim"
    assert reason((4, 8, 512)) == "not [tokens, hidden] with a contiguous last dim"
    assert reason(residual_shape=None) == "no residual of the same shape"
    assert reason(residual_shape=(4, 2048)) == "no residual of the same shape"
    assert reason((0, 4096)) == "empty"
    assert reason(half_bytes=0) == "4 rows over the 0-row buffer"


def test_kernel_option_switches() -> None:
    assert fan.half_bytes_for(KernelOptions()) == fan.DEFAULT_HALF_BYTES
    assert fan.area_bytes(fan.DEFAULT_HALF_BYTES) == fan.FLAG_BYTES + 2 * fan.DEFAULT_HALF_BYTES
    assert fan.half_bytes_for(KernelOptions(fused_allreduce_norm_bytes=1000)) == 1008  # rounded up to 16
    assert fan.half_bytes_for(KernelOptions(fused_allreduce_norm=False)) == 0 and fan.area_bytes(0) == 0


class RecordingFused:
    """Stands in for FusedAllReduceNorm: takes inputs of at most `rows` rows."""

    def __init__(self, rows: int) -> None:
        self.rows, self.calls = rows, 0

    def fits(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        return residual is not None and x.shape[0] <= self.rows

    def __call__(self, x, residual, weight, eps):
        self.calls += 1
        return torch.full_like(x, 7.0), residual + 2 * x  # as if the peer held the same x


class Custom:
    def __init__(self, fused) -> None:
        self.fused, self.reduced = fused, 0

    def algorithm_for(self, x):
        return "one_shot"

    def all_reduce_(self, x, algorithm=None):
        self.reduced += 1
        return x.mul_(2)


def test_rmsnorm_reduce_takes_the_fused_kernel_when_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shardserve.workers.models.layers.use_kernels", lambda x: True)
    monkeypatch.setattr("shardserve.parallel.kernels.rmsnorm.rmsnorm",
                        lambda x, w, eps, residual=None: (x * 0 + 1, x if residual is None else x + residual))
    norm = RMSNorm(8, 1e-6)
    custom = Custom(RecordingFused(rows=2))
    previous = get_parallel_state()
    set_parallel_state(ParallelState(tp=GroupInfo(rank=0, size=2, group=object()), tp_custom_allreduce=custom))
    try:
        x, residual = torch.ones(2, 8), torch.zeros(2, 8)
        out, new_residual = norm(x.clone(), residual, reduce=True)  # fits: one fused call
        assert custom.fused.calls == 1 and custom.reduced == 0 and out.eq(7).all() and new_residual.eq(2).all()
        out, new_residual = norm(torch.ones(3, 8), torch.zeros(3, 8), reduce=True)  # 3 rows: all-reduce, then norm
        assert custom.fused.calls == 1 and custom.reduced == 1 and new_residual.eq(2).all() and out.eq(1).all()
        norm(torch.ones(2, 8), torch.zeros(2, 8))  # not a partial sum: no reduction at all
        assert custom.fused.calls == 1 and custom.reduced == 1
        custom.fused = None  # the group has no fused area: all-reduce, then norm
        norm(torch.ones(2, 8), torch.zeros(2, 8), reduce=True)
        assert custom.reduced == 2
    finally:
        set_parallel_state(previous)


def test_comm_fused_is_none_at_tp1() -> None:
    previous = get_parallel_state()
    set_parallel_state(ParallelState(tp_custom_allreduce=Custom(RecordingFused(rows=8))))  # TP 1
    try:
        assert comm.tensor_model_parallel_all_reduce_rmsnorm(torch.ones(1, 8), torch.ones(1, 8), torch.ones(8),
                                                             1e-6) is None
    finally:
        set_parallel_state(previous)


def _check_fused_on_gloo(state: ParallelState) -> dict:
    class FakeFused:
        protocol = "flags"

        def __init__(self, answer):
            self.answer = answer

        def self_test(self):
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    out = {}
    for case, answer in (("pass", None), ("rank1_fails", "mismatch" if state.rank == 1 else None),
                         ("rank0_raises", RuntimeError("no") if state.rank == 0 else None),
                         ("rank1_off", "skip" if state.rank == 1 else None), ("protocols_differ", None)):
        result = car.CustomAllReduce(torch.zeros(16, dtype=torch.uint8), "g", state.rank, 2, car.SymmOps(),
                                     car.Limits(max_bytes=16), fused=FakeFused(answer))
        if case == "rank1_off" and state.rank == 1:
            result.fused = None
        if case == "protocols_differ" and state.rank == 1:
            result.fused.protocol = "lamport"  # its self-test would wait forever on rank 0's flags
        car._check_fused(result, state.cpu_group, (0, 1))
        out[case] = result.fused is not None
    return out


def test_fused_agreement_on_two_gloo_ranks() -> None:
    for got in spawn_ranks(_check_fused_on_gloo, world_size=2, tp=2, pp=1):
        assert got == {"pass": True, "rank1_fails": False, "rank0_raises": False, "rank1_off": False,
                       "protocols_differ": False}


def test_unaligned_area_is_refused() -> None:
    # The kernel vectorises its peer stores on the promise of 16-byte aligned areas.
    with pytest.raises(ValueError, match="16-byte aligned"):
        fan.FusedAllReduceNorm([4096, 8192 + 8], 0, 1024, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="16-byte aligned"):
        fan.FusedAllReduceNorm([4096], 0, 1000, 0, torch.device("cpu"))
    assert fan.FusedAllReduceNorm([4096, 8192], 16, 1024, 1, torch.device("cpu")).data_ptrs.tolist() == [
        4096 + 16 + fan.FLAG_BYTES, 8192 + 16 + fan.FLAG_BYTES]


def test_protocol_and_starting_state() -> None:
    from shardserve.parallel.kernels.allreduce_rmsnorm import SENTINEL_32

    assert fan.protocol_for(KernelOptions()) == "lamport"  # the default
    assert fan.protocol_for(KernelOptions(fused_allreduce_protocol="flags")) == "flags"
    with pytest.raises(ValueError, match="fused_allreduce_protocol must be one of flags, lamport, got 'pigeon'"):
        fan.protocol_for(KernelOptions(fused_allreduce_protocol="pigeon"))  # type: ignore[arg-type]
    area = torch.full((fan.FLAG_BYTES + 2 * 64,), 7, dtype=torch.uint8)
    fan.prepare_area(area, "flags")
    assert area[: fan.FLAG_BYTES].eq(0).all() and area[fan.FLAG_BYTES:].eq(7).all()  # data: whatever it was
    fan.prepare_area(area, "lamport")
    assert area[fan.FLAG_BYTES:].view(torch.int32).eq(SENTINEL_32).all()
    assert area[fan.FLAG_BYTES:].view(torch.bfloat16).view(torch.int16).eq(-32768).all()  # bf16 -0.0 in every lane
    # Lamport's three buffers hold fewer rows than flags' two halves
    assert reason((171, 4096), protocol="lamport", half_bytes=4 << 20) == "171 rows over the 170-row buffer"
