"""Streaming clients, one per protocol, each timing a request into a `RequestRecord`.

Data flow: `open_client(endpoint, settings)` opens one connection pool per endpoint (an aiohttp
session — the client `vllm bench serve` uses — or a grpc.aio channel with our generated stubs) and
yields a client whose `send(index, request)` streams one completion and records when each message
with new tokens arrived:
  - HTTP: POST {base}/v1/completions with `stream: true` and `stream_options.include_usage` (so
    the last event carries usage: the server's prompt and completion token counts); an event with
    non-empty text is a message with new tokens; an `error` event or a non-200 status is an error;
  - gRPC: shardserve.v1.LLMService/GenerateStream; a message with `num_tokens > 0` carries tokens;
    the last one carries usage; a non-OK status is an error.
Both ask for `min_tokens = ignore_eos = max_tokens`-long outputs (unless `ignore_eos` is off), so
every request generates exactly the tokens the dataset asked for where the server supports them.
Errors never raise: they land in the record, and the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import aiohttp
import grpc
from shardserve.cluster.bench_serve.dataset import ServeRequest
from shardserve.cluster.bench_serve.records import RequestRecord
from shardserve.cluster.bench_serve.settings import ClientSettings, Endpoint


class Client(Protocol):
    async def send(self, index: int, request: ServeRequest) -> RequestRecord: ...


def _record(index: int, request: ServeRequest) -> RequestRecord:
    return RequestRecord(index=index, input_len=request.input_len, max_tokens=request.max_tokens)


class HttpClient:
    def __init__(self, session: aiohttp.ClientSession, url: str, settings: ClientSettings) -> None:
        self.session, self.url, self.settings = session, url, settings
        self.headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}

    def body(self, request: ServeRequest) -> dict:
        body = {"model": self.settings.model, "prompt": request.prompt, "max_tokens": request.max_tokens,
                "temperature": self.settings.temperature, "stream": True, "stream_options": {"include_usage": True}}
        if self.settings.ignore_eos:
            body.update(ignore_eos=True, min_tokens=request.max_tokens)
        return body

    async def send(self, index: int, request: ServeRequest) -> RequestRecord:
        record = _record(index, request)
        start = time.perf_counter()
        try:
            async with self.session.post(self.url, json=self.body(request), headers=self.headers) as resp:
                if resp.status != 200:
                    record.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                    return record
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    self._event(json.loads(data), record, time.perf_counter() - start)
                    if record.error is not None:
                        return record
            record.e2e_s = time.perf_counter() - start
            if record.output_tokens == 0:  # no usage event: count the messages
                record.output_tokens = len(record.chunk_times_s)
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        return record

    @staticmethod
    def _event(event: dict, record: RequestRecord, now: float) -> None:
        if "error" in event:
            error = event["error"]
            record.error = f"error event: {error.get('message', error) if isinstance(error, dict) else error}"
            return
        for choice in event.get("choices") or ():
            if choice.get("text"):
                record.chunk_times_s.append(now)
            record.finish_reason = choice.get("finish_reason") or record.finish_reason
        usage = event.get("usage")
        if usage:
            record.prompt_tokens = usage.get("prompt_tokens")
            record.output_tokens = usage.get("completion_tokens") or 0


class GrpcClient:
    def __init__(self, channel: grpc.aio.Channel, settings: ClientSettings) -> None:
        from shardserve.cluster.proto import llm_pb2, llm_pb2_grpc

        self.pb, self.stub, self.settings = llm_pb2, llm_pb2_grpc.LLMServiceStub(channel), settings
        self.metadata = (("authorization", f"Bearer {settings.api_key}"),) if settings.api_key else ()

    def message(self, request: ServeRequest):
        pb = self.pb
        params = pb.SamplingParams(max_tokens=request.max_tokens, temperature=self.settings.temperature)
        if self.settings.ignore_eos:
            params.ignore_eos, params.min_tokens = True, request.max_tokens
        if isinstance(request.prompt, str):
            return pb.GenerateRequest(model=self.settings.model, prompt=request.prompt, params=params)
        ids = pb.TokenIds(ids=request.prompt)
        return pb.GenerateRequest(model=self.settings.model, prompt_token_ids=ids, params=params)

    async def send(self, index: int, request: ServeRequest) -> RequestRecord:
        record = _record(index, request)
        record.chunk_tokens = []
        start = time.perf_counter()
        try:
            call = self.stub.GenerateStream(self.message(request), metadata=self.metadata,
                                            timeout=self.settings.timeout_s)
            async for resp in call:
                if resp.num_tokens > 0:
                    record.chunk_times_s.append(time.perf_counter() - start)
                    record.chunk_tokens.append(resp.num_tokens)
                    record.output_tokens += resp.num_tokens
                record.finish_reason = resp.finish_reason or record.finish_reason
                if resp.HasField("usage"):
                    record.prompt_tokens = resp.usage.prompt_tokens
            record.e2e_s = time.perf_counter() - start
        except grpc.aio.AioRpcError as exc:
            record.error = f"gRPC {exc.code().name}: {exc.details()}"
        return record


@asynccontextmanager
async def open_client(endpoint: Endpoint, settings: ClientSettings) -> AsyncIterator[Client]:
    if endpoint.scheme in ("http", "https"):
        timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        connector = aiohttp.TCPConnector(limit=0)  # no cap on connections: the load point sets the concurrency
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            yield HttpClient(session, endpoint.url, settings)
        return
    if endpoint.scheme == "grpcs":
        channel = grpc.aio.secure_channel(endpoint.url, grpc.ssl_channel_credentials())
    else:
        channel = grpc.aio.insecure_channel(endpoint.url)
    async with channel:
        yield GrpcClient(channel, settings)
