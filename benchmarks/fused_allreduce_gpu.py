"""Fused all-reduce + RMSNorm vs all-reduce then RMSNorm, per call, on the GPUs of one host.

    torchrun --nproc-per-node 2 benchmarks/fused_allreduce_gpu.py
    torchrun --nproc-per-node 2 benchmarks/fused_allreduce_gpu.py --rows 1,8,64,256 --ops 64 --replays 100

Needs `import shardserve.parallel...` to work (PYTHONPATH), like allreduce_gpu.py, whose Bench
(timing inside CUDA graphs, max over ranks) it reuses.

For each row count (bf16 [rows, 4096]: that many tokens of Llama-3.1-8B's hidden state):
  - unfused: what the engine runs without the fused kernel, the custom one-shot all-reduce in
    place and then the `rmsnorm` kernel with the residual;
  - flags / lamport: the fused kernel (parallel/kernels/allreduce_rmsnorm.py) with each protocol,
    each on its own symmetric buffer set up the way the engine does it
    (`create_custom_allreduce` with KernelOptions.fused_allreduce_protocol set).
Each fused result is checked bit for bit against the unfused pair on random data (at 2 ranks
both compute one correctly rounded a + b, then the same norm), then every variant is timed:
`--ops` calls captured in one graph, replayed `--replays` times; per-call microseconds, the
maximum over ranks. A watchdog ends the run (exit 3) if a kernel waits forever on a peer.

Exit status (the same on every rank): 0 when every check matched, 1 when one did not or raised,
2 when no fused path could be set up, 3 timeout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # allreduce_gpu.py sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from allreduce_gpu import HIDDEN, header, start  # noqa: E402

EPS = 1e-5
PROTOCOLS = ("flags", "lamport")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,64,256", help="token rows per call (comma-separated)")
    parser.add_argument("--ops", type=int, default=64, help="calls captured in one graph")
    parser.add_argument("--replays", type=int, default=100, help="graph replays timed")
    parser.add_argument("--eager-iters", type=int, default=200, help=argparse.SUPPRESS)  # Bench reads it
    parser.add_argument("--timeout", type=float, default=150.0, help="watchdog: exit 3 after this many seconds")
    args = parser.parse_args()
    bench = start(args, "a fused kernel")
    from shardserve.parallel import custom_allreduce as car
    from shardserve.parallel.kernels.rmsnorm import rmsnorm
    from shardserve.parallel.options import KernelOptions

    header(bench)
    customs = {}
    for protocol in PROTOCOLS:
        custom = None
        try:
            custom = car.create_custom_allreduce(dist.group.WORLD, list(range(bench.world)), bench.cpu_group,
                                                 bench.device, options=KernelOptions(fused_allreduce_protocol=protocol))
        except Exception:
            bench.error(f"create_custom_allreduce ({protocol}) raised")
        if bench.all_ok(custom is not None and custom.fused is not None):
            customs[protocol] = custom
        else:
            bench.log(f"fused path ({protocol}) unavailable: reason in the log above")
    if not customs:
        return 2
    base = next(iter(customs.values()))  # its plain one-shot all-reduce is the unfused pair's
    gen = torch.Generator(device=bench.device).manual_seed(7)  # the same on every rank
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device=bench.device)).to(torch.bfloat16)

    table = []
    for rows in (int(r) for r in args.rows.split(",")):
        x = bench.random(rows * HIDDEN * 2, torch.bfloat16, seed=rows)  # rank-dependent partial sums
        residual = torch.randn(rows, HIDDEN, generator=gen, device=bench.device).to(torch.bfloat16)
        summed = x.clone()
        base.all_reduce_(summed)
        want = rmsnorm(summed, weight, EPS, residual)

        def unfused(t: torch.Tensor, residual: torch.Tensor = residual) -> object:  # in place, as on a
            base.all_reduce_(t)  # row-parallel layer's output
            return rmsnorm(t, weight, EPS, residual)

        row = {"rows": rows, "unfused": bench.time_graph(unfused, x.clone())}
        for protocol, custom in customs.items():
            if not custom.fused.fits(x, residual):
                row[protocol] = "too many rows"
                continue
            try:
                got = custom.fused(x, residual, weight, EPS)
                same = bench.all_ok(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
                if not same:
                    bench.failures.append(f"{rows} rows {protocol}: mismatch")
                us = bench.time_graph(lambda t, c=custom, r=residual: c.fused(t, r, weight, EPS), x)
                row[protocol] = f"{us:.1f} ({row['unfused'] / us:.2f}x){'' if same else ' MISMATCH'}"
            except Exception:
                bench.error(f"{rows} rows {protocol}")
                row[protocol] = "error"
        table.append(row)

    bench.log(f"\nper call, us (max over ranks; {args.ops} calls x {args.replays} replays in a CUDA graph), bf16 "
              f"[rows, {HIDDEN}]; fused: us (unfused / fused)")
    bench.log("| rows | unfused (one-shot + rmsnorm) | " + " | ".join(f"fused {p}" for p in PROTOCOLS) + " |")
    bench.log("|---|---|" + "---|" * len(PROTOCOLS))
    for row in table:
        bench.log(f"| {row['rows']} | {row['unfused']:.1f} | " + " | ".join(str(row.get(p, "unavailable"))
                                                                         for p in PROTOCOLS) + " |")
    bench.log(f"device: {torch.cuda.get_device_name()} x {bench.world}")
    status = 1 if bench.failures else 0
    bench.sync()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
