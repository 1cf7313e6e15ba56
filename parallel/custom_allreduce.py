"""A low-latency all-reduce for small tensor-parallel messages between GPUs of one host.

Why: decode runs one all-reduce of a few KB per row-parallel layer; NCCL's fixed cost per message
is several times that of a one-shot all-reduce over peer-mapped NVLink memory (benchmarks/README.md).

Data flow (one call, all on the current stream, so it is CUDA-graph capturable): x (this rank's
partial sum) is copied into this rank's slot of a persistent symmetric buffer (allocated once and
`rendezvous`-ed, so every rank has its peers' slots mapped); one kernel barriers, reads every
peer's slot and sums (one-shot), barriers again so no slot is overwritten while a peer reads it,
and writes the sum back into x (in place, like dist.all_reduce). For larger messages on more than
2 ranks a two-shot variant (reduce-scatter, then all-gather) moves less data per rank. The kernels
are PyTorch's own (`torch.ops.symm_mem.*`, found at run time; without them everything goes to
NCCL); bf16 and fp32, unicast peer loads/stores only (no NVLink multicast).

Setup (`create_custom_allreduce`, switched and sized by KernelOptions) is collective over every
rank of `cpu_group`: each stage (checks, allocation, rendezvous, a self-test) ends with an
agreement, so a failure on any rank sends the whole TP group to NCCL instead of leaving ranks on
different paths (a deadlock). Per call `algorithm_for(x)` depends only on x's shape, dtype and
layout, identical on every rank. Past `max_bytes` the same buffer holds the area of the fused
all-reduce + RMSNorm (parallel/fused_allreduce_norm.py, `.fused`), with its own self-test.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from shardserve.parallel.fused_allreduce_norm import (
    FusedAllReduceNorm,
    area_bytes,
    half_bytes_for,
    prepare_area,
    protocol_for,
)
from shardserve.parallel.options import KernelOptions, kernel_options

logger = logging.getLogger(__name__)

Algorithm = Literal["one_shot", "two_shot"]

DEFAULT_MAX_BYTES = KernelOptions.custom_allreduce_max_bytes  # the symmetric buffer; larger messages use NCCL
DEFAULT_ONE_SHOT_MAX_BYTES = KernelOptions.custom_allreduce_one_shot_max_bytes  # above: > 2 ranks use two-shot
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)  # what PyTorch's symm_mem kernels dispatch on
ALIGN = 16  # x's byte offset must match the buffer's 16-byte alignment; sizes must be 4-byte multiples


# ---- selection (pure: unit-tested on CPU) -------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """max_bytes: largest message taken (the buffer size); one_shot_max_bytes: the largest one-shot
    message when more than 2 ranks can use two-shot."""

    max_bytes: int = DEFAULT_MAX_BYTES
    one_shot_max_bytes: int = DEFAULT_ONE_SHOT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.max_bytes % ALIGN:
            raise ValueError(f"max_bytes must be a non-negative multiple of {ALIGN}, got {self.max_bytes}")


def limits_for(options: KernelOptions) -> Limits:
    """Limits from KernelOptions.custom_allreduce_{max_bytes,one_shot_max_bytes}."""
    max_bytes = -(-max(0, options.custom_allreduce_max_bytes) // ALIGN) * ALIGN  # every dtype view whole
    return Limits(max_bytes=max_bytes, one_shot_max_bytes=max(0, options.custom_allreduce_one_shot_max_bytes))


def choose_algorithm(*, device_type: str, dtype: torch.dtype, nbytes: int, contiguous: bool, byte_offset: int,
                     world_size: int, limits: Limits, has_two_shot: bool) -> tuple[Algorithm | None, str]:
    """(algorithm, "") for a message the custom path takes, else (None, why it goes to NCCL)."""
    if device_type != "cuda":
        return None, "not a CUDA tensor"
    if dtype not in SUPPORTED_DTYPES:
        return None, f"dtype {dtype} unsupported"
    if nbytes == 0:
        return None, "empty"
    if nbytes > limits.max_bytes:
        return None, f"{nbytes} bytes over the {limits.max_bytes}-byte limit"
    if not contiguous:
        return None, "not contiguous"
    if byte_offset % ALIGN or nbytes % 4:
        return None, "misaligned"
    if world_size == 2 or nbytes <= limits.one_shot_max_bytes:
        return "one_shot", ""
    if has_two_shot:
        return "two_shot", ""
    return None, "two-shot op unavailable"


# ---- the torch ops ------------------------------------------------------------------------


@dataclass(frozen=True)
class SymmOps:
    """The torch.ops.symm_mem kernels this torch build has (None: absent)."""

    one_shot_copy_out: Callable[..., Any] | None = None  # (symm_buf, local_input, op, group, out)
    one_shot_out: Callable[..., Any] | None = None  # (symm_buf, op, group, out)
    two_shot_out: Callable[..., Any] | None = None  # (symm_buf, op, group, out); world 2, 4, 8 only
    two_shot_inplace: Callable[..., Any] | None = None  # (symm_buf, op, group)

    @property
    def usable(self) -> bool:
        return self.one_shot_copy_out is not None or self.one_shot_out is not None

    def has_two_shot(self, world_size: int) -> bool:
        return self.two_shot_inplace is not None or (self.two_shot_out is not None and world_size in (2, 4, 8))


def probe_symm_mem_ops(namespace: Any = None) -> SymmOps:
    """Look the kernels up in `namespace` (default torch.ops.symm_mem); missing ones stay None."""
    if namespace is None:
        try:
            import torch.distributed._symmetric_memory  # noqa: F401  (registers the Python side)

            namespace = torch.ops.symm_mem
        except Exception:  # torch without distributed / symmetric memory
            return SymmOps()

    def get(name: str) -> Callable[..., Any] | None:
        try:
            op = getattr(namespace, name)
        except (AttributeError, RuntimeError):
            return None
        return getattr(op, "default", op)  # the overload itself: skips per-call overload resolution

    return SymmOps(one_shot_copy_out=get("one_shot_all_reduce_copy_out"), one_shot_out=get("one_shot_all_reduce_out"),
                   two_shot_out=get("two_shot_all_reduce_out"), two_shot_inplace=get("two_shot_all_reduce_"))


# ---- the communicator ---------------------------------------------------------------------


class CustomAllReduce:
    """All-reduce (sum) over a TP group through a rendezvous-ed symmetric buffer.

    buffer: this rank's flat uint8 symmetric buffer (`limits.max_bytes`, then the fused area if
    any); group_name: the name of the process group it was rendezvous-ed with; fused: the fused
    all-reduce + RMSNorm on the same buffer (None: off). Nothing here allocates or syncs per call.
    """

    def __init__(self, buffer: torch.Tensor, group_name: str, rank: int, world_size: int, ops: SymmOps,
                 limits: Limits, handle: Any = None, fused: FusedAllReduceNorm | None = None) -> None:
        self.buffer = buffer
        self.group_name = group_name
        self.rank = rank
        self.world_size = world_size
        self.ops = ops
        self.limits = limits
        self.handle = handle  # keeps the peer mappings alive
        self.fused = fused
        self.has_two_shot = ops.has_two_shot(world_size)
        self._views = {dtype: buffer.view(dtype) for dtype in SUPPORTED_DTYPES}

    def algorithm_for(self, x: torch.Tensor) -> Algorithm | None:
        """The algorithm this message takes, or None when it must go to NCCL."""
        algorithm, _ = choose_algorithm(
            device_type=x.device.type, dtype=x.dtype, nbytes=x.numel() * x.element_size(),
            contiguous=x.is_contiguous(), byte_offset=x.storage_offset() * x.element_size(),
            world_size=self.world_size, limits=self.limits, has_two_shot=self.has_two_shot)
        return algorithm

    def all_reduce_(self, x: torch.Tensor, algorithm: Algorithm | None = None) -> torch.Tensor:
        """Sum x over the group in place and return it; x must pass `algorithm_for` (or name one)."""
        algorithm = algorithm or self.algorithm_for(x)
        if algorithm is None:
            raise ValueError(f"custom all-reduce cannot take {tuple(x.shape)} {x.dtype} on {x.device}")
        flat = x.view(-1)
        buf = self._views[x.dtype][: flat.numel()]
        ops, name = self.ops, self.group_name
        if algorithm == "one_shot":
            if ops.one_shot_copy_out is not None:  # one kernel: copy-in, barrier, reduce into x, barrier
                ops.one_shot_copy_out(buf, flat, "sum", name, flat)
            else:
                buf.copy_(flat)
                ops.one_shot_out(buf, "sum", name, flat)
        elif ops.two_shot_out is not None and self.world_size in (2, 4, 8):
            buf.copy_(flat)
            ops.two_shot_out(buf, "sum", name, flat)
        else:
            buf.copy_(flat)
            ops.two_shot_inplace(buf, "sum", name)
            flat.copy_(buf)
        return x

    def self_test(self) -> str | None:
        """Reduce known small integers (exact in bf16) with every algorithm in use; None if all match.

        Eager, with host syncs: call at setup only, on every rank of the group together."""
        w, device = self.world_size, self.buffer.device
        algorithms: list[Algorithm] = ["one_shot"] + (["two_shot"] if self.has_two_shot and w > 2 else [])
        cap = min(self.limits.max_bytes // 2, 3 * 2**17 + 8)  # bf16 elements; several blocks per rank
        sizes = sorted({min(n, cap) for n in (2, 4096 + 8, 3 * 2**17 + 8)})
        cases = [(a, n, torch.bfloat16) for a in algorithms for n in sizes] + [("one_shot", 4096, torch.float32)]
        for algorithm, numel, dtype in cases:
            base = torch.arange(numel, device=device) % 13
            x = (base + self.rank).to(dtype)
            self.all_reduce_(x, algorithm)
            expected = (base * w + w * (w - 1) // 2).to(dtype)
            if not torch.equal(x, expected):
                return f"self-test mismatch ({algorithm}, {numel} {dtype} elements)"
        return None

    def close(self) -> None:
        """Drop the buffer and peer mappings (before the process group is destroyed)."""
        self.handle = None
        self.fused = None
        self._views = {}
        self.buffer = torch.empty(0, dtype=torch.uint8)


# ---- collective setup ---------------------------------------------------------------------


DISABLED = "disabled by parallel.custom_allreduce: false"


def static_reason(device: torch.device, world_size: int, ops: SymmOps, limits: Limits,
                  enabled: bool = True) -> str | None:
    """Why this rank cannot use the custom path before touching peers (None: it can try)."""
    if not enabled:
        return DISABLED
    if device.type != "cuda" or not torch.cuda.is_available():
        return "not a CUDA device"
    if world_size < 2:
        return "a single rank"
    if limits.max_bytes == 0:
        return "custom_allreduce_max_bytes is 0"
    if not ops.usable:
        return f"torch {torch.__version__} has no symm_mem one-shot all-reduce op"
    return None


def _gpu_uuid(index: int) -> str | None:
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return None if uuid is None else str(uuid)


def peer_access_reason(device_index: int, peers: Sequence[tuple[int, str, str | None]]) -> str | None:
    """None when every peer (global rank, hostname, GPU uuid) is on this host with P2P access."""
    host = socket.gethostname()
    local = {_gpu_uuid(i): i for i in range(torch.cuda.device_count())}
    mine = _gpu_uuid(device_index)
    for rank, peer_host, uuid in peers:
        if peer_host != host:
            return f"rank {rank} runs on {peer_host}, not {host}"
        if uuid is None or mine is None:
            return "cannot identify GPUs (no device uuid)"
        if uuid == mine:
            continue  # this rank (another rank on the same GPU is caught by the shared-uuid check below)
        if uuid not in local:
            return f"the GPU of rank {rank} is not visible to this process"
        if not torch.cuda.can_device_access_peer(device_index, local[uuid]):
            return f"no peer access from cuda:{device_index} to cuda:{local[uuid]}"
    uuids = [uuid for _, _, uuid in peers]
    if len(set(uuids)) != len(uuids):
        return "two ranks share a GPU"
    return None


def _gather(payload: Any, cpu_group: Any) -> dict[int, Any]:
    """Every rank's payload by global rank (collective over cpu_group)."""
    out: list[Any] = [None] * dist.get_world_size(cpu_group)
    dist.all_gather_object(out, (dist.get_rank(), payload), group=cpu_group)
    return dict(out)


def _agree(reason: str | None, cpu_group: Any, ranks: Sequence[int]) -> str | None:
    """This rank's failure, else the first among `ranks`, else None (every rank of cpu_group must
    call this the same number of times)."""
    reasons = _gather(reason, cpu_group)
    if reason is not None:
        return reason
    failed = [rank for rank in ranks if reasons[rank] is not None]
    return f"rank {failed[0]}: {reasons[failed[0]]}" if failed else None


def _allocate(max_bytes: int, fused_half_bytes: int, fused_protocol: str, device: torch.device) -> torch.Tensor:
    """The symmetric buffer: PyTorch's ops' `max_bytes`, then the fused area in its starting state
    (and synced: a peer may write it as soon as the next agreement has passed)."""
    import torch.distributed._symmetric_memory as symm_mem

    # Only unicast peer loads/stores are used: keep torch from creating NVLink multicast objects
    # (an explicit setting wins).
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    buffer = symm_mem.empty(max_bytes + area_bytes(fused_half_bytes), dtype=torch.uint8, device=device)
    if fused_half_bytes:
        prepare_area(buffer[max_bytes:], fused_protocol)
        torch.cuda.synchronize(device)
    return buffer


def _rendezvous(buffer: torch.Tensor, group_name: str) -> Any:
    import torch.distributed._symmetric_memory as symm_mem

    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None and not hasattr(enable, "__deprecated__"):  # older torch needs the group registered
        enable(group_name)
    return symm_mem.rendezvous(buffer, group_name)


def _check_fused(result: CustomAllReduce, cpu_group: Any, ranks: Sequence[int]) -> None:
    """Self-test the fused area on every rank (collective); unless it is on and passes on all of
    them, every rank drops it (ranks on different paths would wait on each other forever)."""
    has_fused = result.fused is not None
    fused_reason = None if has_fused else "off on this rank"
    protocols = _gather(result.fused.protocol if has_fused else None, cpu_group)
    if len({protocols[r] for r in ranks}) > 1:  # different layouts would wait on each other forever
        fused_reason = f"ranks disagree on the protocol: {sorted({str(protocols[r]) for r in ranks})}"
    if has_fused and fused_reason is None:
        try:
            fused_reason = result.fused.self_test()
        except Exception as e:
            fused_reason = f"fused self-test failed: {e!r}"
            logger.debug("fused all-reduce + RMSNorm self-test error", exc_info=e)
    fused_reason = _agree(fused_reason, cpu_group, ranks)
    if fused_reason is not None and has_fused:
        logger.warning("fused all-reduce + RMSNorm off, the all-reduce and the norm run apart: %s", fused_reason)
        result.fused = None


def create_custom_allreduce(group: Any, ranks: Sequence[int], cpu_group: Any, device: torch.device,
                            limits: Limits | None = None, ops: SymmOps | None = None,
                            options: KernelOptions | None = None) -> CustomAllReduce | None:
    """Set up the custom all-reduce for `group` (global `ranks`), or None: use NCCL.

    Collective over every rank of `cpu_group` (a gloo group containing `ranks`): all of them call
    it together, also ranks of other TP groups. Never raises; a failure is logged once.
    options: the switches and sizes (None: this process's kernel_options()).
    """
    options = options or kernel_options()
    limits = limits or limits_for(options)
    fused_half_bytes = half_bytes_for(options)  # 0: no fused all-reduce + RMSNorm
    fused_protocol = protocol_for(options)
    ops = ops if ops is not None else probe_symm_mem_ops()
    me, world = dist.get_rank(), len(ranks)
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    device = torch.device(device.type, index) if device.type == "cuda" else device
    stage = "checks"
    reason: str | None = None
    error: Exception | None = None  # the exception behind `reason`, logged at debug level
    result: CustomAllReduce | None = None
    try:
        reason = static_reason(device, world, ops, limits, options.custom_allreduce)
        info = None if reason else (socket.gethostname(), _gpu_uuid(index))
        infos = _gather(info, cpu_group)
        if reason is None:
            missing = [r for r in ranks if infos[r] is None]
            peers = [(r, *infos[r]) for r in ranks if infos[r] is not None]
            reason = f"rank {missing[0]} cannot take part" if missing else peer_access_reason(index, peers)
        reason = _agree(reason, cpu_group, ranks)

        stage = "allocation"
        buffer = None
        if reason is None:
            try:
                buffer = _allocate(limits.max_bytes, fused_half_bytes, fused_protocol, device)
            except Exception as e:
                reason, error = f"symmetric allocation failed: {e!r}", e
        reason = _agree(reason, cpu_group, ranks)

        stage = "rendezvous"
        if reason is None:
            try:
                group_name = str(group.group_name)
                handle = _rendezvous(buffer, group_name)
                result = CustomAllReduce(buffer, group_name, ranks.index(me), world, ops, limits, handle)
            except Exception as e:
                reason, error = f"rendezvous failed: {e!r}", e
        if reason is None and fused_half_bytes:
            try:  # a failure leaves only the fused path off (agreed in _check_fused)
                result.fused = FusedAllReduceNorm(handle.buffer_ptrs, limits.max_bytes, fused_half_bytes,
                                                  ranks.index(me), device, fused_protocol)
            except Exception as e:
                logger.warning("fused all-reduce + RMSNorm unavailable on this rank: %r", e)
        reason = _agree(reason, cpu_group, ranks)

        stage = "self-test"
        if reason is None:
            try:
                reason = result.self_test()
            except Exception as e:
                reason, error = f"self-test failed: {e!r}", e
        reason = _agree(reason, cpu_group, ranks)

        stage = "fused self-test"  # a failure here turns off only the fused all-reduce + RMSNorm
        if reason is None:
            _check_fused(result, cpu_group, ranks)
    except Exception as e:  # a failed agreement: the group cannot coordinate, stay on NCCL
        reason, error = f"setup failed during {stage}: {e!r}", e
    if reason is None:
        logger.info("custom all-reduce on for TP ranks %s (up to %d bytes, ops: %s; fused with RMSNorm: %s)",
                    list(ranks), limits.max_bytes, ", ".join(k for k, v in vars(ops).items() if v is not None),
                    f"on ({result.fused.protocol})" if result.fused is not None else "off")
        return result
    if result is not None:
        result.close()
    if reason == DISABLED or reason.endswith("not a CUDA device"):
        logger.info("custom all-reduce off: %s", reason)
    else:
        logger.warning("custom all-reduce off, TP all-reduce uses NCCL: %s", reason)
    if error is not None:
        logger.debug("custom all-reduce setup error", exc_info=error)
    return None
