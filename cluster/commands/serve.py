"""`shardserve serve CONFIG.yaml`: start or join Ray, run the app (HTTP + gRPC), block until Ctrl-C.

Data flow: `load_config` validates the YAML → `ray.init` (a local Ray when `ray.address` is
null, else joins `auto` / `ray://host:port`) → `serve.start` with the config's HTTP and gRPC
proxy options → `serve.run(build_app(config))` → print the curl and Python gRPC commands that
call it → sleep until SIGINT/SIGTERM, then delete the app and shut Serve (and a Ray we started)
down. Ray is imported inside the function so `shardserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

APP_NAME = "shardserve"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="Serve the models of a config file (HTTP :8000, gRPC :9000).")
    parser.add_argument("config", help="serve config YAML (see `shardserve config schema`)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs of a locally started Ray.")
    parser.set_defaults(func=run)


def usage_text(config: object) -> str:
    """The commands that call a running app (printed by `serve`)."""
    http, grpc_port, model = config.http, config.grpc.port, config.models[0].name  # type: ignore[attr-defined]
    host = "localhost" if http.host in ("0.0.0.0", "::") else http.host
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'
    return "\n".join(
        [
            f"shardserve is up: models {[m.name for m in config.models]}",  # type: ignore[attr-defined]
            "",
            "HTTP (OpenAI-compatible):",
            f"  curl http://{host}:{http.port}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"    -d '{body}'",
            "",
            "gRPC (shardserve.v1.LLMService):",
            "  python -c \"import grpc; from shardserve.cluster.proto import llm_pb2 as pb, llm_pb2_grpc as rpc; "
            f"stub = rpc.LLMServiceStub(grpc.insecure_channel('{host}:{grpc_port}')); "
            f"print(stub.Generate(pb.GenerateRequest(model='{model}', prompt='Hello', "
            "params=pb.SamplingParams(max_tokens=32))).text)\"",
            "",
            "Ctrl-C stops the server.",
        ]
    )


def run(args: argparse.Namespace) -> int:
    from shardserve.cluster.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"invalid config: {err}", file=sys.stderr)
        return 2

    import ray
    from ray import serve
    from shardserve.cluster.app import build_app, serve_options

    started_ray = config.ray.address is None
    local = {"num_cpus": args.num_cpus} if started_ray else {}
    ray.init(address=config.ray.address, namespace=config.ray.namespace, **local)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(**serve_options(config))
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        print(usage_text(config), flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("shutting down ...", file=sys.stderr)
        try:
            serve.delete(APP_NAME)
        except Exception as err:  # the app may never have started
            print(f"serve.delete({APP_NAME!r}): {err}", file=sys.stderr)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return 0
