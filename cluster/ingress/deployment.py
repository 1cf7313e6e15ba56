"""Ingress deployment: the FastAPI app (OpenAI HTTP API) and the gRPC server, in one class.

Data flow: Ray Serve's HTTP proxy (:8000) hands HTTP requests to the FastAPI routes below (with
mutual TLS, `tls.require_client_auth`, the replica's own HTTPS server does: cluster/ingress/http_server.py); the
replica's own gRPC server (:9000, cluster/ingress/grpc_server.py: LLMService, grpc.health.v1,
reflection, TLS) is started by the constructor and calls GrpcFrontend. Both go through one
IngressCore holding a DeploymentHandle per model (routed by the request's `model` field), so
both APIs share the prefix-affinity router's state in this process. HTTP responses carry
`x-shardserve-request-id` (the engine's request id, also the body's `id`) and
`x-shardserve-replica` (the LLMServer replica that served it); gRPC puts `x-request-id` and
`x-shardserve-replica` in trailing metadata. `/v1/stats` shows each model's router view (per
replica: requests routed, affinity hits, load, engine stats; the model's cost, cost_view.py); `/health` is 200
only when every model answers. `/metrics` is the whole app's Prometheus metrics (every LLMServer
replica, pulled on each scrape: cluster/metrics/scrape.py). With API keys configured (`auth.api_keys`, or `SHARDSERVE_API_KEY`), a middleware
(HTTP) and GrpcFrontend check the bearer key and its rate limit first (cluster/ingress/auth.py)
and the key's name becomes the request's tenant; /health, /metrics and the gRPC health RPCs stay
open (Prometheus' norm, like vLLM's /metrics: scrapers carry no key; key names, never keys, show).
A streaming HTTP response cancels its LLMServer call synchronously when it ends for any reason
(`_StreamResponse`), so a client that goes away always aborts the request in the engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from shardserve.cluster.config import AppConfig, parse_config
from shardserve.cluster.ingress import auth, http_edge, responses
from shardserve.cluster.ingress import openai as oai
from shardserve.cluster.ingress.core import ChunkStream, IngressCore
from shardserve.cluster.ingress.cost_view import model_cost
from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.ingress.grpc import GrpcFrontend
from shardserve.cluster.ingress.grpc_server import GrpcServer
from shardserve.cluster.ingress.http_server import HttpsServer
from shardserve.cluster.ingress.ratelimit import RateLimited
from shardserve.cluster.ingress.request_log import log_request
from shardserve.cluster.ingress.tls import ingress_serves_http
from shardserve.cluster.metrics import scrape
from shardserve.cluster.router import router_stats
from starlette.datastructures import Headers

# Seconds a client told "queue full" (429) should wait: about how long a CPU replica takes to drain
# a step's worth of requests; clients (the openai package) honour the header.
RETRY_AFTER_S = 1

api = FastAPI(
    title="shardserve", description="OpenAI-compatible API of a shardserve cluster.", responses=http_edge.ERROR_RESPONSES
)


class _RequireApiKey:
    """The API-key check of every route but the open ones; the key's name becomes the request's tenant.

    Plain ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs each route in a
    task of its own and pipes every streamed message through a memory stream (a hop per SSE event).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            root = scope.get("root_path", "")
            path = Request(scope).url.path
            route = path[len(root) :] if root and path.startswith(root) else path
            if route not in auth.OPEN_HTTP_PATHS:
                gate = auth.installed()
                try:
                    # The route runs in this task (its streaming body in a child task): it reads this context.
                    auth.CURRENT_TENANT.set(gate.admit(Headers(scope=scope).get("authorization")))
                except RateLimited as err:
                    headers = {"Retry-After": err.retry_after_header}
                    await JSONResponse(err.openai_body(), status_code=err.http_status, headers=headers)(
                        scope, receive, send
                    )
                    return
                except ApiError as err:
                    await JSONResponse(
                        err.openai_body(), status_code=err.http_status, headers={"WWW-Authenticate": "Bearer"}
                    )(scope, receive, send)
                    return
        await self.app(scope, receive, send)


api.add_middleware(_RequireApiKey)


class _StreamResponse(StreamingResponse):
    """A StreamingResponse that cancels its LLMServer call however it ends (Starlette does not
    close the body iterator when the response task is cancelled mid-send)."""

    def __init__(self, content: Any, stream: ChunkStream, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.chunk_stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.chunk_stream.cancel()


# Every 4xx/5xx in OpenAI's error shape (429 with Retry-After), and the request body limit
# (cluster/ingress/http_edge.py).
http_edge.install(api, retry_after_s=RETRY_AFTER_S)


def llm_server_name(index: int, model_name: str) -> str:
    """Deployment name of a model's LLMServer (Serve names allow no `#`, so keep it plain)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_name)
    return f"LLMServer_{index}_{safe}"


@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict[str, Any], handles: dict[str, Any]) -> None:
        app_config = parse_config(config, AppConfig)
        self.log_prompts = app_config.log_prompts
        self.gate = auth.Gate.from_config(app_config.auth)
        self.deployment_names = {m.name: llm_server_name(i, m.name) for i, m in enumerate(app_config.models)}
        self.core = IngressCore(app_config, handles, self.gate, self.deployment_names)
        http_edge.BODY_LIMIT.max_bytes = app_config.limits.max_body_bytes
        auth.install(self.gate)  # for the HTTP middleware (one Ingress per replica process)
        self.grpc_server = GrpcServer(app_config, GrpcFrontend(self.core, self.gate, self.log_prompts))
        self.grpc_server.start()
        # Mutual TLS on HTTP: this replica serves the routes below itself (no Serve HTTP proxy).
        self.https_server = HttpsServer(app_config, lambda: self.app) if ingress_serves_http(app_config.tls) else None
        if self.https_server is not None:
            self.https_server.start()

    async def __del__(self) -> None:
        # Serve awaits this when it stops the replica: close the gRPC port, cancel its calls.
        https = getattr(self, "https_server", None)  # absent when the constructor failed
        if https is not None:
            await https.stop()
        server = getattr(self, "grpc_server", None)
        if server is not None:
            await server.stop()

    # ---- OpenAI HTTP ----------------------------------------------------------------------
    async def _generate(self, kind: str, body: oai.CompletionRequest | oai.ChatCompletionRequest) -> Any:
        self.core.model(body.model)
        request = oai.to_generate_request(body, kind, self.core.config)
        request = dataclasses.replace(request, tenant=auth.CURRENT_TENANT.get(), user=body.user)
        log_request(request, self.log_prompts)
        first, rest = await self.core.first_chunk(request)
        # Serve sets its own x-request-id on every response; ours names the engine request.
        headers = {"x-shardserve-request-id": request.request_id, "x-shardserve-replica": first.replica_id}
        if body.stream:
            events = responses.sse_events(body, first, rest)
            return _StreamResponse(events, rest, media_type="text/event-stream", headers=headers)
        return JSONResponse(await responses.collect(body, first, rest), headers=headers)

    @api.post("/v1/completions")
    async def completions(self, body: oai.CompletionRequest) -> Any:
        return await self._generate("completion", body)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: oai.ChatCompletionRequest) -> Any:
        return await self._generate("chat", body)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        data = [
            {"id": m.name, "object": "model", "created": self.core.created, "owned_by": "shardserve",
             "root": m.source, "max_model_len": m.max_model_len}
            for m in self.core.config.models
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @api.get("/health")
    async def health(self) -> JSONResponse:
        statuses = await self.core.health()
        ok = all(s == "ok" for s in statuses.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": statuses}, status_code=200 if ok else 503)

    @api.get("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        body = await scrape.render(self.core.handles, self.deployment_names)
        return Response(body, media_type=scrape.CONTENT_TYPE)

    @api.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        return {
            "models": {
                name: {"deployment": deployment, "router": (router := router_stats(deployment)),
                       "cost": model_cost(router)}
                for name, deployment in self.deployment_names.items()
            }
        }
