"""PNG plots of a run, every endpoint on the same axes: latency vs load, throughput vs load, TTFT CDF.

Data flow: report.py imports this module only when plots are written (matplotlib loads in about a
second) and calls `write_plots(summaries, results, out_dir)`. The x axis of the load plots lists the
load points in the order run (`inf` and concurrencies are categories, not numbers); each endpoint is
one colour, p50 solid and p99 dashed; the SLO, when set, is a grey line. matplotlib's object API
(`Figure` + the Agg canvas, no pyplot) keeps no global state and needs no display.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from shardserve.cluster.bench_serve.records import PointResult
from shardserve.cluster.bench_serve.summary import PointSummary, Slo

LINESTYLES = ("-", "--", ":", "-.")


def _by_endpoint(summaries: list[PointSummary]) -> dict[str, list[PointSummary]]:
    out: dict[str, list[PointSummary]] = {}
    for s in summaries:
        out.setdefault(s.endpoint, []).append(s)
    return out


def _loads(summaries: list[PointSummary]) -> list[str]:
    return list(dict.fromkeys(s.load for s in summaries))


def _latency(summaries: list[PointSummary], slo: Slo, path: Path) -> None:
    loads = _loads(summaries)
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (("ttft_ms", "TTFT (ms)", slo.ttft_ms), ("tpot_ms", "time per output token (ms)", slo.itl_ms),
              ("e2e_ms", "end-to-end latency (ms)", None))
    for ax, (field, title, limit) in zip(axes, panels, strict=True):
        for color, (endpoint, rows) in enumerate(_by_endpoint(summaries).items()):
            if not any(s.num_ok for s in rows):
                continue  # every request failed: no latency to draw (its errors are in the table)
            x = [loads.index(s.load) for s in rows]
            for quantile, style in (("p50", "-"), ("p99", "--")):
                y = [getattr(getattr(s, field), quantile) for s in rows]
                ax.plot(x, [float("nan") if v is None else v for v in y], style, marker="o", color=f"C{color}",
                        label=f"{endpoint} {quantile}")
        if limit is not None:
            ax.axhline(limit, color="grey", linewidth=1, label="SLO")
        ax.set_xticks(range(len(loads)), loads)
        ax.set_xlabel("load")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.savefig(path, dpi=100)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing drawn when every request failed
        ax.legend(fontsize="small")


def _throughput(summaries: list[PointSummary], path: Path) -> None:
    loads = _loads(summaries)
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    tokens_ax, requests_ax = fig.subplots(1, 2)
    for color, (endpoint, rows) in enumerate(_by_endpoint(summaries).items()):
        x = [loads.index(s.load) for s in rows]
        tokens_ax.plot(x, [s.output_throughput for s in rows], "-", marker="o", color=f"C{color}", label=endpoint)
        requests_ax.plot(x, [s.request_throughput for s in rows], "-", marker="o", color=f"C{color}",
                         label=f"{endpoint} requests/s")
        requests_ax.plot(x, [s.goodput for s in rows], "--", marker="s", color=f"C{color}",
                         label=f"{endpoint} goodput")
    for ax, title in ((tokens_ax, "output tokens/s"), (requests_ax, "requests/s and goodput (SLO met)")):
        ax.set_xticks(range(len(loads)), loads)
        ax.set_xlabel("load")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def _ttft_cdf(results: list[PointResult], slo: Slo, path: Path) -> None:
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    endpoints = list(dict.fromkeys(r.endpoint for r in results))
    loads = list(dict.fromkeys(r.point.label for r in results))
    for result in results:
        ttfts = sorted(r.ttft_s * 1e3 for r in result.records if r.ok)
        if not ttfts:
            continue
        fraction = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
        style = LINESTYLES[loads.index(result.point.label) % len(LINESTYLES)]
        ax.step(ttfts, fraction, style, where="post", color=f"C{endpoints.index(result.endpoint)}",
                label=f"{result.endpoint} @ {result.point.label}")
    if slo.ttft_ms is not None:
        ax.axvline(slo.ttft_ms, color="grey", linewidth=1, label="SLO")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title("TTFT CDF")
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.savefig(path, dpi=100)


def write_plots(summaries: list[PointSummary], results: list[PointResult], slo: Slo, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "latency_vs_rate.png", out_dir / "throughput_vs_rate.png", out_dir / "ttft_cdf.png"]
    _latency(summaries, slo, paths[0])
    _throughput(summaries, paths[1])
    _ttft_cdf(results, slo, paths[2])
    return paths
