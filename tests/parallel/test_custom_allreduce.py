"""The custom all-reduce's selection and fallback logic, on CPU (the kernels run on the GPU machine:
benchmarks/allreduce_gpu.py).

Checked here: which messages take one-shot / two-shot / NCCL (`choose_algorithm`), why a rank
cannot use the custom path at all (env switch, no CUDA, torch without the symm_mem ops), how
`CustomAllReduce.all_reduce_` drives each op variant (fake ops emulating 2 ranks holding the same
data), that `tensor_model_parallel_all_reduce` asks the custom path first and falls back to
dist.all_reduce, and, on 2 real gloo ranks, that the setup agreement sends a whole TP group to
NCCL when one of its ranks fails and that gloo groups never set it up.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from parallel_helpers import spawn_ranks
from shardserve.parallel import comm
from shardserve.parallel import custom_allreduce as car
from shardserve.parallel.options import KernelOptions
from shardserve.parallel.state import GroupInfo, ParallelState, get_parallel_state, set_parallel_state

LIMITS = car.Limits(max_bytes=1024 * 1024, one_shot_max_bytes=64 * 1024)


def choose(nbytes: int = 8192, *, device_type: str = "cuda", dtype: torch.dtype = torch.bfloat16,
           contiguous: bool = True, byte_offset: int = 0, world_size: int = 2, has_two_shot: bool = True):
    return car.choose_algorithm(device_type=device_type, dtype=dtype, nbytes=nbytes, contiguous=contiguous,
                                byte_offset=byte_offset, world_size=world_size, limits=LIMITS,
                                has_two_shot=has_two_shot)


# ---- selection ----------------------------------------------------------------------------


def test_small_cuda_message_takes_one_shot() -> None:
    assert choose(8192) == ("one_shot", "")
    assert choose(8192, dtype=torch.float32, world_size=8) == ("one_shot", "")


def test_fallback_reasons() -> None:
    assert choose(device_type="cpu") == (None, "not a CUDA tensor")
    assert choose(LIMITS.max_bytes + 16) == (None, f"{LIMITS.max_bytes + 16} bytes over the 1048576-byte limit")
    assert choose(dtype=torch.float16)[0] is None  # PyTorch's kernels dispatch bf16 and fp32 only
    assert choose(0) == (None, "empty")
    assert choose(contiguous=False) == (None, "not contiguous")
    assert choose(byte_offset=8) == (None, "misaligned")  # the copy-in kernel needs the buffer's alignment
    assert choose(8190) == (None, "misaligned")  # sizes must be 4-byte multiples


def test_large_messages_two_shot_above_two_ranks_only() -> None:
    big = LIMITS.one_shot_max_bytes + 16
    assert choose(big, world_size=2) == ("one_shot", "")  # 2 ranks: same bytes moved, one barrier fewer
    assert choose(big, world_size=4) == ("two_shot", "")
    assert choose(big, world_size=4, has_two_shot=False) == (None, "two-shot op unavailable")
    assert choose(LIMITS.max_bytes, world_size=8) == ("two_shot", "")


def test_limits_from_kernel_options() -> None:
    assert car.limits_for(KernelOptions()) == car.Limits()
    options = KernelOptions(custom_allreduce_max_bytes=1000, custom_allreduce_one_shot_max_bytes=512)
    assert car.limits_for(options) == car.Limits(max_bytes=1008, one_shot_max_bytes=512)  # rounded up to 16
    with pytest.raises(ValueError, match="multiple of 16"):
        car.Limits(max_bytes=1000)


# ---- availability -------------------------------------------------------------------------


def test_installed_torch_has_the_symm_mem_ops() -> None:
    ops = car.probe_symm_mem_ops()
    assert ops.usable and ops.one_shot_copy_out is not None and ops.has_two_shot(4)


def test_missing_ops_are_unusable() -> None:
    ops = car.probe_symm_mem_ops(SimpleNamespace())
    assert ops == car.SymmOps() and not ops.usable and not ops.has_two_shot(2)
    only_inplace = car.probe_symm_mem_ops(SimpleNamespace(one_shot_all_reduce_out=print, two_shot_all_reduce_=print))
    assert only_inplace.usable and only_inplace.has_two_shot(3)
    out_only = car.probe_symm_mem_ops(SimpleNamespace(one_shot_all_reduce_out=print, two_shot_all_reduce_out=print))
    assert out_only.has_two_shot(4) and not out_only.has_two_shot(3)  # its kernel exists for 2, 4, 8 ranks


def test_static_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = car.probe_symm_mem_ops()
    cuda = torch.device("cuda", 0)
    assert car.static_reason(torch.device("cpu"), 2, ops, LIMITS) == "not a CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert car.static_reason(cuda, 2, ops, LIMITS) is None
    assert car.static_reason(cuda, 1, ops, LIMITS) == "a single rank"
    assert "no symm_mem one-shot" in car.static_reason(cuda, 2, car.SymmOps(), LIMITS)
    assert car.static_reason(cuda, 2, ops, car.Limits(max_bytes=0)) == "custom_allreduce_max_bytes is 0"
    assert car.static_reason(cuda, 2, ops, LIMITS, enabled=False) == car.DISABLED
    assert car.static_reason(cuda, 2, ops, LIMITS, enabled=True) is None


# ---- the call paths, with fake ops (2 ranks holding the same data: the sum doubles) --------


class FakeOps:
    """This rank's buffer plus one peer's, the peer holding this rank's values + peer_offset."""

    def __init__(self, peer_offset: float = 0.0) -> None:
        self.peer_offset = peer_offset
        self.calls: list[str] = []

    def _sum(self, buf: torch.Tensor) -> torch.Tensor:
        return buf * 2 + self.peer_offset

    def one_shot_copy_out(self, buf, local, op, group, out):
        assert op == "sum" and group == "tp" and buf.numel() == local.numel()
        buf.copy_(local)
        self.calls.append("one_shot_copy_out")
        return out.copy_(self._sum(buf))

    def one_shot_out(self, buf, op, group, out):
        self.calls.append("one_shot_out")
        return out.copy_(self._sum(buf))

    def two_shot_out(self, buf, op, group, out):
        self.calls.append("two_shot_out")
        return out.copy_(self._sum(buf))

    def two_shot_inplace(self, buf, op, group):
        self.calls.append("two_shot_inplace")
        return buf.copy_(self._sum(buf))


def make_custom(world_size: int = 2, peer_offset: float = 0.0, **present: bool) -> tuple[car.CustomAllReduce, FakeOps]:
    fake = FakeOps(peer_offset)
    names = ("one_shot_copy_out", "one_shot_out", "two_shot_out", "two_shot_inplace")
    ops = car.SymmOps(**{n: getattr(fake, n) if present.get(n, True) else None for n in names})
    buffer = torch.full((LIMITS.max_bytes,), 255, dtype=torch.uint8)  # CPU stand-in for the symmetric buffer
    return car.CustomAllReduce(buffer, "tp", 0, world_size, ops, LIMITS), fake


@pytest.mark.parametrize(("world_size", "algorithm", "present", "expected"), [
    (2, "one_shot", {}, ["one_shot_copy_out"]),
    (2, "one_shot", {"one_shot_copy_out": False}, ["one_shot_out"]),
    (4, "two_shot", {}, ["two_shot_out"]),
    (3, "two_shot", {}, ["two_shot_inplace"]),  # two_shot_out has no 3-rank kernel
    (4, "two_shot", {"two_shot_out": False}, ["two_shot_inplace"]),
])
def test_all_reduce_in_place_through_each_op(world_size: int, algorithm: str, present: dict, expected: list) -> None:
    custom, fake = make_custom(world_size, **present)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    want = x * 2
    assert custom.all_reduce_(x, algorithm) is x
    assert fake.calls == expected and torch.equal(x, want)


def test_self_test_passes_on_right_sums_and_catches_wrong_ones() -> None:
    custom, fake = make_custom(peer_offset=1.0)  # rank 0 of 2; rank 1 holds base + 1
    assert custom.self_test() is None and set(fake.calls) == {"one_shot_copy_out"}
    custom, _ = make_custom(peer_offset=0.0)  # a peer that does not hold base + 1: wrong sums
    assert "self-test mismatch (one_shot" in custom.self_test()


def test_cpu_tensor_cannot_take_the_custom_path() -> None:
    custom, _ = make_custom()
    assert custom.algorithm_for(torch.ones(8)) is None
    with pytest.raises(ValueError, match="cannot take"):
        custom.all_reduce_(torch.ones(8))


# ---- comm wiring --------------------------------------------------------------------------


class RecordingCustom:
    """Stands in for CustomAllReduce: takes messages of at most `limit` elements."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken: list[int] = []

    def algorithm_for(self, x: torch.Tensor) -> str | None:
        return "one_shot" if x.numel() <= self.limit else None

    def all_reduce_(self, x: torch.Tensor, algorithm: str | None = None) -> torch.Tensor:
        self.taken.append(x.numel())
        return x.mul_(2)


def test_comm_asks_the_custom_path_first_then_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    sent_to_nccl: list[int] = []
    monkeypatch.setattr(comm.dist, "all_reduce", lambda x, group=None: sent_to_nccl.append(x.numel()))
    custom = RecordingCustom(limit=4)
    previous = get_parallel_state()
    set_parallel_state(ParallelState(tp=GroupInfo(rank=0, size=2, group=object()), tp_custom_allreduce=custom))
    try:
        small, large = torch.ones(4), torch.ones(5)
        assert comm.tensor_model_parallel_all_reduce(small) is small and small.tolist() == [2.0] * 4
        assert comm.tensor_model_parallel_all_reduce(large) is large
        assert custom.taken == [4] and sent_to_nccl == [5]
        set_parallel_state(ParallelState(tp=GroupInfo(rank=0, size=2, group=object())))  # none set up: NCCL
        comm.tensor_model_parallel_all_reduce(small)
        assert sent_to_nccl == [5, 4]
    finally:
        set_parallel_state(previous)


# ---- collective setup on 2 gloo ranks -----------------------------------------------------


def _setup_on_gloo(state: ParallelState) -> dict:
    import torch.distributed as dist

    out: dict = {"installed": state.tp_custom_allreduce}
    # Agreement: rank 1 fails a stage; its TP group (both ranks) sees it, a group without rank 1 does not.
    mine = "boom" if state.rank == 1 else None
    out["agree_both"] = car._agree(mine, state.cpu_group, (0, 1))
    out["agree_rank0_only"] = car._agree(mine, state.cpu_group, (0,))
    # The whole setup on CPU tensors: every rank returns None (NCCL) together, nothing hangs.
    records: list[str] = []
    car.logger.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = lambda record: records.append(f"{record.levelname} {record.getMessage()}")
    car.logger.addHandler(handler)
    try:
        out["cpu_setup"] = car.create_custom_allreduce(state.tp.group, state.tp.ranks, state.cpu_group,
                                                       torch.device("cpu"))
    finally:
        car.logger.removeHandler(handler)
    out["log"] = records
    dist.barrier(group=state.cpu_group)
    return out


def test_setup_agreement_on_two_gloo_ranks() -> None:
    results = spawn_ranks(_setup_on_gloo, world_size=2, tp=2, pp=1)
    for rank, got in enumerate(results):
        assert got["installed"] is None  # init_parallel sets it up on NCCL only
        assert got["agree_both"] == ("boom" if rank == 1 else "rank 1: boom")
        assert got["agree_rank0_only"] == (None if rank == 0 else "boom")
        assert got["cpu_setup"] is None
        assert got["log"] == ["INFO custom all-reduce off: not a CUDA device"]
