"""Custom (symmetric-memory) all-reduce vs NCCL on the GPUs of one host: correctness and latency.

    torchrun --nproc-per-node 2 benchmarks/allreduce_gpu.py
    torchrun --nproc-per-node 2 benchmarks/allreduce_gpu.py --sizes 8K,64K,256K,1M,4M --ops 64 --replays 100

Needs `import shardserve.parallel...` to work (PYTHONPATH). Leaves the environment alone (NVLink
multicast stays off: the custom path only uses unicast peer loads / stores).

What it does, per size (bf16 tensors shaped [size / 8 KB, 4096], i.e. that many tokens of a
4096-wide hidden state):
  1. NCCL first, for every size: eager (200 back-to-back calls) and inside a CUDA graph (`--ops`
     all-reduces captured in one graph, replayed `--replays` times); per-op microseconds, the
     maximum over ranks. This table is printed before the custom path runs, so it survives any
     failure or hang of the custom path.
  2. The custom path as the engine sets it up (`create_custom_allreduce`, the algorithm
     `algorithm_for` picks): correctness against NCCL on random data (a chain of 16 all-reduces
     with rank-dependent updates in between, eagerly and replayed from a captured graph with
     fresh inputs), then the same timings. The other algorithm (two-shot at 2 ranks) is checked
     and timed in a graph too, for tuning. Tolerance: exact (torch.equal) at 2 ranks, where both
     sides compute one correctly rounded a + b per element; at more ranks the summation order
     differs: |diff| <= 2^-6 |ref| + 1e-2. An fp32 message (64 KB) is checked as well.
Any exception of the custom path is printed with its traceback and the run goes on. A watchdog
ends the run (exit 3) after --timeout seconds, in case a custom kernel waits forever on a peer.

Exit status (the same on every rank): 0 when every custom check that ran matched NCCL, 1 when
one did not or raised, 2 when the custom path could not be set up (reason printed), 3 timeout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

NVLS_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
HIDDEN = 4096
CHAIN = 16  # all-reduces per correctness chain


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def fmt_size(nbytes: int) -> str:
    return f"{nbytes // (1024 * 1024)} MB" if nbytes >= 1024 * 1024 else f"{nbytes // 1024} KB"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.cpu_group = dist.new_group(backend="gloo")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.failures: list[str] = []

    def log(self, *parts: object) -> None:
        if self.rank == 0:
            print(*parts, flush=True)

    def error(self, what: str) -> None:
        """Print the current exception on every rank and record the failure."""
        print(f"[rank {self.rank}] custom path failed: {what}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        self.failures.append(what)

    def sync(self) -> None:
        torch.cuda.synchronize()
        dist.barrier(group=self.cpu_group)  # host-only barrier: no GPU work queued behind it

    def max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return float(t.item())

    def all_ok(self, ok: bool) -> bool:
        t = torch.tensor([int(ok)])
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return bool(t.item())

    # ---- timing ------------------------------------------------------------------------------

    def time_eager(self, fn: Callable[[torch.Tensor], object], t: torch.Tensor) -> float:
        """Per-op microseconds of `iters` back-to-back eager calls (max over ranks)."""
        for _ in range(10):
            fn(t)
        self.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.args.eager_iters):
            fn(t)
        end.record()
        end.synchronize()
        return self.max_over_ranks(start.elapsed_time(end) * 1e3 / self.args.eager_iters)

    def time_graph(self, fn: Callable[[torch.Tensor], object], t: torch.Tensor) -> float:
        """Per-op microseconds of `ops` calls captured in one graph, replayed `replays` times."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the default stream, as before any capture
            for _ in range(3):
                fn(t)
        torch.cuda.current_stream().wait_stream(side)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.args.ops):
                fn(t)
        self.sync()
        graph.replay()
        self.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.args.replays):
            graph.replay()
        end.record()
        end.synchronize()
        per_op = start.elapsed_time(end) * 1e3 / (self.args.replays * self.args.ops)
        del graph
        return self.max_over_ranks(per_op)

    # ---- correctness -------------------------------------------------------------------------

    def random(self, nbytes: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(1000 * seed + self.rank)
        rows = max(1, nbytes // (HIDDEN * dtype.itemsize))
        return torch.randn(rows, HIDDEN, generator=gen, device=self.device).to(dtype)

    def matches(self, got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
        diff = (got.float() - want.float()).abs()
        max_diff = float(diff.max().item())
        if self.world == 2:
            return torch.equal(got, want), max_diff
        return bool((diff <= want.float().abs() * 2**-6 + 1e-2).all().item()), max_diff

    def check(self, custom, nbytes: int, dtype: torch.dtype, algorithm: str) -> str:
        """A chain of CHAIN all-reduces, each followed by y = y / 2 + (rank-dependent noise), through
        the custom path vs through NCCL: once eagerly, and replayed twice with fresh inputs from
        one captured graph (so the graph must read its input). Back-to-back calls would expose a
        rank overwriting its buffer while a peer still reads it. Returns a short verdict."""
        noise = [self.random(nbytes, dtype, seed=10 + k) for k in range(CHAIN)]

        def chain(reduce: Callable[[torch.Tensor], object], y: torch.Tensor) -> torch.Tensor:
            for k in range(CHAIN):
                reduce(y)
                y.mul_(0.5).add_(noise[k])
            return y

        def custom_reduce(y: torch.Tensor) -> None:
            custom.all_reduce_(y, algorithm)

        x = self.random(nbytes, dtype, seed=1)
        verdicts = [self.matches(chain(custom_reduce, x.clone()), chain(dist.all_reduce, x.clone()))]
        static = torch.zeros_like(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain(custom_reduce, static)  # warm-up before capture
        torch.cuda.current_stream().wait_stream(side)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(custom_reduce, static)
        for seed in (2, 3):
            x = self.random(nbytes, dtype, seed)
            static.copy_(x)
            graph.replay()
            verdicts.append(self.matches(static, chain(dist.all_reduce, x.clone())))
        del graph
        ok = self.all_ok(all(v for v, _ in verdicts))
        worst = self.max_over_ranks(max(d for _, d in verdicts))
        if not ok:
            self.failures.append(f"{fmt_size(nbytes)} {dtype} {algorithm}: mismatch (max |diff| {worst:.3g})")
        return ("exact" if worst == 0 else f"ok, max |diff| {worst:.2g}") if ok else f"MISMATCH {worst:.3g}"


def start(args: argparse.Namespace, waits: str) -> Bench:
    """A torchrun rank: the watchdog (exit 3 after args.timeout s, in case `waits` forever on a
    peer), this rank's GPU, the NCCL group, logging; returns the Bench."""
    def watchdog() -> None:
        time.sleep(args.timeout)
        print(f"watchdog: no result after {args.timeout:.0f} s ({waits} waiting on a peer?); exiting with status 3",
              file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    bench = Bench(args)
    logging.basicConfig(level=logging.INFO, format=f"[rank {bench.rank}] %(levelname)s %(name)s: %(message)s")
    return bench


def header(bench: Bench) -> None:
    names: list[object] = [None] * bench.world
    dist.all_gather_object(names, (bench.rank, torch.cuda.get_device_name(), os.environ.get("CUDA_VISIBLE_DEVICES")),
                           group=bench.cpu_group)
    nccl = torch.cuda.nccl.version()
    nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    bench.log(f"torch {torch.__version__}, NCCL {nccl}, {bench.world} ranks")
    for rank, name, visible in names:
        bench.log(f"  rank {rank}: {name} (CUDA_VISIBLE_DEVICES={visible})")
    if bench.world >= 2 and torch.cuda.device_count() >= 2:
        bench.log(f"  peer access cuda:0 -> cuda:1: {torch.cuda.can_device_access_peer(0, 1)}")
    bench.log("  " + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in NVLS_ENV))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8K,64K,256K,1M,4M", help="message sizes in bytes (K / M suffixes)")
    parser.add_argument("--ops", type=int, default=64, help="all-reduces captured in one graph")
    parser.add_argument("--replays", type=int, default=100, help="graph replays timed")
    parser.add_argument("--eager-iters", type=int, default=200, help="eager calls timed")
    parser.add_argument("--timeout", type=float, default=150.0, help="watchdog: exit 3 after this many seconds")
    args = parser.parse_args()
    t0 = time.perf_counter()
    bench = start(args, "a custom kernel")
    from shardserve.parallel import custom_allreduce as car

    car.logger.setLevel(logging.DEBUG)  # setup errors with their traceback
    header(bench)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    dtype = torch.bfloat16

    # 1. NCCL alone, for every size, before anything custom runs.
    nccl: dict[int, tuple[float, float]] = {}
    for nbytes in sizes:
        t = torch.zeros(max(1, nbytes // (HIDDEN * 2)), HIDDEN, dtype=dtype, device=bench.device)
        nccl[nbytes] = (bench.time_eager(dist.all_reduce, t), bench.time_graph(dist.all_reduce, t))
    bench.log(f"\nNCCL all-reduce, bf16, per-op us (max over ranks; graph: {args.ops} ops x {args.replays} replays)")
    bench.log("| size | eager | graph |\n|---|---|---|")
    for nbytes, (eager, graph) in nccl.items():
        bench.log(f"| {fmt_size(nbytes)} | {eager:.1f} | {graph:.1f} |")

    # 2. The custom path, set up the way the engine does it.
    ops = car.probe_symm_mem_ops()
    bench.log("\ntorch.ops.symm_mem: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in vars(ops).items()))
    custom = None
    try:
        custom = car.create_custom_allreduce(dist.group.WORLD, list(range(bench.world)), bench.cpu_group, bench.device)
    except Exception:
        bench.error("create_custom_allreduce raised")
    if not bench.all_ok(custom is not None):
        bench.log("\nCUSTOM ALL-REDUCE UNAVAILABLE (reason in the log above); NCCL numbers only.")
        status = 2
    else:
        bench.log(f"custom all-reduce up: limit {custom.limits.max_bytes} bytes, one-shot up to "
                  f"{custom.limits.one_shot_max_bytes} bytes above 2 ranks, two-shot op: {custom.has_two_shot}")
        rows = []
        for nbytes in sizes:
            t = torch.zeros(max(1, nbytes // (HIDDEN * 2)), HIDDEN, dtype=dtype, device=bench.device)
            algorithm = custom.algorithm_for(t)
            other = "two_shot" if algorithm == "one_shot" else "one_shot"
            row = {"size": nbytes, "algorithm": algorithm or "nccl (not taken)"}
            if algorithm is None:
                rows.append(row)
                continue
            try:
                row["check"] = bench.check(custom, nbytes, dtype, algorithm)
                row["eager"] = bench.time_eager(lambda x, a=algorithm: custom.all_reduce_(x, a), t)
                row["graph"] = bench.time_graph(lambda x, a=algorithm: custom.all_reduce_(x, a), t)
            except Exception:
                bench.error(f"{fmt_size(nbytes)} {algorithm}")
            if other == "one_shot" or custom.has_two_shot:
                try:
                    row["other_check"] = bench.check(custom, nbytes, dtype, other)
                    row["other_graph"] = bench.time_graph(lambda x, a=other: custom.all_reduce_(x, a), t)
                    row["other"] = other
                except Exception:
                    bench.error(f"{fmt_size(nbytes)} {other}")
            rows.append(row)
        try:
            fp32 = bench.check(custom, 64 * 1024, torch.float32, "one_shot")
            bench.log(f"fp32 64 KB one-shot vs NCCL: {fp32}")
        except Exception:
            bench.error("fp32 64 KB one_shot")

        bench.log("\nCustom vs NCCL, bf16, per-op us (max over ranks); ratio = NCCL / custom (> 1: custom faster)")
        bench.log("| size | algorithm | check | NCCL eager | custom eager | ratio | NCCL graph | custom graph | ratio "
                  "| other algorithm: check, graph us |")
        bench.log("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            ne, ng = nccl[row["size"]]
            ce, cg = row.get("eager"), row.get("graph")
            other = (f"{row['other']}: {row['other_check']}, {row['other_graph']:.1f}" if "other_graph" in row
                     else "-")
            bench.log(f"| {fmt_size(row['size'])} | {row['algorithm']} | {row.get('check', '-')} | {ne:.1f} | "
                      f"{'-' if ce is None else f'{ce:.1f}'} | {'-' if ce is None else f'{ne / ce:.2f}x'} | {ng:.1f} | "
                      f"{'-' if cg is None else f'{cg:.1f}'} | {'-' if cg is None else f'{ng / cg:.2f}x'} | {other} |")
        small = next((r for r in rows if r["size"] == 8 * 1024 and "graph" in r), None)
        if small is not None:
            saved = 64 * (nccl[8 * 1024][1] - small["graph"])
            bench.log(f"\nLlama-3.1-8B batch-1 decode step (64 all-reduces of 8 KB, in a graph): "
                      f"{64 * nccl[8 * 1024][1]:.0f} us NCCL vs {64 * small['graph']:.0f} us custom ({saved:.0f} us saved)")
        status = 0 if bench.all_ok(not bench.failures) else 1
        custom.close()
    meaning = ("all custom checks matched NCCL", "custom path FAILED (see above)", "custom path unavailable")[status]
    bench.log(f"\nstatus {status} ({meaning}), {time.perf_counter() - t0:.1f} s")
    dist.barrier(group=bench.cpu_group)
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
