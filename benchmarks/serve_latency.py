"""The latency the serving path adds to one request at a time (issue 24 item 5), per hop.

    python benchmarks/serve_latency.py                                   # make serve's config, CPU
    python benchmarks/serve_latency.py --model dummy:llama-3.1-8b --device cuda --dtype bfloat16  # one GPU

Starts a local Ray + Serve and the real app (`build_app` of `--config`, default `configs/cpu-default.yaml`,
the first model; `--model` / `--device` / `--dtype` override its source), then sends `--num-requests`
requests one at a time over gRPC (generated stubs, GenerateStream, 16 prompt token ids) and over HTTP
(streaming chat with the model's template, or streaming completions of the same token ids with
`--http-api completions`), after a few warm-up requests each. The engine's own TTFT / e2e of each
request and the per-hop stamps come from `LLMServer.recent_requests()` (cluster/server.py `_Trace`):
client send -> ingress built the request -> router picked a replica -> LLMServer received it
-> engine add_request (template, engine thread hand-off) -> engine's first token (the engine's own
TTFT) -> LLMServer yielded the first chunk (output hand-off, chunk build) -> client got it (Serve's
stream back, Ingress message building, transport). Prints the median of each hop and the median
added TTFT / e2e (client minus the engine's own) per path; `--json FILE` writes every record.
Stamps are time.time() of one host; the client runs in this process. Old vs new: serve_latency_ab.sh.
`--mutual-tls`: both APIs over mutual TLS with throwaway certificates (tls.require_client_auth), so the
Ingress replicas serve HTTP themselves (cluster/ingress/http_server.py): no Serve HTTP proxy hop.
`--cold-starts N` instead: the model scales to zero (min_replicas 0); N times, wait until no replica is
left, send one gRPC request, print its client TTFT, the replica's cold_start_seconds and start-up
stages from /metrics (the first round also compiles the kernels; later rounds find them cached).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

APP_NAME = "serve-latency"
ROOT = Path(__file__).resolve().parent.parent
HOPS = (  # (name, from stamp, to stamp) of the first token's way
    ("client -> ingress", "client_send_unix_s", "ingress_unix_s"),
    ("ingress -> router pick", "ingress_unix_s", "router_pick_unix_s"),
    ("router pick -> LLMServer", "router_pick_unix_s", "server_receive_unix_s"),
    ("LLMServer -> engine add", "server_receive_unix_s", "engine_arrival_unix_s"),
    ("engine TTFT", "engine_arrival_unix_s", "engine_first_token_unix_s"),
    ("engine -> LLMServer yield", "engine_first_token_unix_s", "server_first_yield_unix_s"),
    ("LLMServer yield -> client", "server_first_yield_unix_s", "client_first_unix_s"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu-default.yaml"), help="serve config (YAML)")
    p.add_argument("--model", help="override the model's source (e.g. dummy:llama-3.1-8b)")
    p.add_argument("--device", help="override the model's device (cuda: one GPU per replica)")
    p.add_argument("--dtype", help="override the model's dtype")
    p.add_argument("--num-requests", type=int, default=30, help="measured requests per path (sequential)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up requests per path")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--paths", default="grpc,http", help="comma-separated, of grpc, http")
    p.add_argument("--http-api", choices=["auto", "chat", "completions"], default="auto",
                   help="auto: chat when the model has a chat template, else completions of token ids")
    p.add_argument("--stream-interval-ms", type=float, help="override the model's stream_interval_ms")
    p.add_argument("--ray-defaults", action="store_true",
                   help="start Ray without cluster/app.py's SERVE_ENV (Ray Serve's default threads and proxy hop)")
    p.add_argument("--mutual-tls", action="store_true",
                   help="serve over mutual TLS (throwaway certificates): HTTP from the Ingress itself, no Serve proxy")
    p.add_argument("--json", help="write every request's record here")
    p.add_argument("--cold-starts", type=int, default=0,
                   help="measure this many starts from zero replicas instead (min_replicas 0)")
    args = p.parse_args(argv)
    if args.mutual_tls and args.cold_starts:
        p.error("--mutual-tls measures the request path; --cold-starts does not take it")
    return args


def throwaway_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (PEM files in `folder`)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name: str, issuer: tuple | None, usage: Any = None) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        )  # fmt: skip
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()), key

    ca = make("serve-latency CA", None)
    made = {"ca": ca, "server": make("127.0.0.1", ca, ExtendedKeyUsageOID.SERVER_AUTH),
            "client": make("client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)}  # fmt: skip
    paths = {}
    for name, (cert, key) in made.items():
        paths[f"{name}_cert"] = folder / f"{name}.crt"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"] = folder / f"{name}.key"
        paths[f"{name}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))  # fmt: skip
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(args: argparse.Namespace, certs: dict[str, Path] | None = None) -> Any:
    """The config file with free ports, one model (the first), the command line's overrides and, with
    `certs`, mutual TLS."""
    import yaml
    from shardserve.cluster.config import ServeConfig, parse_config

    data = yaml.safe_load(Path(args.config).read_text())
    data["ray"] = {**(data.get("ray") or {}), "address": None, "namespace": APP_NAME}
    data["http"] = {"host": "127.0.0.1", "port": free_port()}
    data["grpc"] = {"port": free_port()}
    if certs is not None:
        data["tls"] = {"cert_file": str(certs["server_cert"]), "key_file": str(certs["server_key"]),
                       "ca_file": str(certs["ca_cert"]), "require_client_auth": True}  # fmt: skip
    model = data["models"][0]
    data["models"] = [model]
    if args.model:
        model["source"] = args.model
    if args.device:
        model["device"] = args.device
        if args.device.startswith("cuda"):
            model["resources"] = {**(model.get("resources") or {}), "num_gpus_per_worker": 1}
            model.get("cache", {}).pop("cpu_kv_cache_bytes", None)
    if args.dtype:
        model["dtype"] = args.dtype
    if args.stream_interval_ms is not None:
        model["stream_interval_ms"] = args.stream_interval_ms
    if args.cold_starts:
        model.pop("replicas", None)
        model["autoscaling"] = {"min_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 4,
                                "upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 11}
    return parse_config(data, ServeConfig)


def start_app(config: Any, ray_defaults: bool) -> None:
    import ray
    from ray import serve
    from shardserve.cluster.app import build_app, serve_options

    num_gpus = 1 if config.models[0].device.startswith("cuda") else 0
    env: Any = contextlib.nullcontext()
    if not ray_defaults:  # as `shardserve serve` starts Ray (imported here: an older tree has no serve_env)
        from shardserve.cluster.app import serve_env

        env = serve_env()
    with env:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), num_gpus=num_gpus, include_dashboard=False,
                 namespace=config.ray.namespace)
    serve.start(**serve_options(config))
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")


def prompt_ids(args: argparse.Namespace, i: int) -> list[int]:
    return [100 + (7 * i + 13 * j) % 1000 for j in range(args.prompt_tokens)]  # distinct per request


def grpc_one(stub: Any, model: str, args: argparse.Namespace, i: int) -> dict[str, Any]:
    from shardserve.cluster.proto import llm_pb2 as pb

    params = pb.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0)
    req = pb.GenerateRequest(model=model, prompt_token_ids=pb.TokenIds(ids=prompt_ids(args, i)), params=params)
    rid = f"lat-grpc-{uuid.uuid4().hex[:12]}"
    rec: dict[str, Any] = {"path": "grpc", "id": rid, "client_send_unix_s": time.time(), "client_first_unix_s": None}
    num_tokens, replica = 0, ""
    for resp in stub.GenerateStream(req, metadata=(("x-request-id", rid),), timeout=120):
        if rec["client_first_unix_s"] is None and resp.num_tokens:
            rec["client_first_unix_s"] = time.time()
        num_tokens += resp.num_tokens
        replica = resp.replica_id or replica
    rec.update(client_end_unix_s=time.time(), num_tokens=num_tokens, replica=replica)
    return rec


def http_one(client: Any, url: str, model: str, api: str, args: argparse.Namespace, i: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                            "stream": True}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": f"Count from {i} to {i + 20}, please."}]
    else:
        body["prompt"] = prompt_ids(args, i)
    rec: dict[str, Any] = {"path": "http", "client_send_unix_s": time.time(), "client_first_unix_s": None}
    num_chunks = 0
    with client.stream("POST", f"{url}/v1/{'chat/completions' if api == 'chat' else 'completions'}", json=body) as r:
        r.raise_for_status()
        rec.update(id=r.headers["x-shardserve-request-id"], replica=r.headers["x-shardserve-replica"])
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            delta = choices[0].get("delta", {}).get("content") if api == "chat" and choices else None
            text = choices[0].get("text") if api != "chat" and choices else None
            # completions of token ids: a dummy model has no tokenizer, so a token's chunk carries "" text
            got = bool(delta or text) or (api != "chat" and text is not None)
            if got and rec["client_first_unix_s"] is None:
                rec["client_first_unix_s"] = time.time()
            num_chunks += got
    rec.update(client_end_unix_s=time.time(), num_tokens=None, num_chunks=num_chunks)
    return rec


def engine_records(replicas: set[str]) -> dict[str, dict]:
    """Each replica's `recent_requests()` (the engine's timing and the hop stamps), by request id."""
    from ray import serve
    from shardserve.cluster.ingress.deployment import llm_server_name

    async def fetch() -> dict[str, dict]:  # on a running loop: works whatever Serve's router-loop setting
        handle = serve.get_deployment_handle(llm_server_name(0, MODEL[0]), app_name=APP_NAME)
        out: dict[str, dict] = {}
        for replica in sorted(replicas):
            out.update((await handle.recent_requests.remote(replica_id=replica))["requests"])
        return out

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()  # runs until the process ends
    return asyncio.run_coroutine_threadsafe(fetch(), loop).result(timeout=60)


MODEL: list[str] = []  # the served model's name (set in main)


def live_replicas() -> int:
    """Replicas of the model's LLMServer in any state (starting, running, stopping)."""
    from ray import serve
    from shardserve.cluster.ingress.deployment import llm_server_name

    deployments = serve.status().applications[APP_NAME].deployments
    return sum(deployments[llm_server_name(0, MODEL[0])].replica_states.values())


def scrape(url: str) -> dict[str, list[Any]]:
    """/metrics samples by name (prometheus_client's parser)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=60).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def cold_starts(stub: Any, url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each round: wait for zero replicas, one gRPC request, its TTFT and the replica's stages."""
    rounds = []
    for i in range(args.cold_starts):
        waited = time.monotonic()
        while live_replicas() > 0:
            if time.monotonic() - waited > 300:
                raise RuntimeError("the app did not scale to zero in 300 s")
            time.sleep(0.5)
        rec = grpc_one(stub, MODEL[0], args, 50_000 + i)
        samples = scrape(url)
        cold = [s.value for s in samples.get("shardserve:cold_start_seconds", []) if s.name.endswith("_sum")]
        stages = {s.labels["stage"]: round(s.value, 2) for s in samples.get("shardserve:replica_startup_seconds", [])}
        row = {"round": i, "client_ttft_s": rec["client_first_unix_s"] - rec["client_send_unix_s"],
               "cold_start_seconds_sum": sum(cold), "startup_stages_s": stages, "num_tokens": rec["num_tokens"]}
        print(f"cold start {i}: client TTFT {row['client_ttft_s']:.2f} s; replica stages {stages}; "
              f"server-measured cold start {sum(cold):.2f} s", flush=True)
        rounds.append(row)
    return rounds


def summarize(records: list[dict]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return statistics.median(values) * 1e3 if values else float("nan")

    hops = {name: med([r[b] - r[a] for r in records if r.get(a) and r.get(b)]) for name, a, b in HOPS}
    ttft = [r["client_first_unix_s"] - r["client_send_unix_s"] for r in records]
    e2e = [r["client_end_unix_s"] - r["client_send_unix_s"] for r in records]
    return {
        "num_requests": len(records),
        "client_ttft_ms": med(ttft),
        "engine_ttft_ms": med([r["engine_ttft_s"] for r in records]),
        "added_ttft_ms": med([t - r["engine_ttft_s"] for t, r in zip(ttft, records, strict=True)]),
        "client_e2e_ms": med(e2e),
        "engine_e2e_ms": med([r["engine_e2e_s"] for r in records]),
        "added_e2e_ms": med([t - r["engine_e2e_s"] for t, r in zip(e2e, records, strict=True)]),
        "hops_ms": hops,
    }


def print_summary(path: str, s: dict[str, Any]) -> None:
    print(f"\n{path}: {s['num_requests']} requests, medians (ms)")
    print(f"  TTFT client {s['client_ttft_ms']:.2f}  engine {s['engine_ttft_ms']:.2f}  "
          f"added {s['added_ttft_ms']:.2f}")
    print(f"  e2e  client {s['client_e2e_ms']:.2f}  engine {s['engine_e2e_ms']:.2f}  added {s['added_e2e_ms']:.2f}")
    for name, ms in s["hops_ms"].items():
        print(f"  {name:<28} {ms:8.2f}")


def main(argv: list[str] | None = None) -> int:
    import grpc
    import httpx
    import ray
    from ray import serve
    from shardserve.cluster.proto import llm_pb2_grpc as rpc

    args = parse_args(argv)
    certs = None
    if args.mutual_tls:
        import ssl
        import tempfile

        certs = throwaway_certs(Path(tempfile.mkdtemp(prefix="serve-latency-tls-")))
    config = app_config(args, certs)
    model = config.models[0]
    MODEL.append(model.name)
    start_app(config, args.ray_defaults)
    try:
        paths = args.paths.split(",")
        api = args.http_api
        if api == "auto":
            api = "chat" if model.source == "default" or not model.source.startswith("dummy:") else "completions"
        url = f"http{'s' if certs else ''}://127.0.0.1:{config.http.port}"
        target = f"127.0.0.1:{config.grpc.port}"
        verify: Any = True
        if certs is not None:
            verify = ssl.create_default_context(cafile=str(certs["ca_cert"]))
            verify.load_cert_chain(certs["client_cert"], certs["client_key"])
            credentials = grpc.ssl_channel_credentials(
                certs["ca_cert"].read_bytes(), certs["client_key"].read_bytes(), certs["client_cert"].read_bytes()
            )
        channel_of = (lambda: grpc.secure_channel(target, credentials)) if certs else (lambda: grpc.insecure_channel(target))
        records: list[dict] = []
        with channel_of() as channel, httpx.Client(timeout=120, verify=verify) as client:
            stub = rpc.LLMServiceStub(channel)
            if args.cold_starts:
                rounds = cold_starts(stub, url, args)
                if args.json:
                    Path(args.json).write_text(json.dumps({"cold_starts": rounds}, indent=1))
                return 0
            senders = {"grpc": lambda i: grpc_one(stub, model.name, args, i),
                       "http": lambda i: http_one(client, url, model.name, api, args, i)}
            for path in paths:
                for i in range(args.warmup):
                    senders[path](10_000 + i)
            for i in range(args.num_requests):  # the paths interleaved: the machine's load hits both alike
                for path in paths:
                    records.append(senders[path](i))
        timings = engine_records({r["replica"] for r in records})
        for r in records:
            r.update(timings.get(r["id"], {}))
        missing = [r["id"] for r in records if r.get("engine_ttft_s") is None or r["client_first_unix_s"] is None]
        if missing:
            print(f"no engine timing or no token for {len(missing)} requests: {missing[:5]}")
        summary = {p: summarize([r for r in records if r["path"] == p and r["id"] not in missing]) for p in paths}
        print(f"\nmodel {model.name} ({model.source}, {model.device}), prompt {args.prompt_tokens} tokens "
              f"(HTTP: {api}), max_tokens {args.max_tokens}, stream_interval_ms "
              f"{model.effective_stream_interval_ms()}{'; mutual TLS (HTTP from the Ingress)' if certs else ''}; load average {os.getloadavg()}")
        for path in paths:
            print_summary(path, summary[path])
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
