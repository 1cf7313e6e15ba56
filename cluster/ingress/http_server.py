"""The HTTPS server of one Ingress replica, for mutual TLS (`tls.require_client_auth: true`).

Data flow: Ray Serve's HTTP proxy cannot require client certificates (it passes uvicorn no
`ssl_cert_reqs`), so in that mode Serve starts no HTTP proxy (`serve_options`, cluster/app.py) and
the Ingress constructor starts this server on its own event loop, like its gRPC server: uvicorn
(installed with Serve) binds `http.host:http.port` with SO_REUSEPORT (the `ingress.num_replicas`
replicas on the head node share the port) and TLS with `ssl.CERT_REQUIRED` against `tls.ca_file`,
so a client without a certificate signed by that CA fails the handshake and reaches no route. The
requests that pass go to the Ingress's own FastAPI app (the one `@serve.ingress` wraps, read when a
request arrives: Serve sets it after the constructor), the same routes, middleware and error shapes
as behind the proxy. `_cancel_on_disconnect` does what Serve's proxy does: a client that goes away
cancels its request's task, which aborts the LLMServer call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import uvicorn
from shardserve.cluster.config import AppConfig

ASGIApp = Callable[..., Any]
SHUTDOWN_GRACE_S = 5
KEEP_ALIVE_S = 90  # above common load balancers' idle timeouts (Serve's proxy default is 90 too)

logger = logging.getLogger("ray.serve")


def _cancel_on_disconnect(app: ASGIApp) -> ASGIApp:
    """Run each HTTP request in a task that `http.disconnect` cancels (uvicorn itself lets a
    non-streaming route run on after its client left). Messages reach the app unchanged."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        sent_all = False  # uvicorn also answers `http.disconnect` once the response is complete

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal sent_all
            await send(message)
            sent_all = sent_all or (message["type"] == "http.response.body" and not message.get("more_body"))

        task = asyncio.ensure_future(app(scope, inbox.get, tracked_send))

        async def pump() -> None:
            while True:
                message = await receive()
                await inbox.put(message)
                if message["type"] == "http.disconnect":
                    if not sent_all:
                        task.cancel()
                    return

        pumping = asyncio.ensure_future(pump())
        try:
            await task
        except asyncio.CancelledError:
            if not pumping.done():  # cancelled from outside, not by a disconnect
                raise
        finally:
            pumping.cancel()

    return wrapped


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))  # errors raise here, in the replica's constructor
    return sock


class HttpsServer:
    """uvicorn serving `app_of()` over mutual TLS on the config's HTTP address."""

    def __init__(self, config: AppConfig, app_of: Callable[[], ASGIApp]) -> None:
        tls = config.tls
        assert tls is not None and tls.require_client_auth and tls.ca_file is not None

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await app_of()(scope, receive, send)

        self.address = f"{config.http.host}:{config.http.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                _cancel_on_disconnect(app), lifespan="off", access_log=False, log_config=None,
                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file, ssl_ca_certs=tls.ca_file,
                ssl_cert_reqs=ssl.CERT_REQUIRED,
            )
        )  # fmt: skip
        # Signals stay Ray's: uvicorn would take SIGINT/SIGTERM when run on the process's main thread.
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self.server.config.load()  # reads the files now: a bad certificate fails the constructor
        self.sock = _bind(config.http.host, config.http.port)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start serving on the running loop (the Ingress replica's)."""
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        logger.info(f"HTTPS server (mutual TLS) listening on {self.address}")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            try:
                await self._task
            except Exception:  # it failed earlier: still close the socket
                logger.exception("HTTPS server ended with an error")
        self.sock.close()
