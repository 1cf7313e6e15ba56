"""`shardserve bench serve` without a server: arrival processes, datasets, flags, per-request maths.

The end-to-end run against the real app (HTTP and gRPC side by side) is tests/cluster/test_bench_serve.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from shardserve.cluster.bench_serve.arrivals import LoadPoint, send_offsets
from shardserve.cluster.bench_serve.dataset import DatasetError, DatasetSpec, build_requests, fresh_prompts
from shardserve.cluster.bench_serve.options import endpoint_arg
from shardserve.cluster.bench_serve.records import PointResult, RequestRecord
from shardserve.cluster.bench_serve.settings import Endpoint
from shardserve.cluster.bench_serve.summary import Slo, summarize
from shardserve.cluster.cli import main


def _gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.asarray(offsets))


def test_constant_arrivals_are_exact():
    assert send_offsets(5, 4.0, "constant") == pytest.approx([0, 0.25, 0.5, 0.75, 1.0], abs=1e-12)
    assert send_offsets(3, math.inf, "poisson") == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("arrival", "burstiness", "cv"), [("poisson", 1.0, 1.0), ("gamma", 0.25, 2.0),
                                                            ("gamma", 4.0, 0.5)])
def test_random_arrivals_keep_the_mean_rate(arrival, burstiness, cv):
    rate, n = 5.0, 20_001
    gaps = _gaps(send_offsets(n, rate, arrival, burstiness, seed=7))
    assert (gaps >= 0).all()
    assert 1 / gaps.mean() == pytest.approx(rate, rel=0.04)  # mean rate within 4 %
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)  # burstiness: CV = 1 / sqrt(shape)


def test_arrivals_are_seeded():
    a, b = send_offsets(50, 2.0, "poisson", seed=3), send_offsets(50, 2.0, "poisson", seed=3)
    assert a == b and a != send_offsets(50, 2.0, "poisson", seed=4)
    assert send_offsets(50, 2.0, "gamma", 0.5, seed=3) == send_offsets(50, 2.0, "gamma", 0.5, seed=3)


@pytest.mark.parametrize("kwargs", [{"rate": -1.0}, {"rate": 0.0}, {"rate": math.nan}, {"burstiness": 0.0},
                                    {"arrival": "uniform"}])
def test_arrivals_refuse_bad_values(kwargs):
    args = {"num_requests": 4, "rate": 1.0, "arrival": "gamma", "burstiness": 1.0} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        send_offsets(**args)


def test_lognormal_dataset_is_seeded_and_exact_in_ids():
    spec = DatasetSpec(num_requests=200, input_len=64, output_len=32, sigma=0.5, seed=1)
    requests = build_requests(spec)
    assert requests == build_requests(spec)
    assert all(len(r.prompt) == r.input_len and all(1000 <= t < 32000 for t in r.prompt) for r in requests)
    assert np.median([r.input_len for r in requests]) == pytest.approx(64, rel=0.15)
    assert np.median([r.max_tokens for r in requests]) == pytest.approx(32, rel=0.15)
    text = build_requests(DatasetSpec(num_requests=20, input_len=16, output_len=4, prompt_format="text"))
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == r.input_len for r in text)


def test_fresh_prompts_keep_lengths_and_file_prompts(tmp_path):
    spec = DatasetSpec(num_requests=30, input_len=16, output_len=4, seed=2)
    base = build_requests(spec)
    a, b = fresh_prompts(base, spec, 1), fresh_prompts(base, spec, 2)
    assert a == fresh_prompts(base, spec, 1)  # seeded
    for x, y, z in zip(base, a, b, strict=True):
        assert len(x.prompt) == len(y.prompt) == len(z.prompt) == x.input_len and x.max_tokens == y.max_tokens
        assert x.prompt != y.prompt != z.prompt  # no prompt seen at one load point comes back at another
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": [5, 6, 7], "max_tokens": 1}\n{"input_len": 5, "output_len": 2}\n')
    spec = DatasetSpec(num_requests=2, path=str(path), prompt_format="text")
    given, drawn = fresh_prompts(build_requests(spec), spec, 3)
    assert given.prompt == [5, 6, 7] and isinstance(drawn.prompt, str) and len(drawn.prompt.split()) == 5


def test_jsonl_dataset_both_forms_and_cycling(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "Hello there", "max_tokens": 3}\n\n{"input_len": 7, "output_len": 2}\n'
                    '{"prompt": [5, 6, 7], "max_tokens": 1}\n')
    requests = build_requests(DatasetSpec(num_requests=5, path=str(path)))
    assert [r.max_tokens for r in requests] == [3, 2, 1, 3, 2]
    assert requests[0].prompt == "Hello there" and requests[0].input_len is None
    assert len(requests[1].prompt) == 7 and requests[2].prompt == [5, 6, 7] and requests[2].input_len == 3


@pytest.mark.parametrize(("line", "message"), [('{"prompt": "x"}', "max_tokens must be an integer >= 1"),
                                               ('{"input_len": 0, "output_len": 2}', "input_len"),
                                               ("[1, 2]", "expected a JSON object"), ("{oops", "not JSON"),
                                               ('{"text": "x"}', "prompt + max_tokens")])
def test_jsonl_dataset_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_len": 3, "output_len": 1}\n' + line + "\n")
    with pytest.raises(DatasetError, match=f"bad.jsonl:2: .*{re.escape(message)}"):
        build_requests(DatasetSpec(num_requests=2, path=str(path)))


def test_itl_and_tpot_of_a_record():
    grpc = RequestRecord(0, 4, 5, chunk_times_s=[0.1, 0.3, 0.4], chunk_tokens=[1, 2, 2], e2e_s=0.45, output_tokens=5)
    assert grpc.ttft_s == 0.1 and grpc.itl_s() == pytest.approx([0.1, 0.1, 0.05, 0.05])
    assert grpc.tpot_s == pytest.approx((0.45 - 0.1) / 4)
    http = RequestRecord(1, 4, 5, chunk_times_s=[0.1, 0.3, 0.5], e2e_s=0.5, output_tokens=5)
    assert http.itl_s() == pytest.approx([0.1, 0.1])  # 4 tokens over 2 events: spread evenly
    failed = RequestRecord(2, 4, 5, error="HTTP 500: boom")
    assert not failed.ok and failed.tpot_s is None and json.dumps(failed.to_json())


def test_goodput_counts_requests_meeting_both_slos():
    records = [
        RequestRecord(0, 4, 3, chunk_times_s=[0.2, 0.25, 0.3], e2e_s=0.3, output_tokens=3),  # good: TPOT 50 ms
        RequestRecord(1, 4, 3, chunk_times_s=[0.6, 0.65, 0.7], e2e_s=0.7, output_tokens=3),  # TTFT 600 ms: too slow
        RequestRecord(2, 4, 3, chunk_times_s=[0.1, 0.3, 0.5], e2e_s=0.5, output_tokens=3),  # TPOT 200 ms: too slow
        RequestRecord(3, 4, 2, chunk_times_s=[0.1], e2e_s=0.1, output_tokens=1),  # 1 of 2 tokens: no ITL, good
        RequestRecord(4, 4, 3, error="HTTP 429: queue full"),
    ]
    result = PointResult("ours", LoadPoint("rate", 2.0), 2.0, records)
    s = summarize(result, Slo(ttft_ms=500, itl_ms=100))
    assert (s.num_ok, s.num_errors, s.num_good, s.num_short) == (4, 1, 2, 1) and s.errors == ["HTTP 429: queue full"]
    assert s.request_throughput == 2.0 and s.goodput == 1.0 and s.output_throughput == 5.0
    assert s.ttft_ms.p50 == pytest.approx(150.0) and s.tpot_ms.mean == pytest.approx((50 + 50 + 200) / 3)
    assert summarize(result, Slo()).goodput == s.request_throughput  # no SLO: every success counts


@pytest.mark.parametrize(("arg", "label", "scheme", "url"), [
    ("ours=http://h:8000", "ours", "http", "http://h:8000/v1/completions"),
    ("http://h:8000/real/", "h:8000", "http", "http://h:8000/real/v1/completions"),
    ("v=https://h/v1", "v", "https", "https://h/v1/completions"),
    ("x=http://h:1/v1/completions", "x", "http", "http://h:1/v1/completions"),
    ("g=grpc://10.0.0.1:9000", "g", "grpc", "10.0.0.1:9000"),
    ("grpcs://h:443", "h:443", "grpcs", "h:443"),
])
def test_endpoint_urls(arg, label, scheme, url):
    assert endpoint_arg(arg) == Endpoint(label, scheme, url)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(["bench", "serve", *argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--endpoint", "ftp://127.0.0.1:1"], "unknown scheme ftp://"),
    (["--endpoint", "127.0.0.1:8000"], "unknown scheme"),
    (["--endpoint", "grpc://127.0.0.1"], "grpc://host:port"),
    (["--endpoint", "http://127.0.0.1:1", "--rates", "1,-2"], "argument --rates: each rate must be a number > 0"),
    (["--endpoint", "http://127.0.0.1:1", "--rates", "0"], "argument --rates"),
    (["--endpoint", "http://127.0.0.1:1", "--concurrency", "1,0"], "argument --concurrency"),
    (["--endpoint", "http://127.0.0.1:1", "--rates", "1", "--concurrency", "2"], "not allowed with"),
    (["--endpoint", "http://127.0.0.1:1", "--slo-ttft-ms", "-5"], "slo-ttft-ms must be a finite float > 0"),
    (["--endpoint", "http://127.0.0.1:1", "--endpoint", "http://127.0.0.1:1"], "labels must differ"),
    (["--endpoint", "http://127.0.0.1:1", "--burstiness", "0.5"], "--arrival gamma only"),
    (["--endpoint", "http://127.0.0.1:1", "--concurrency", "4", "--arrival", "gamma"], "--arrival / --burstiness"),
    (["--endpoint", "http://127.0.0.1:1", "--dataset", "x.jsonl", "--input-len", "5"], "--input-len: the lengths"),
    (["--endpoint", "http://127.0.0.1:1", "--dataset", "/nonexistent/x.jsonl"], "cannot read dataset"),
])
def test_bad_flags_exit_2_with_a_clear_error(argv, message, capsys, tmp_path):
    code, err = _cli([*argv, "--model", "m", "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and message in err, err
    assert not list(tmp_path.iterdir())  # nothing was run or written


def test_bad_flag_exit_code_as_a_user_sees_it():
    proc = subprocess.run([sys.executable, "-m", "shardserve.cluster.cli", "bench", "serve", "--model", "m",
                           "--endpoint", "ours=http://127.0.0.1:1", "--rates", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rates" in proc.stderr and "-1" in proc.stderr, proc.stderr


def test_unreachable_endpoints_are_counted_and_exit_1(tmp_path, capsys):
    """Connection failures over both protocols land in the records; with no success at all, exit code 1."""
    argv = ["bench", "serve", "--model", "m", "--endpoint", "g=grpc://127.0.0.1:9", "--endpoint", "h=http://127.0.0.1:9",
            "--rates", "inf", "--num-requests", "2", "--out-dir", str(tmp_path)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "no request succeeded" in err and "gRPC UNAVAILABLE" in out and "ClientConnectorError" in out
    points = json.loads((tmp_path / "results.json").read_text())["points"]
    assert [p["summary"]["num_errors"] for p in points] == [2, 2]
    assert all((tmp_path / name).stat().st_size > 0 for name in ("latency_vs_rate.png", "ttft_cdf.png"))
