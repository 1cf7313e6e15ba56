"""The direct stream's wire: an LLMServer replica's own port and the Ingress's calls to it.

Data flow: each LLMServer replica starts a `DirectServer` (asyncio TCP on an ephemeral port of its
node; TLS with Ray's certificates when RAY_USE_TLS, as Serve's own replica port) and publishes its
node IP and port through Serve's `record_replica_metadata` hook, which Serve hands to every router.
Frames are a 4-byte length and a pickle; both ends unpickle only the message classes
(`MESSAGE_CLASSES`). A connection opens with the Ray cluster's auth token (checked when token auth
is on), then carries one call at a time: a `GenerateRequest` in, the `GenerateChunk`s of the
replica's own `generate` out (errors, metrics, traces, abort-on-cancel as on the handle path), an
empty frame at the end; the Ingress's `DirectClient` keeps idle connections for the next call.
Cancelling a call closes its connection; the server sees it and cancels the generator, whose
`finally` aborts the request (TCP keepalive ends the calls of a peer whose node vanished). `stop(grace)` closes the port and idle connections at once (callers
fall back to Serve's handle) and lets running calls finish. Why not gRPC: grpc.aio's per-message
cost was most of the hop. Picking the replica and falling back: cluster/ingress/direct.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pickle
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

from shardserve.cluster import messages
from shardserve.workers.request import SamplingParams

METADATA_KEY = "direct_stream_address"  # "host:port" in the replica's record_replica_metadata
MAX_FRAME_BYTES = 2**30  # a request or chunk (prompts and logprobs can be large)
MAX_AUTH_BYTES = 1 << 16  # the first frame of a connection: the auth header
AUTH_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
MAX_IDLE_PER_ADDRESS = 64  # idle connections the client keeps per replica
MESSAGE_CLASSES = {
    (cls.__module__, cls.__name__): cls
    for cls in (
        messages.GenerateRequest, messages.GenerateChunk, messages.CompletionDelta, messages.PositionLogprob,
        messages.TokenLogprob, messages.ErrorInfo, messages.ErrorKind, SamplingParams,
    )
}  # fmt: skip


class DirectStreamError(ConnectionError):
    """The connection failed or the peer broke the protocol (`started`: after a chunk arrived)."""

    def __init__(self, message: str, started: bool) -> None:
        super().__init__(message)
        self.started = started


class _MessageUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        cls = MESSAGE_CLASSES.get((module, name))
        if cls is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not a direct-stream message")
        return cls


def frame(message: Any) -> bytes:
    data = b"" if message is None else pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "little") + data


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME_BYTES) -> bytes:
    """One frame's bytes (b"" for the end frame); a longer frame than `limit` is a protocol error."""
    size = int.from_bytes(await reader.readexactly(4), "little")
    if size > limit:
        raise ConnectionError(f"a frame of {size} bytes, over the limit of {limit}")
    return await reader.readexactly(size) if size else b""


def loads(data: bytes) -> Any:
    return _MessageUnpickler(io.BytesIO(data)).load()


def _tls(server_side: bool) -> ssl.SSLContext | None:
    """Ray's TLS files (RAY_USE_TLS, RAY_TLS_SERVER_CERT / _KEY / RAY_TLS_CA_CERT): both ends present
    the node certificate and trust only Ray's CA (mutual TLS, as Ray's own gRPC ports)."""
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH)
    context.load_cert_chain(os.environ["RAY_TLS_SERVER_CERT"], os.environ["RAY_TLS_SERVER_KEY"])
    context.load_verify_locations(os.environ["RAY_TLS_CA_CERT"])
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False  # node IPs; the CA is the cluster's own
    return context


def _listening_socket() -> socket.socket:
    """An ephemeral port on every interface: one dual-stack socket (one port for IPv4 and IPv6), or
    IPv4 alone where the host has no IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("0.0.0.0", 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive: a peer whose node vanished (no FIN, no RST) fails the connection in about
    KEEPALIVE_IDLE_S + 3 x KEEPALIVE_INTERVAL_S, as Ray notices a dead node, not after TCP's minutes."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _auth_header() -> bytes:
    """The Ray cluster's token as Ray's own gRPC clients send it ("" when token auth is off)."""
    from ray._private.authentication.grpc_authentication_client_interceptor import (
        _get_authentication_metadata_tuple,
    )

    return "".join(value for _, value in _get_authentication_metadata_tuple()).encode()


def _auth_ok(header: bytes) -> bool:
    from ray._private.authentication.authentication_utils import is_token_auth_enabled, validate_request_token

    return not is_token_auth_enabled() or validate_request_token(header.decode(errors="replace"))


GenerateFn = Callable[[messages.GenerateRequest], AsyncIterator[messages.GenerateChunk]]


class DirectServer:
    """The replica's side: serves `generate` on an ephemeral port of this node (`port`, after start)."""

    def __init__(self, generate: GenerateFn) -> None:
        self._generate = generate
        self._server: asyncio.Server | None = None
        self._idle: dict[asyncio.StreamWriter, bool] = {}  # open connections -> waiting for a request
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, sock=_listening_socket(), ssl=_tls(server_side=True))
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        """Where other nodes reach this port: this node's IP (as Ray knows it) and the port."""
        import ray

        ip = ray.util.get_node_ip_address()
        return f"[{ip}]:{self.port}" if ":" in ip else f"{ip}:{self.port}"

    async def stop(self, grace_s: float) -> None:
        if self._server is not None:
            self._server.close()
        for writer, idle in list(self._idle.items()):
            if idle:
                writer.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._idle and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for writer in list(self._idle):
            writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._idle[writer] = True
        _keepalive(writer)
        try:
            # Before the token is checked: a bounded frame, in bounded time.
            if not _auth_ok(await asyncio.wait_for(read_frame(reader, MAX_AUTH_BYTES), AUTH_TIMEOUT_S)):
                return
            while True:
                data = await read_frame(reader)
                self._idle[writer] = False
                if not await self._serve(loads(data), reader, writer):
                    return  # the client left mid-call
                self._idle[writer] = True
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError, EOFError, ValueError, pickle.UnpicklingError):
            return  # closed between calls, or not our protocol
        finally:
            self._idle.pop(writer, None)
            writer.close()

    async def _serve(self, request: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Stream one call; False if the client closed the connection first (the call was cancelled)."""
        if not isinstance(request, messages.GenerateRequest):
            return False
        sending = asyncio.ensure_future(self._send(request, writer))
        left = asyncio.ensure_future(reader.read(1))  # the client sends nothing while a call runs: EOF = gone
        try:
            await asyncio.wait({sending, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sending, left):
                task.cancel()
            await asyncio.wait({sending, left})
        if not left.cancelled():  # data or EOF from the client mid-call: it left (the generator was cancelled)
            return False
        return not sending.cancelled() and sending.exception() is None

    async def _send(self, request: messages.GenerateRequest, writer: asyncio.StreamWriter) -> None:
        async with contextlib.aclosing(self._generate(request)) as chunks:
            async for chunk in chunks:
                writer.write(frame(chunk))
                await writer.drain()
        writer.write(frame(None))
        await writer.drain()


class DirectCall:
    """One call on a pooled connection: `read()` the chunks (None after the last), `cancel()` (sync).

    The chunk marked `finished` is handed over at once; the end frame behind it is read in the
    background, and only then is the connection idle again (and the done callbacks run)."""

    def __init__(self, client: DirectClient, address: str, request: messages.GenerateRequest) -> None:
        self._client = client
        self.address = address
        self._request = request
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._started = False
        self._done = False
        self._tail: asyncio.Future[None] | None = None  # reads the end frame after the finished chunk
        self._callbacks: list[Callable[[DirectCall], None]] = []

    async def read(self) -> messages.GenerateChunk | None:
        if self._tail is not None or self._done:
            return None
        try:
            if self._conn is None:
                self._conn = await self._client._checkout(self.address)
                self._conn[1].write(frame(self._request))
            data = await read_frame(self._conn[0])
            chunk = loads(data) if data else None
        except (OSError, EOFError, asyncio.IncompleteReadError, pickle.UnpicklingError, ssl.SSLError) as err:
            self._finish(reuse=False)
            raise DirectStreamError(f"{type(err).__name__}: {err}", self._started) from None
        except BaseException:  # cancelled mid-read: the connection is in an unknown state
            self._finish(reuse=False)
            raise
        if chunk is None:
            self._finish(reuse=True)
            return None
        self._started = True
        if chunk.finished:
            self._tail = asyncio.ensure_future(self._read_end())
        return chunk

    async def _read_end(self) -> None:
        assert self._conn is not None
        try:
            ended = await read_frame(self._conn[0]) == b""
        except (OSError, EOFError, asyncio.IncompleteReadError, ssl.SSLError):
            ended = False
        self._finish(reuse=ended)

    def cancel(self) -> None:
        if self._tail is None:  # after the finished chunk the call ends by itself
            self._finish(reuse=False)

    def add_done_callback(self, callback: Callable[[DirectCall], None]) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def _finish(self, reuse: bool) -> None:
        if self._done:
            return
        self._done = True
        if self._conn is not None:
            if reuse:
                self._client._checkin(self.address, self._conn)
            else:
                self._conn[1].transport.abort()
        for callback in self._callbacks:
            callback(self)


class DirectClient:
    """The Ingress's side: idle connections per replica address, reused one call at a time."""

    def __init__(self) -> None:
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    def call(self, address: str, request: messages.GenerateRequest) -> DirectCall:
        return DirectCall(self, address, request)

    async def _checkout(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        idle = self._idle.get(address, [])
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
        host, port = address.rsplit(":", 1)
        opening = asyncio.open_connection(host.strip("[]"), int(port), ssl=_tls(server_side=False))
        reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT_S)  # TimeoutError is an OSError
        _keepalive(writer)
        writer.write(len(header := _auth_header()).to_bytes(4, "little") + header)
        return reader, writer

    def _checkin(self, address: str, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        idle = self._idle.setdefault(address, [])
        if len(idle) < MAX_IDLE_PER_ADDRESS:
            idle.append(conn)
        else:
            conn[1].close()

    def forget(self, address: str) -> None:
        """Drop the idle connections to `address` (its replica refused or is gone)."""
        for _, writer in self._idle.pop(address, []):
            writer.transport.abort()
