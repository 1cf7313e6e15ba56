"""gRPC front end of shardserve.v1.LLMService, served by the Ingress's own gRPC server.

Data flow: the grpc.aio server of each Ingress replica (cluster/ingress/grpc_server.py) decodes a
call and invokes the method of the same name (Generate, GenerateStream, ListModels, Health).
`GrpcFrontend` maps the proto onto a `GenerateRequest` (text prompt, chat messages or token ids),
streams `GenerateChunk`s from IngressCore and answers with `GenerateResponse`s: unary joins each
completion's deltas (n of them, with logprobs when asked) into `completions`, completion 0 also
in the top-level fields; streaming sends one message per completion of each chunk the LLMServer
sends. The request id comes from `x-request-id` metadata (or is made up) and goes back in trailing
metadata with `x-shardserve-replica`. With API keys configured the `authorization` metadata is
checked first (UNAUTHENTICATED; over its rate limit RESOURCE_EXHAUSTED with `retry-after`) and the
key's name becomes the tenant. Validation matches HTTP's (cluster/ingress/validation.py, params
named `params.n`); undecodable bytes arrive as an `UndecodableRequest` (grpc_decode.py): all
INVALID_ARGUMENT. Errors set the status code and details on the context. A client cancel or
deadline cancels this call, which cancels the LLMServer call (`ChunkStream.cancel`) and aborts the
request in the engine.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from shardserve.cluster.ingress import validation
from shardserve.cluster.ingress.auth import Gate
from shardserve.cluster.ingress.core import ChunkStream, IngressCore
from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.ingress.grpc_decode import UndecodableRequest
from shardserve.cluster.ingress.ratelimit import RateLimited
from shardserve.cluster.ingress.request_log import log_request
from shardserve.cluster.messages import (
    CompletionDelta,
    ErrorKind,
    GenerateChunk,
    GenerateRequest,
    PositionLogprob,
)
from shardserve.cluster.proto import llm_pb2
from shardserve.cluster.server import param_of
from shardserve.workers.request import SamplingParams

REQUEST_ID_KEY = "x-request-id"
REPLICA_KEY = "x-shardserve-replica"
RETRY_AFTER_KEY = "retry-after"

_SCALARS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "min_tokens", "ignore_eos", "n", "logprobs",
)  # fmt: skip


def to_sampling_params(proto: Any) -> SamplingParams:
    kwargs: dict[str, Any] = {f: getattr(proto, f) for f in _SCALARS if proto.HasField(f)}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if name in kwargs:  # float32 on the wire: 0.7 arrives as 0.699999988
            kwargs[name] = round(kwargs[name], 6)
    kwargs["stop"] = tuple(proto.stop)
    kwargs["stop_token_ids"] = tuple(proto.stop_token_ids)
    try:
        return SamplingParams(**kwargs)
    except ValueError as err:
        field = param_of(str(err))
        raise ApiError(ErrorKind.INVALID_ARGUMENT, str(err), f"params.{field}" if field else "params") from None


def _metadata(context: Any, key: str) -> str | None:
    for k, value in context.invocation_metadata():
        if k == key and value:
            return value
    return None


def _request_id(context: Any) -> str:
    return _metadata(context, REQUEST_ID_KEY) or f"grpc-{uuid.uuid4().hex}"


def _logprobs(positions: Sequence[PositionLogprob], num: int | None) -> list[Any]:
    if num is None:
        return []

    def one(t: Any) -> Any:
        return llm_pb2.TokenLogprob(token_id=t.token_id, token=t.text, logprob=t.logprob, rank=t.rank)

    return [llm_pb2.TokenLogprobs(sampled=one(p.token), top=[one(c) for c in p.top(num)]) for p in positions]


async def _chain(first: GenerateChunk, rest: ChunkStream) -> AsyncIterator[GenerateChunk]:
    yield first
    async for chunk in rest:
        yield chunk


@dataclass
class _Completion:
    texts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str = ""
    logprobs: list[PositionLogprob] = field(default_factory=list)

    def add(self, d: CompletionDelta) -> None:
        self.texts.append(d.text)
        self.num_tokens += d.num_tokens
        self.finish_reason = d.finish_reason or self.finish_reason
        self.logprobs.extend(d.logprobs or ())


def details_of(err: ApiError) -> str:
    return f"{err.param}: {err.message}" if err.param and not err.message.startswith(err.param) else err.message


def _fail(context: Any, err: ApiError, request_id: str | None = None) -> None:
    context.set_code(err.grpc_status)
    context.set_details(details_of(err))
    metadata = [] if request_id is None else [(REQUEST_ID_KEY, request_id)]
    if isinstance(err, RateLimited):
        metadata.append((RETRY_AFTER_KEY, err.retry_after_header))
    if metadata:
        context.set_trailing_metadata(metadata)


class GrpcFrontend:
    def __init__(self, core: IngressCore, gate: Gate, log_prompts: bool = False) -> None:
        self.core = core
        self.gate = gate
        self.log_prompts = log_prompts

    def _admit(self, context: Any) -> str | None:
        return self.gate.admit(_metadata(context, "authorization"))

    def _generate_request(self, proto: Any, request_id: str, tenant: str | None) -> GenerateRequest:
        if isinstance(proto, UndecodableRequest):
            raise ApiError(ErrorKind.INVALID_ARGUMENT, proto.message())
        request = self._parse(proto, request_id)
        validation.check_limits(request, self.core.model(proto.model), self.core.config.limits, params_prefix="params.")
        request = dataclasses.replace(request, tenant=tenant)
        log_request(request, self.log_prompts)
        return request

    def _parse(self, proto: Any, request_id: str) -> GenerateRequest:
        self.core.model(proto.model)
        params = to_sampling_params(proto.params)
        which = proto.WhichOneof("input")
        if which == "messages":
            # OpenAI's `developer` is the system role, as on HTTP; check_limits refuses unknown roles.
            messages = tuple(
                ("system" if m.role == "developer" else m.role, m.content) for m in proto.messages.messages
            )
            if not messages:
                raise ApiError(ErrorKind.INVALID_ARGUMENT, "messages must be non-empty", "messages")
            return GenerateRequest(request_id, proto.model, params, messages=messages, priority=proto.priority)
        if which == "prompt_token_ids":
            token_ids = tuple(proto.prompt_token_ids.ids)
            if not token_ids:
                raise ApiError(ErrorKind.INVALID_ARGUMENT, "prompt_token_ids must be non-empty", "prompt_token_ids")
            return GenerateRequest(request_id, proto.model, params, prompt=token_ids, priority=proto.priority)
        if not proto.prompt:
            raise ApiError(
                ErrorKind.INVALID_ARGUMENT, "prompt must be non-empty (or send messages or prompt_token_ids)", "prompt"
            )
        return GenerateRequest(request_id, proto.model, params, prompt=proto.prompt, priority=proto.priority)

    def _trailers(self, context: Any, request_id: str, chunk: GenerateChunk | None) -> None:
        metadata = [(REQUEST_ID_KEY, request_id)]
        if chunk is not None:
            metadata.append((REPLICA_KEY, chunk.replica_id))
        context.set_trailing_metadata(metadata)

    async def generate(self, proto: Any, context: Any) -> Any:
        request_id = _request_id(context)
        self._trailers(context, request_id, None)
        completions: dict[int, _Completion] = {}
        first: GenerateChunk | None = None
        last: GenerateChunk | None = None
        stream: ChunkStream | None = None
        try:
            request = self._generate_request(proto, request_id, self._admit(context))
            stream = self.core.stream(request)
            async for chunk in stream:
                first, last = first or chunk, chunk
                for d in chunk.deltas:
                    completions.setdefault(d.index, _Completion()).add(d)
        except ApiError as err:
            _fail(context, err, request_id)
            return llm_pb2.GenerateResponse(request_id=request_id)
        finally:
            if stream is not None:
                stream.cancel()
        self._trailers(context, request_id, first)
        num = request.params.logprobs
        cost_usd = last.cost_usd if last is not None else None
        done = [
            llm_pb2.Completion(index=i, text="".join(c.texts), num_tokens=c.num_tokens,
                               finish_reason=c.finish_reason, logprobs=_logprobs(c.logprobs, num))
            for i, c in sorted(completions.items())
        ]  # fmt: skip
        head = done[0] if done else llm_pb2.Completion()
        return llm_pb2.GenerateResponse(
            request_id=request_id,
            text=head.text,
            num_tokens=head.num_tokens,
            finish_reason=head.finish_reason,
            usage=self._usage(first, sum(c.num_tokens for c in done), cost_usd),
            replica_id=first.replica_id if first else "",
            index=head.index,
            logprobs=head.logprobs,
            completions=done,
        )

    async def generate_stream(self, proto: Any, context: Any) -> AsyncIterator[Any]:
        request_id = _request_id(context)
        self._trailers(context, request_id, None)
        num_tokens = 0
        rest: ChunkStream | None = None
        try:
            request = self._generate_request(proto, request_id, self._admit(context))
            num = request.params.logprobs
            first, rest = await self.core.first_chunk(request)
            self._trailers(context, request_id, first)
            # Forwarded one to one: the LLMServer already merges what piled up (cluster/streaming.py).
            # (Merging here too, with its own reader task, made Ray's gRPC proxy segfault while
            # cancelling streams in tests/cluster.)
            async for chunk in _chain(first, rest):
                num_tokens += sum(d.num_tokens for d in chunk.deltas)
                for d in chunk.deltas:
                    yield llm_pb2.GenerateResponse(
                        request_id=request_id,
                        text=d.text,
                        num_tokens=d.num_tokens,
                        finish_reason=d.finish_reason or "",
                        usage=self._usage(first, num_tokens, chunk.cost_usd) if chunk.finished else None,
                        replica_id=chunk.replica_id,
                        index=d.index,
                        logprobs=_logprobs(d.logprobs or (), num),
                    )
        except ApiError as err:
            # A stream's status only reaches the client if the call raises: the servicer
            # (grpc_server.py) turns the ApiError into an abort with this code and details.
            _fail(context, err, request_id)
            raise
        finally:
            if rest is not None:  # synchronous: runs even while this generator is being cancelled
                rest.cancel()

    @staticmethod
    def _usage(first: GenerateChunk | None, num_tokens: int, cost_usd: float | None) -> Any:
        """Usage of the request; `cost_usd` (its measured cost) is set only when the model is priced."""
        if first is None:
            return None
        return llm_pb2.Usage(
            prompt_tokens=first.num_prompt_tokens,
            completion_tokens=num_tokens,
            cached_prompt_tokens=first.num_cached_prompt_tokens,
            cost_usd=cost_usd,
        )

    def list_models(self, context: Any) -> Any:
        try:
            self._admit(context)
        except ApiError as err:
            _fail(context, err)
            return llm_pb2.ListModelsResponse()
        cards = [
            llm_pb2.ModelCard(name=m.name, source=m.source, max_model_len=m.max_model_len or 0)
            for m in self.core.config.models
        ]
        return llm_pb2.ListModelsResponse(models=cards)

    async def health(self, context: Any) -> Any:
        statuses = await self.core.health()
        ok = all(s == "ok" for s in statuses.values())
        if not ok:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(f"unhealthy models: {statuses}")
        return llm_pb2.HealthResponse(ok=ok, models=statuses)
