"""`shardserve serve CONFIG.yaml`: start or join Ray, run the app (HTTP + gRPC), block until Ctrl-C.

Data flow: `load_config` validates the YAML (the `--speculative-*` flags override every model's
`speculative` section) → `ray.init` (a local Ray when `ray.address` is
null, else joins `auto` / `ray://host:port`) → `serve.start` with the config's HTTP and gRPC
proxy options → `serve.run(build_app(config))` → print the curl and Python gRPC commands that
call it (`usage_text`: https / TLS credentials / a bearer key as configured) → sleep until SIGINT/SIGTERM, then delete the app and shut Serve (and a Ray we started)
down. Ray is imported inside the function so `shardserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from typing import TYPE_CHECKING

from shardserve.cluster.commands.engine_flags import add_engine_flags, given_engine_flags

if TYPE_CHECKING:
    from shardserve.cluster.config import ServeConfig
    from shardserve.cluster.server import EngineFactory

APP_NAME = "shardserve"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="Serve the models of a config file (HTTP :8000, gRPC :9000).")
    parser.add_argument("config", help="serve config YAML (see `shardserve config schema`)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs of a locally started Ray.")
    add_engine_flags(parser, sections=("speculative",))  # --speculative-method ... for every model
    parser.set_defaults(func=run)


def usage_text(config: ServeConfig) -> str:
    """The commands that call a running app (printed by `serve`).

    The gRPC example runs the interpreter that runs shardserve (`sys.executable`: a bare `python`
    may lack the venv's grpc and shardserve), with TLS credentials when `tls` is set.
    """
    from shardserve.workers.env_overrides import api_key

    http, grpc_port, model, tls = config.http, config.grpc.port, config.models[0].name, config.tls
    host = "localhost" if http.host in ("0.0.0.0", "::") else http.host
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'
    scheme, curl_tls, channel = "http", "", f"grpc.insecure_channel('{host}:{grpc_port}')"
    if tls is not None:
        ca = tls.ca_file or tls.cert_file
        scheme, curl_tls = "https", f" --cacert {shlex.quote(ca)}"
        client = ""
        if tls.require_client_auth:
            curl_tls += " --cert CLIENT.crt --key CLIENT.key"
            client = ", private_key=open('CLIENT.key', 'rb').read(), certificate_chain=open('CLIENT.crt', 'rb').read()"
        creds = f"grpc.ssl_channel_credentials(open({ca!r}, 'rb').read(){client})"
        channel = f"grpc.secure_channel('{host}:{grpc_port}', {creds})"
    keyed = bool(config.auth.api_keys) or api_key() is not None
    curl_key = " -H \"Authorization: Bearer $API_KEY\"" if keyed else ""
    grpc_key = ", metadata=[('authorization', 'Bearer ' + os.environ['API_KEY'])]" if keyed else ""
    lines = [
        f"shardserve is up: models {[m.name for m in config.models]}",
        "",
        "HTTP (OpenAI-compatible):",
        f"  curl{curl_tls} {scheme}://{host}:{http.port}/v1/chat/completions -H 'Content-Type: application/json'"
        f"{curl_key} \\",
        f"    -d '{body}'",
        "",
        "gRPC (shardserve.v1.LLMService; grpc.health.v1 and server reflection on the same port):",
        f"  {shlex.quote(sys.executable)} -c \"import os, grpc; "
        "from shardserve.cluster.proto import llm_pb2 as pb, llm_pb2_grpc as rpc; "
        f"stub = rpc.LLMServiceStub({channel}); "
        f"print(stub.Generate(pb.GenerateRequest(model='{model}', prompt='Hello', "
        f"params=pb.SamplingParams(max_tokens=32)){grpc_key}).text)\"",
    ]
    if keyed:
        lines += ["", "(API keys are on: export API_KEY=<one of your keys> first.)"]
    if tls is not None and tls.require_client_auth:
        lines += ["(mutual TLS on both APIs: CLIENT.crt / CLIENT.key are a client certificate signed by tls.ca_file.)"]
    return "\n".join([*lines, "", "Ctrl-C stops the server."])


def run(args: argparse.Namespace, engine_factory: EngineFactory | None = None) -> int:
    """The `serve` command; `engine_factory` is for Python callers only (tests: a fake engine)."""
    from shardserve.cluster.config import ConfigError, load_config

    speculative = {("method" if k == "speculative_method" else k): v for k, v in given_engine_flags(args).items()}
    try:
        config = load_config(args.config, speculative=speculative)
    except ConfigError as err:
        print(f"invalid config: {err}", file=sys.stderr)
        return 2

    import ray
    from ray import serve
    from shardserve.cluster.app import build_app, serve_env, serve_options

    started_ray = config.ray.address is None
    local = {"num_cpus": args.num_cpus} if started_ray else {}
    with serve_env():  # a local Ray's Serve processes get it; a running cluster has its own (Helm chart)
        ray.init(address=config.ray.address, namespace=config.ray.namespace, **local)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(**serve_options(config))
        serve.run(build_app(config, engine_factory), name=APP_NAME, route_prefix="/")
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
