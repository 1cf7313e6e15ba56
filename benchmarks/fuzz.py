"""Fuzz a running shardserve server over real HTTP and gRPC, with good requests running beside.

Data flow: `http_cases` loads the server's own OpenAPI document (/openapi.json) with schemathesis
and draws positive and negative cases for every operation; most bodies are pointed at a served
model and kept cheap (max_tokens 1..4). `grpc_payloads` draws `GenerateRequest` messages with
hypothesis (wide numeric ranges, inf/nan, odd roles, long stop lists), plus corrupted bytes.
`run` sends them all from a thread pool while `GoodTraffic` keeps sending well-formed requests
(HTTP and gRPC) and checks each completes with the expected token count. Invariants, reported by
`Report.problems()`: no HTTP 5xx and no gRPC status outside the documented client errors, every
HTTP 4xx in OpenAI's error shape, schemathesis' status-code conformance, every good request
completed, and the LLMServer replica ids (GET /v1/stats) unchanged: no engine was restarted.
Run against `shardserve serve`:  python benchmarks/fuzz.py --url http://127.0.0.1:8000 \\
  --grpc 127.0.0.1:9000 --cases 10000 ; tests/cluster/test_fuzz.py runs it on the test cluster.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import requests

GRPC_METHOD = "/shardserve.v1.LLMService/"
# gRPC answers a fuzzed request may get: client errors (the others mean the server failed).
GRPC_CLIENT_CODES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"}
MAX_FUZZ_TOKENS = 4  # fuzzed max_tokens in [5, 2**31 - 1] are folded into [1, 4]: cheap but valid
MAX_INT32 = 2**31 - 1


def _fold_tokens(body: dict[str, Any]) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, float) and value.is_integer():  # JSON 1e7 is a valid integer to pydantic
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and MAX_FUZZ_TOKENS < value <= MAX_INT32:
            body[name] = 1 + value % MAX_FUZZ_TOKENS
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 2  # the default (16) is slower for nothing


def _draw(strategy: Any, count: int, seed: int) -> list[Any]:
    """`count` examples of a hypothesis strategy, drawn the way @given draws them (no shrinking)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as with_seed

    drawn: list[Any] = []

    @with_seed(seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn[:count]


# ---- HTTP cases: schemathesis over the served OpenAPI document -------------------------------------
def http_cases(url: str, num: int, model: str, seed: int) -> list[Any]:
    """`num` schemathesis cases (half positive, half negative); 4 bodies in 5 name `model`."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    cases = _draw(schema.as_strategy(generation_mode=GenerationMode.POSITIVE), num - num // 2, seed)
    cases += _draw(schema.as_strategy(generation_mode=GenerationMode.NEGATIVE), num // 2, seed)
    rng = random.Random(seed)
    for case in cases:
        if isinstance(case.body, dict):
            if rng.random() < 0.8:
                case.body["model"] = model
            _fold_tokens(case.body)
    return cases


# ---- gRPC payloads: hypothesis-drawn GenerateRequest messages, and corrupted bytes ----------------
def grpc_payloads(num: int, model: str, seed: int) -> list[bytes]:
    """`num` serialized GenerateRequests: about half well-formed (valid ranges), half wild, and
    one in five damaged on the wire (a flipped byte, cut short) or plain random bytes."""
    from hypothesis import strategies as st
    from shardserve.cluster.proto import llm_pb2 as pb

    wild_text = st.text(max_size=40)
    wild_float = st.floats(width=32) | st.sampled_from([0.0, 2.0, math.inf, -math.inf, math.nan])
    wild_u32 = st.integers(0, 8) | st.integers(0, 2**32 - 1)
    sane_floats = {
        "temperature": st.floats(0, 2, width=32), "top_p": st.floats(0.25, 1, width=32),
        "min_p": st.floats(0, 1, width=32), "repetition_penalty": st.floats(0.5, 2, width=32),
        "presence_penalty": st.floats(-2, 2, width=32), "frequency_penalty": st.floats(-2, 2, width=32),
    }  # fmt: skip
    sane_ints = {"max_tokens": st.integers(1, 4), "min_tokens": st.integers(0, 1), "n": st.integers(1, 3),
                 "logprobs": st.integers(0, 5)}  # fmt: skip

    @st.composite
    def message(draw: Any) -> bytes:
        sane = draw(st.booleans())
        text = st.text(min_size=1, max_size=20) if sane else wild_text
        params: dict[str, Any] = {}
        for name, valid in sane_floats.items():
            if draw(st.booleans()):
                params[name] = draw(valid if sane else wild_float)
        for name, valid in sane_ints.items():
            if draw(st.booleans()):
                params[name] = draw(valid if sane else wild_u32)
        if draw(st.booleans()):
            params["top_k"] = draw(st.integers(-1, 50) if sane else st.integers(-(2**31), MAX_INT32))
        if draw(st.booleans()):
            params["seed"] = draw(st.integers(-(2**63), 2**63 - 1))
        params["stop"] = draw(st.lists(text, max_size=3 if sane else 40))
        params["stop_token_ids"] = draw(st.lists(st.integers(0, 999 if sane else 2**32 - 1), max_size=3))
        _fold_tokens(params)
        if params.get("min_tokens", 0) > params.get("max_tokens", 2):
            params["min_tokens"] = 0 if sane else params["min_tokens"]
        request = pb.GenerateRequest(
            model=model if sane else draw(st.sampled_from([model, model, ""]) | wild_text),
            params=pb.SamplingParams(**params),
            priority=draw(st.integers(-(2**31), MAX_INT32)),
        )
        which = draw(
            st.sampled_from(["prompt", "messages", "ids"] if sane else ["prompt", "messages", "ids", "none"])
        )
        if which == "prompt":
            request.prompt = draw(text)
        elif which == "messages":
            roles = ["system", "user", "assistant", "developer"] + ([] if sane else ["robot", "tool", ""])
            for _ in range(draw(st.integers(1 if sane else 0, 3))):
                request.messages.messages.add(role=draw(st.sampled_from(roles)), content=draw(text))
        elif which == "ids":
            ids = st.integers(0, 999) if sane else st.integers(0, 2**32 - 1)
            request.prompt_token_ids.ids.extend(draw(st.lists(ids, min_size=1 if sane else 0, max_size=6)))
        data = request.SerializeToString()
        damage = draw(st.sampled_from(["none"] * 8 + ["flip", "cut"]))
        if damage == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        elif damage == "cut" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        return data

    payloads = _draw(message() | st.binary(max_size=64), num, seed)
    random.Random(seed).shuffle(payloads)
    return payloads[:num]


# ---- good requests beside the fuzz -------------------------------------------------------------------
@dataclass
class GoodTraffic:
    url: str
    grpc_target: str | None
    model: str
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _one(self, i: int) -> None:
        if self.grpc_target and i % 2:
            from shardserve.cluster.proto import llm_pb2 as pb
            from shardserve.cluster.proto import llm_pb2_grpc as rpc

            with grpc.insecure_channel(self.grpc_target) as channel:
                reply = rpc.LLMServiceStub(channel).Generate(
                    pb.GenerateRequest(
                        model=self.model, prompt=f"good {i}", params=pb.SamplingParams(max_tokens=3, ignore_eos=True)
                    ),
                    timeout=60,
                )
            if reply.num_tokens != 3:
                self.failures.append(f"good gRPC request {i}: {reply.num_tokens} tokens")
            return
        body = {"model": self.model, "prompt": f"good {i}", "max_tokens": 3, "ignore_eos": True}
        r = requests.post(f"{self.url}/v1/completions", json=body, timeout=60)
        if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 3:
            self.failures.append(f"good HTTP request {i}: {r.status_code} {r.text[:200]}")

    def loop_once(self) -> None:
        try:
            self._one(self.sent)
        except Exception as err:  # noqa: BLE001 -- every failure of a good request is reported
            self.failures.append(f"good request {self.sent}: {type(err).__name__}: {str(err)[:200]}")
        self.sent += 1

    def loop(self) -> None:
        while not self._stop.is_set():
            self.loop_once()
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class Report:
    cases: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    refusals: collections.Counter = field(default_factory=collections.Counter)  # HTTP 4xx: param and message head
    server_errors: list[str] = field(default_factory=list)
    shape_errors: list[str] = field(default_factory=list)
    conformance_errors: list[str] = field(default_factory=list)
    good_sent: int = 0
    good_failures: list[str] = field(default_factory=list)
    replicas_before: list[str] = field(default_factory=list)
    replicas_after: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    generate_s: float = 0.0  # of wall_s: drawing the cases

    def problems(self) -> list[str]:
        out = self.server_errors + self.shape_errors + self.conformance_errors + self.good_failures
        if self.replicas_before != self.replicas_after:
            out.append(f"LLMServer replicas changed: {self.replicas_before} -> {self.replicas_after}")
        if self.good_sent == 0:
            out.append("no good request ran beside the fuzz")
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "cases": self.cases, "wall_s": round(self.wall_s, 1), "generate_s": round(self.generate_s, 1),
            "status_histogram": dict(sorted(self.statuses.items())),
            "server_errors": len(self.server_errors), "error_shape_violations": len(self.shape_errors),
            "schema_conformance_failures": len(self.conformance_errors), "good_requests": self.good_sent,
            "good_request_failures": len(self.good_failures), "replicas_unchanged": self.replicas_before == self.replicas_after,
            "top_http_refusals": dict(self.refusals.most_common(8)),
            "first_problems": self.problems()[:10],
        }  # fmt: skip


def replica_ids(url: str, model: str) -> list[str]:
    """The LLMServer replicas the Ingress's router sees for `model` (after at least one request)."""
    stats = requests.get(f"{url}/v1/stats", timeout=30).json()["models"][model]
    return sorted(((stats.get("router") or {}).get("replicas") or {}).keys())


def _send_http(case: Any, url: str, session: requests.Session, report: Report, lock: threading.Lock) -> None:
    from schemathesis.specs.openapi.checks import status_code_conformance

    label = f"{case.method} {case.path}"
    try:
        response = case.call(base_url=url, session=session, timeout=60)
    except requests.RequestException as err:
        with lock:
            report.statuses[f"http:{type(err).__name__}"] += 1
            report.server_errors.append(f"{label}: {type(err).__name__} {str(err)[:200]} body={str(case.body)[:300]!r}")
        return
    status = response.status_code
    problem = shape = refused = None
    if status >= 500:
        problem = f"{label} -> {status}: {response.text[:300]} body={str(case.body)[:300]!r}"
    elif status >= 400:
        try:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
            refused = f"{status} {error['param']}: {' '.join(error['message'].split()[:4])}"
        except Exception:  # noqa: BLE001 -- any other shape is the finding
            shape = f"{label} -> {status} not in OpenAI's error shape: {response.text[:300]}"
    try:
        case.validate_response(response, checks=[status_code_conformance])
        conformance = None
    except Exception as err:  # noqa: BLE001 -- schemathesis raises its own failure types
        conformance = f"{label} -> {status}: {str(err)[:300]}"
    with lock:
        report.statuses[f"http:{status}"] += 1
        if refused is not None:
            report.refusals[refused] += 1
        for bucket, item in ((report.server_errors, problem), (report.shape_errors, shape),
                             (report.conformance_errors, conformance)):  # fmt: skip
            if item is not None:
                bucket.append(item)


def _send_grpc(data: bytes, channel: grpc.Channel, index: int, report: Report, lock: threading.Lock) -> None:
    ident = lambda b: b  # noqa: E731 -- send the bytes as they are
    code = "OK"
    try:
        if index % 3 == 0:
            call = channel.unary_stream(GRPC_METHOD + "GenerateStream", request_serializer=ident,
                                        response_deserializer=ident)  # fmt: skip
            list(call(data, timeout=60))
        else:
            channel.unary_unary(
                GRPC_METHOD + "Generate", request_serializer=ident, response_deserializer=ident
            )(data, timeout=60)
    except grpc.RpcError as err:
        code = err.code().name
        details = err.details() or ""
    with lock:
        report.statuses[f"grpc:{code}"] += 1
        if code not in GRPC_CLIENT_CODES:
            report.server_errors.append(f"gRPC {code}: {details[:300]} payload={data[:80]!r}")


def run(
    url: str, grpc_target: str | None, num_cases: int, model: str, concurrency: int = 8, seed: int = 0
) -> Report:
    """Fuzz `num_cases` requests (HTTP, and half over gRPC when `grpc_target` is set) beside good traffic."""
    start = time.monotonic()
    num_grpc = num_cases // 2 if grpc_target else 0
    cases = http_cases(url, num_cases - num_grpc, model, seed)
    payloads = grpc_payloads(num_grpc, model, seed) if num_grpc else []
    generate_s = time.monotonic() - start
    good = GoodTraffic(url, grpc_target, model)
    good.loop_once()  # the Ingress's router for `model` exists (and lists its replicas) after one request
    report = Report(cases=len(cases) + len(payloads), replicas_before=replica_ids(url, model))
    lock = threading.Lock()
    good_thread = threading.Thread(target=good.loop, daemon=True)
    good_thread.start()
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))
    channel = grpc.insecure_channel(grpc_target) if grpc_target else None
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            jobs = [pool.submit(_send_http, c, url, session, report, lock) for c in cases]
            jobs += [pool.submit(_send_grpc, p, channel, i, report, lock) for i, p in enumerate(payloads)]
            for job in jobs:
                job.result()
    finally:
        good.stop()
        good_thread.join(timeout=120)
        if channel is not None:
            channel.close()
    report.good_sent, report.good_failures = good.sent, good.failures
    report.replicas_after = replica_ids(url, model)
    report.wall_s, report.generate_s = time.monotonic() - start, generate_s
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL of the server")
    parser.add_argument("--grpc", default=None, help="gRPC target host:port (half the cases go there)")
    parser.add_argument("--cases", type=int, default=10_000, help="fuzzed requests in all (>= 2)")
    parser.add_argument("--model", default=None, help="served model most cases name (default: the first)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight, >= 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cases < 2 or args.concurrency < 1:
        parser.error("--cases must be >= 2 and --concurrency >= 1")
    model = args.model or requests.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    report = run(args.url, args.grpc, args.cases, model, args.concurrency, args.seed)
    print(json.dumps(report.summary(), indent=2))
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
