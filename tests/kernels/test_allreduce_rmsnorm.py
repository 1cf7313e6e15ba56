"""All-reduce fused with residual-add RMSNorm: W simulated ranks, one thread each, real flag protocol.

Each simulated rank has its own data and flag area (plain tensors here; symmetric memory on
GPUs) and launches the kernel from its own thread (on its own stream on a GPU), so a rank's
programs really spin on the other ranks' flag stores. The result must equal the unfused path:
the sum over ranks (fp32, rank order, rounded) followed by the `rmsnorm` kernel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from compiled_ptx import compile_ptx, memory_ops
from kernel_env import DEVICE
from shardserve.parallel.kernels import allreduce_rmsnorm as ar
from shardserve.parallel.kernels.rmsnorm import rmsnorm

HALF_BYTES = 4 * 1024  # small on purpose: at H 48 fp32 and W 2, 10 rows per call


@pytest.fixture(autouse=True)
def _interpreter_launches_from_threads(monkeypatch):
    """Make Triton's interpreter safe for one launching thread per simulated rank.

    It keeps the running program's grid index in one global builder (made thread-local here)
    and patches triton.language for the duration of each launch, restoring it at the end (made
    shared here: patched by the first launch in flight, restored by the last)."""
    if DEVICE != "cpu":
        return
    from triton.runtime import interpreter

    local = threading.local()
    for name in ("grid_idx", "grid_dim"):
        monkeypatch.setattr(interpreter.InterpreterBuilder, name,
                            property(lambda self, n=name: getattr(local, n, None),
                                     lambda self, value, n=name: setattr(local, n, value)), raising=False)
    lock, scopes, launches = threading.Lock(), [], [0]
    real_patch, real_call = interpreter._patch_lang, interpreter.GridExecutor.__call__

    class Deferred:  # what a launch restores: nothing until the last launch in flight ends
        def restore(self) -> None:
            pass

    def patch(fn):
        with lock:
            scopes.append(real_patch(fn))
        return Deferred()

    def call(self, *args, **kwargs):
        with lock:
            launches[0] += 1
        try:
            return real_call(self, *args, **kwargs)
        finally:
            with lock:
                launches[0] -= 1
                if launches[0] == 0:
                    while scopes:
                        scopes.pop().restore()  # newest first: the last one restores the originals

    monkeypatch.setattr(interpreter, "_patch_lang", patch)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)


class SimulatedGroup:
    """W ranks' buffers, flags and counters on one device; `call` runs one collective call."""

    def __init__(self, world_size: int, device: torch.device, half_bytes: int = HALF_BYTES,
                 protocol: str = "flags") -> None:
        self.world_size, self.half_bytes, self.protocol = world_size, half_bytes, protocol
        self.data = [torch.zeros(2 * half_bytes, dtype=torch.uint8, device=device) for _ in range(world_size)]
        if protocol == "lamport":  # every slot starts as "not yet written"
            for area in self.data:
                area.view(torch.int32).fill_(ar.SENTINEL_32)
        self.flags = [torch.zeros(ar.NUM_PROGRAMS * world_size, dtype=torch.int64, device=device)
                      for _ in range(world_size)]
        self.counters = [torch.zeros(ar.NUM_COUNTERS, dtype=torch.int64, device=device) for _ in range(world_size)]
        self.data_ptrs = torch.tensor([d.data_ptr() for d in self.data], dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor([f.data_ptr() for f in self.flags], dtype=torch.int64, device=device)
        self.streams = [torch.cuda.Stream(device) for _ in range(world_size)] if device.type == "cuda" else None

    def call(self, xs: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        results: list = [None] * self.world_size
        errors: list[BaseException] = []

        def run(rank: int) -> None:
            try:
                launch: Callable[[], tuple[torch.Tensor, torch.Tensor]] = lambda: ar.allreduce_rmsnorm(  # noqa: E731
                    xs[rank], residual, weight, eps, rank=rank, world_size=self.world_size,
                    data_ptrs=self.data_ptrs, flag_ptrs=self.flag_ptrs, counters=self.counters[rank],
                    half_bytes=self.half_bytes, protocol=self.protocol)
                if self.streams is None:
                    results[rank] = launch()
                else:
                    with torch.cuda.stream(self.streams[rank]):
                        results[rank] = launch()
                    self.streams[rank].synchronize()
            except BaseException as e:  # surfaced below
                errors.append(e)

        if self.streams is not None:  # compile and load once, before any rank spins (see compile_only)
            for rank in range(self.world_size):
                ar.allreduce_rmsnorm(xs[rank], residual, weight, eps, rank=rank, world_size=self.world_size,
                                     data_ptrs=self.data_ptrs, flag_ptrs=self.flag_ptrs,
                                     counters=self.counters[rank], half_bytes=self.half_bytes,
                                     protocol=self.protocol, compile_only=True)
        threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a simulated rank hangs (flag protocol)"
        if errors:
            raise errors[0]
        return results


def expected(xs: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    total = xs[0].float()
    for x in xs[1:]:
        total = total + x.float()  # rank order, as the kernel sums
    return rmsnorm(total.to(xs[0].dtype), weight, eps, residual)


@pytest.mark.parametrize("protocol", ar.PROTOCOLS)
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_sum_then_rmsnorm_over_calls(device, world_size, dtype, protocol):
    hidden = 48  # not a power of two: masked lanes
    group = SimulatedGroup(world_size, device, protocol=protocol)
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype=dtype, device=device)
    # Several calls in a row: both parities, more rows than programs (33 -> 2 rows per program),
    # a single row, and with / without residual.
    for num_tokens, with_residual in [(1, True), (5, True), (33, True), (3, False), (1, True)]:
        if num_tokens > ar.rows_capacity(HALF_BYTES, world_size, hidden, torch.empty(0, dtype=dtype).element_size(),
                                         protocol):
            continue
        xs = [(2 * torch.randn(num_tokens, hidden)).to(dtype=dtype, device=device) for _ in range(world_size)]
        for x in xs:
            x[0, :3] = -0.0  # bf16's Lamport sentinel: pushed as +0.0, the same value
        residual = torch.randn(num_tokens, hidden).to(dtype=dtype, device=device) if with_residual else None
        ref_out, ref_residual = expected(xs, residual, weight, 1e-6)
        results = group.call(xs, residual, weight, 1e-6)
        for out, new_residual in results:
            if dtype == torch.bfloat16 and DEVICE == "cpu":
                # The interpreter's fp32 -> bf16 cast truncates where torch rounds to nearest
                # even: the sum and the residual add, each rounded, may differ by one bf16 ulp
                # each (compiled, the results are exact; the fp32 cases check exactness here).
                torch.testing.assert_close(new_residual, ref_residual, atol=2**-5, rtol=2**-6)
                torch.testing.assert_close(out, ref_out, atol=1.6e-2, rtol=2**-6)
            else:
                assert torch.equal(new_residual, ref_residual)
                assert torch.equal(out, ref_out)
        for out, new_residual in results[1:]:  # every rank holds the same bits
            assert torch.equal(out, results[0][0]) and torch.equal(new_residual, results[0][1])
    counts = {int(c[: ar.NUM_PROGRAMS].unique().item()) for c in group.counters}
    assert len(counts) == 1  # every program of every rank counted every call


@pytest.mark.parametrize("protocol", ar.PROTOCOLS)
def test_calls_of_different_widths_and_dtypes_in_one_group(device, protocol):
    # The setup's self-test runs widths 4,096, 576 and 1,024 (bf16) before the model's own calls
    # (its width, maybe fp32): whatever a call leaves in the buffers must not leak into a later
    # call of another shape. Lamport clears what the previous call wrote, so that clear must
    # cover the previous call's bytes, not this call's layout.
    group = SimulatedGroup(2, device, half_bytes=16 * 1024, protocol=protocol)
    for step, (num_tokens, hidden, dtype) in enumerate([(1, 512, torch.bfloat16), (3, 48, torch.bfloat16),
                                                        (2, 256, torch.float32), (1, 512, torch.bfloat16),
                                                        (3, 48, torch.bfloat16), (2, 256, torch.float32),
                                                        (1, 512, torch.bfloat16)]):
        torch.manual_seed(step)
        xs = [torch.randint(-8, 8, (num_tokens, hidden)).to(dtype=dtype, device=device) for _ in range(2)]
        residual = torch.randint(-4, 4, (num_tokens, hidden)).to(dtype=dtype, device=device)
        weight = torch.ones(hidden, dtype=dtype, device=device)
        _, ref_residual = expected(xs, residual, weight, 1e-6)  # small integers: exact in every dtype
        for _, new_residual in group.call(xs, residual, weight, 1e-6):
            assert torch.equal(new_residual, ref_residual), f"call {step} ({num_tokens} x {hidden} {dtype})"
        if protocol == "lamport":  # only this call's buffer may hold data; the other two are clear
            third = ar.slot_area_bytes(group.half_bytes, "lamport")
            current = (step + 1) % 3
            for area in group.data:
                for b in {0, 1, 2} - {current}:
                    words = area[b * third:(b + 1) * third].view(torch.int32)
                    assert words.eq(ar.SENTINEL_32).all(), f"call {step}: buffer {b} not cleared"


@pytest.mark.parametrize("protocol", ar.PROTOCOLS)
def test_strided_rows_and_rank_identical_outputs(device, protocol):
    # x as a row view of a wider buffer (the GEMM output may be a slice); every rank must end
    # with the same bits, which the next layer's replicated weights rely on.
    group = SimulatedGroup(2, device, protocol=protocol)
    wide = [torch.randn(4, 100, device=device) for _ in range(2)]
    xs = [w[:, 10:58] for w in wide]
    residual = torch.randn(4, 48, device=device)
    weight = torch.randn(48, device=device)
    (out0, res0), (out1, res1) = group.call(xs, residual, weight, 1e-5)
    assert torch.equal(out0, out1) and torch.equal(res0, res1)
    ref_out, ref_residual = expected(xs, residual, weight, 1e-5)
    assert torch.equal(out0, ref_out) and torch.equal(res0, ref_residual)


def test_rejects_more_rows_than_the_buffer_holds(device):
    group = SimulatedGroup(2, device)
    hidden = 48
    cap = ar.rows_capacity(HALF_BYTES, 2, hidden, 4)
    x = torch.randn(cap + 1, hidden, device=device)
    with pytest.raises(ValueError, match="rows exceed"):
        ar.allreduce_rmsnorm(x, None, torch.ones(hidden, device=device), 1e-6, rank=0, world_size=2,
                             data_ptrs=group.data_ptrs, flag_ptrs=group.flag_ptrs, counters=group.counters[0],
                             half_bytes=HALF_BYTES)
    assert int(group.counters[0].sum()) == 0  # refused before launching: the counters did not move


def test_rejects_wrong_weight(device):
    group = SimulatedGroup(1, device)
    with pytest.raises(ValueError, match="weight"):
        ar.allreduce_rmsnorm(torch.randn(2, 8, device=device), None, torch.ones(9, device=device), 1e-6, rank=0,
                             world_size=1, data_ptrs=group.data_ptrs, flag_ptrs=group.flag_ptrs,
                             counters=group.counters[0], half_bytes=HALF_BYTES)


if DEVICE == "cpu":
    def test_interpreter_threads_really_wait():
        # A rank alone in a 2-rank group must not finish: its programs spin on the missing peer's flags.
        group = SimulatedGroup(2, torch.device("cpu"))
        done = threading.Event()

        def lonely() -> None:
            ar.allreduce_rmsnorm(torch.randn(1, 48), None, torch.ones(48), 1e-6, rank=0, world_size=2,
                                 data_ptrs=group.data_ptrs, flag_ptrs=group.flag_ptrs, counters=group.counters[0],
                                 half_bytes=HALF_BYTES)
            done.set()

        threading.Thread(target=lonely, daemon=True).start()
        assert not done.wait(timeout=2.0)
        group.flags[0][1] = 10**9  # the peer's "signal" for program 0: the waiting rank may now go on
        assert done.wait(timeout=60)


@pytest.mark.parametrize("protocol", ar.PROTOCOLS)
def test_self_test_of_the_setup(monkeypatch, protocol):
    # parallel/fused_allreduce_norm.py's setup self-test, one rank (its own peer): the kernel's
    # result must equal all-reduce-then-rmsnorm bit for bit, and a wrong kernel must be caught.
    from shardserve.parallel import fused_allreduce_norm as fan

    half = 64 * 1024
    buffer = torch.zeros(fan.FLAG_BYTES + 2 * half, dtype=torch.uint8, device=DEVICE)
    fan.prepare_area(buffer, protocol)
    monkeypatch.setattr(fan, "fused_reason", lambda **kw: None if kw["shape"][0] * kw["shape"][1] <= 4096 else "big")
    fused = fan.FusedAllReduceNorm([buffer.data_ptr()], 0, half, 0, torch.device(DEVICE), protocol)
    assert fused.self_test() is None
    assert fused.counters[: ar.NUM_PROGRAMS].tolist() == [2] * ar.NUM_PROGRAMS  # (1 x 4096), (3 x 576) ran

    class Wrong(fan.FusedAllReduceNorm):
        def __call__(self, *args, **kwargs):
            out, new_residual = super().__call__(*args, **kwargs)
            return out, new_residual + 1

    fan.prepare_area(buffer, protocol)
    wrong = Wrong([buffer.data_ptr()], 0, half, 0, torch.device(DEVICE), protocol)
    assert "self-test mismatch (1 x 4096)" in wrong.self_test()


def _compiled_ops(protocol: str) -> dict[str, int]:
    """Memory instructions of the kernel compiled for an H100 (sm_90), at hidden 4096 bf16 (no GPU needed)."""
    pointers = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16",
                "new_residual_ptr": "*bf16", "data_ptrs": "*i64", "flag_ptrs": "*i64", "counter_ptr": "*i64"}
    constexprs = {"WORLD": 2, "WORLD_PAD": 2, "HAS_RESIDUAL": True, "BLOCK": 4096, "BITS": 16, "PROGRAMS": ar.NUM_PROGRAMS,
                  "CLEAR_BLOCK": 1024}
    # what a launch at hidden 4096 bf16 specialises as divisible by 16
    aligned = set(pointers) | {"hidden_size", "max_rows", "half_stride", "third_stride", "region_stride", "stride_x",
                               "stride_r", "stride_o", "stride_nr", "region_words", "third_words"}
    kernel = "_allreduce_rmsnorm_kernel" if protocol == "flags" else "_allreduce_rmsnorm_lamport_kernel"
    ptx = compile_ptx(ar.__name__, kernel, pointers=pointers, constexprs=constexprs, aligned=aligned,
                      floats={"eps"}, num_warps=8)
    return memory_ops(ptx)


@pytest.mark.parametrize("protocol", ar.PROTOCOLS)
def test_peer_traffic_compiles_to_16_byte_accesses(protocol):
    # The data areas' addresses come out of an int64 table, which tells Triton nothing about their
    # alignment: without the kernels' `multiple_of` hints every peer store and slot load compiled
    # to 2-byte scalars (4,096 NVLink writes per 8 KB row).
    ops = _compiled_ops(protocol)
    scalar_16bit = {op: n for op, n in ops.items() if op.endswith(".b16") and op.startswith(("ld.global", "st.global"))}
    assert not scalar_16bit, f"2-byte global accesses: {scalar_16bit}"
    if protocol == "flags":
        # per thread: x, residual, weight and 2 slot loads; 2 peer pushes and 2 outputs, 16 bytes each
        assert ops.get("st.global.v4.b32", 0) >= 4 and ops.get("ld.global.v4.b32", 0) >= 5, ops
        assert "atom.global.sys.release.exch.b64" in ops and "ld.global.sys.acquire.b64" in ops, ops
    else:
        # polled slots are volatile 16-byte loads; no flag atomics and no fences at all
        assert ops.get("ld.volatile.global.v4.b32", 0) >= 2, ops
        assert not [op for op in ops if op.startswith("atom")] and ops["fence/membar"] == 0, ops
