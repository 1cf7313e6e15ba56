"""TLS end to end: `shardserve serve` with a `tls` section (mutual TLS on HTTP and gRPC), called over
HTTPS and gRPC with real clients, and the start-up banner's commands run as printed.

HTTPS is a Serve proxy option, fixed per Serve instance, so this module cannot use the session
cluster: it runs `shardserve serve` in a subprocess (tests/doubles/serve_fake.py: the command with the
fake engine passed in; its own short-lived local Ray, one fake-engine
model) and stops it with SIGINT at the end. The certificates (a CA, a server certificate for
localhost / 127.0.0.1 and a client certificate) are made here with `cryptography`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import queue
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ports import free_port
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = [pytest.mark.slow, pytest.mark.ray]
SERVE_FAKE = Path(__file__).resolve().parents[1] / "doubles" / "serve_fake.py"  # `shardserve serve`, fake engines
START_TIMEOUT_S = 240


def _certificates(folder: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name: str, issuer: tuple | None, *, ca: bool = False, server: bool = False) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            # Client auth too: the Helm chart's readiness probe presents the server's certificate.
            usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        elif not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(issuer_key, hashes.SHA256())
        return cert, key

    ca, other_ca = make("shardserve test CA", None, ca=True), make("another CA", None, ca=True)
    made = {"ca": ca, "server": make("localhost", ca, server=True), "client": make("client", ca),
            "stranger": make("client", other_ca)}  # a client certificate from a CA the server does not trust
    paths = {}
    for name, (cert, key) in made.items():
        paths[f"{name}_cert"] = folder / f"{name}.crt"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"] = folder / f"{name}.key"
        paths[f"{name}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))  # fmt: skip
    return paths


@dataclass
class Served:
    http_url: str
    grpc_target: str
    certs: dict[str, Path]
    banner: str


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("tls")
    certs = _certificates(folder)
    http_port = free_port()
    grpc_port = free_port(taken=(http_port,))
    config = {
        "ray": {"namespace": "shardserve-tls-test"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "grpc": {"port": grpc_port},
        "tls": {"cert_file": str(certs["server_cert"]), "key_file": str(certs["server_key"]),
                "ca_file": str(certs["ca_cert"]), "require_client_auth": True},
        "models": [{"name": "fake", "resources": {"num_cpus_per_worker": 0.25}}],
    }  # fmt: skip
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    cli = [sys.executable, str(SERVE_FAKE), str(path), "--num-cpus", "2"]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any("Ctrl-C stops the server" in line for line in seen):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            assert line is not None and time.monotonic() < deadline, "shardserve serve did not start:\n" + "".join(seen)
            seen.append(line)
        banner = "".join(seen[next(i for i, s in enumerate(seen) if "shardserve is up" in s):])
        yield Served(f"https://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", certs, banner)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the subprocess's own session: its Ray processes
            proc.wait(timeout=30)


def _ssl_context(served: Served, client: str | None = "client") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(served.certs["ca_cert"]))
    if client is not None:
        context.load_cert_chain(served.certs[f"{client}_cert"], served.certs[f"{client}_key"])
    return context


def test_https_mutual_tls(served):
    """HTTP is served by the Ingress replica (no Serve proxy) and requires a client certificate."""
    with httpx.Client(verify=_ssl_context(served), timeout=30) as http:
        r = http.post(served.http_url + "/v1/completions", json={"model": "fake", "prompt": "tls", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert http.get(served.http_url + "/health").json()["status"] == "ok"  # what the Helm probe calls
        client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", http_client=http, max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        assert client.chat.completions.create(model="fake", messages=messages, max_tokens=2).usage.completion_tokens == 2
        chunks = client.chat.completions.create(model="fake", messages=messages, max_tokens=4, stream=True)
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 4
        # The Ingress's own HTTPS server serves the app's Prometheus metrics too (cluster/metrics/).
        metrics = http.get(served.http_url + "/metrics")
        assert metrics.status_code == 200 and "shardserve:request_success_total" in metrics.text
    # No client certificate, one from another CA, or a server we cannot verify: refused at the handshake.
    for verify in (_ssl_context(served, client=None), _ssl_context(served, client="stranger"), True):
        with httpx.Client(verify=verify, timeout=10) as http, pytest.raises(httpx.TransportError) as err:
            http.get(served.http_url + "/health")
        assert isinstance(err.value, (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)), err.value
    with pytest.raises(httpx.HTTPError):
        httpx.get(served.http_url.replace("https://", "http://") + "/health", timeout=10)


def test_helm_readiness_probe_command(served):
    """The head pod's readiness probe with mutual TLS (helm/shardserve/templates/_helpers.tpl): the
    `shardserve probe` command presenting the server's own certificate; refused without one."""
    c = served.certs
    probe = [sys.executable, "-m", "shardserve.cluster.cli", "probe", served.http_url + "/health"]
    mutual = [*probe, "--cert", str(c["server_cert"]), "--key", str(c["server_key"])]
    ok = subprocess.run(mutual, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1 and "probe https://" in refused.stderr, refused


def _credentials(served: Served, client_cert: bool) -> grpc.ChannelCredentials:
    c = served.certs
    extra = {"private_key": c["client_key"].read_bytes(), "certificate_chain": c["client_cert"].read_bytes()}
    return grpc.ssl_channel_credentials(c["ca_cert"].read_bytes(), **(extra if client_cert else {}))


def test_grpc_mutual_tls(served):
    req = pb.GenerateRequest(model="fake", prompt="tls", params=pb.SamplingParams(max_tokens=3))
    with grpc.secure_channel(served.grpc_target, _credentials(served, client_cert=True)) as channel:
        assert rpc.LLMServiceStub(channel).Generate(req, timeout=30).num_tokens == 3
        assert len(list(rpc.LLMServiceStub(channel).GenerateStream(req, timeout=30))) == 3
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    # No client certificate, or no TLS at all: the handshake fails, nothing reaches the Ingress.
    for channel in (grpc.secure_channel(served.grpc_target, _credentials(served, client_cert=False)),
                    grpc.insecure_channel(served.grpc_target)):  # fmt: skip
        with channel, pytest.raises(grpc.RpcError) as err:
            rpc.LLMServiceStub(channel).Generate(req, timeout=15)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value


def test_banner_commands_run_as_printed(served):
    banner = served.banner
    assert f"curl --cacert {served.certs['ca_cert']} --cert CLIENT.crt --key CLIENT.key https://127.0.0.1:" in banner
    lines = [line.strip() for line in banner.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("curl "))
    curl = "\n".join(lines[start : start + 2])  # the command and its `-d` line (a `\` continuation)
    (python,) = [line for line in lines if line.startswith(shlex.quote(sys.executable))]

    def filled(command: str) -> str:  # the banner leaves the client certificate to the reader: ours
        return command.replace("CLIENT.crt", str(served.certs["client_cert"])).replace(
            "CLIENT.key", str(served.certs["client_key"])
        )

    out = subprocess.run(filled(curl) + " -sS --fail", shell=True, capture_output=True, text=True, timeout=60,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 32
    out = subprocess.run(filled(python), shell=True, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 32  # the fake engine's 32 words for max_tokens=32


def test_ingress_https_server_cancels_a_request_whose_client_left(tmp_path):
    """The Ingress's HTTPS server alone (no Ray): two of them share the port (SO_REUSEPORT, as the
    Ingress replicas do), and a client that disconnects mid-request cancels the route's task (what
    aborts the LLMServer call), as Serve's proxy does; uvicorn alone would let it run on."""
    import asyncio

    from shardserve.cluster.config import AppConfig, parse_config
    from shardserve.cluster.ingress.http_server import HttpsServer

    certs = _certificates(tmp_path)
    port = free_port()
    tls = {"cert_file": str(certs["server_cert"]), "key_file": str(certs["server_key"]),
           "ca_file": str(certs["ca_cert"]), "require_client_auth": True}  # fmt: skip
    config = parse_config({"models": [{"name": "m"}], "http": {"host": "127.0.0.1", "port": port}, "tls": tls},
                          AppConfig)  # fmt: skip

    async def main() -> None:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def route(scope, receive, send) -> None:  # a non-streaming route waiting on its engine
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        servers = [HttpsServer(config, lambda: route) for _ in range(2)]
        for server in servers:
            server.start()
        while not all(s.server.started for s in servers):
            await asyncio.sleep(0.05)
        context = ssl.create_default_context(cafile=str(certs["ca_cert"]))
        context.load_cert_chain(certs["client_cert"], certs["client_key"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
        await asyncio.wait_for(started.wait(), 10)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 10)
        for server in servers:
            await server.stop()

    asyncio.run(main())
