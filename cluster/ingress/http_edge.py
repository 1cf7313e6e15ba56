"""HTTP edge of the Ingress: one OpenAI error shape for every 4xx/5xx, and the request body limit.

Data flow: `install(api)` registers, on the FastAPI app before Serve freezes it (serve.ingress
pickles the app when the class is decorated), a body-limit middleware and exception handlers:
  - `BodyLimitMiddleware` answers 413 at once when Content-Length exceeds `limits.max_body_bytes`;
    otherwise it runs Starlette's `RequestBodyLimitMiddleware` (a well-kept counter of streamed
    bodies), whose 413 HTTPException reaches the handler below. The limit lives in `BODY_LIMIT`,
    set by the Ingress constructor from its config (one Ingress per replica process);
  - `ApiError` → its own status and body; FastAPI's `RequestValidationError` → 400 with `param`
    naming the field (`messages[0].role`, never a JSON byte offset: a JSON syntax error has no
    field, so param is null); Starlette's `HTTPException` (unknown route 404, wrong method 405,
    undecodable body 400, 413) → the same shape; any other exception → 500 `internal` without
    internals. Bodies: `{"error": {"message", "type", "param", "code"}}` (cluster/ingress/errors.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from shardserve.cluster.ingress.errors import ApiError, short
from shardserve.cluster.ingress.ratelimit import RateLimited
from shardserve.cluster.messages import ErrorKind
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send


class _BodyLimit:
    max_bytes: int = 8 << 20  # replaced by the Ingress with its config's limits.max_body_bytes


BODY_LIMIT = _BodyLimit()
# pydantic's loc entries that name a union member or a validator, not a field.
_LOC_TAGS = ("str", "int", "float", "bool", "list", "dict", "none", "tagged-union", "function-after")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every 4xx/5xx answer of this API."""

    error: ErrorBody


# The OpenAPI document lists these answers on every route (schemathesis checks answers against it).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in (
        (400, "Invalid request (`param` names the field)"), (401, "Missing or wrong API key"),
        (404, "Unknown model or route"), (405, "Method not allowed"), (413, "Request body too large"),
        (422, "Unprocessable request"), (429, "Queue full"), (500, "Internal error"), (503, "No healthy replica"),
    )
}  # fmt: skip


def too_large(limit: int) -> ApiError:
    return ApiError(
        ErrorKind.INVALID_ARGUMENT,
        f"request body must be at most {limit} bytes (limits.max_body_bytes)",
        None,
        http_status=413,
        code="request_too_large",
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = BODY_LIMIT.max_bytes
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _render(too_large(limit))(scope, receive, send)
            return
        await RequestBodyLimitMiddleware(self.app, max_body_size=limit)(scope, receive, send)


def _render(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.openai_body(), status_code=err.http_status, headers=headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _LOC_TAGS or "[" in str(part):
            break  # `prompt.str` / `prompt.list[int]`: the union member pydantic tried
        else:
            param = f"{param}.{part}" if param else str(part)
    return param or None


def validation_error(err: RequestValidationError) -> ApiError:
    first = err.errors()[0]
    kind, loc = first.get("type"), tuple(first.get("loc", ()))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "syntax error")
        offset = loc[1] if len(loc) > 1 else "?"
        return ApiError(
            ErrorKind.INVALID_ARGUMENT, f"request body is not valid JSON: {detail} at byte {offset}"
        )
    param = _param(loc)
    if param is None:
        message = "request body must be a JSON object (Content-Type: application/json)"
        if kind != "missing":
            message += f": {first['msg']}"
        return ApiError(ErrorKind.INVALID_ARGUMENT, message)
    return ApiError(ErrorKind.INVALID_ARGUMENT, f"{param}: {first['msg']}", param)


def http_error(request: Request, err: StarletteHTTPException) -> ApiError:
    path = short(request.url.path)
    if err.status_code == 404:
        return ApiError(
            ErrorKind.NOT_FOUND, f"no route {path}; see /docs for the API", None, code="route_not_found"
        )
    if err.status_code == 405:
        return ApiError(
            ErrorKind.INVALID_ARGUMENT,
            f"method {short(request.method)} is not allowed on {path}",
            None,
            http_status=405,
            code="method_not_allowed",
        )
    if err.status_code == 413:
        return too_large(BODY_LIMIT.max_bytes)
    if err.status_code == 400:  # FastAPI's "There was an error parsing the body" (e.g. invalid UTF-8)
        return ApiError(
            ErrorKind.INVALID_ARGUMENT, "request body could not be read: it must be UTF-8 encoded JSON"
        )
    kind = ErrorKind.INTERNAL if err.status_code >= 500 else ErrorKind.INVALID_ARGUMENT
    return ApiError(kind, short(err.detail, 200), None, http_status=err.status_code)


def install(api: FastAPI, retry_after_s: int = 1) -> None:
    """Register the body limit and the exception handlers (before serve.ingress freezes `api`).
    A 429 (queue full) carries `Retry-After: retry_after_s`, a key's rate limit its own wait; clients
    (the openai package) honour it."""
    api.add_middleware(BodyLimitMiddleware)

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(retry_after_s)} if err.kind == ErrorKind.QUEUE_FULL else None
        if isinstance(err, RateLimited):  # a key's token budget (cluster/ingress/auth.py admit_tokens)
            headers = {"Retry-After": err.retry_after_header}
        return _render(err, headers=headers)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return _render(validation_error(err))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _render(http_error(request, err), headers=getattr(err, "headers", None))

    @api.exception_handler(Exception)
    async def _internal_error(_: Request, err: Exception) -> JSONResponse:
        return _render(
            ApiError(ErrorKind.INTERNAL, f"internal error ({type(err).__name__}); see the server log")
        )
