"""API keys (one tenant name each) and their rate limits, shared by the HTTP and gRPC front ends.

Data flow: the Ingress builds one `Gate` from the config's `auth` section when it starts:
`load_keys` reads each key from the config (`key`), from this process's environment (`key_env`)
or from a file (`key_file`, e.g. a mounted Kubernetes Secret); a missing variable or file is a
ConfigError naming the key. `SHARDSERVE_API_KEY`, when set (the Helm chart's single-key Secret),
is one more key named `default` (backwards compatible). With no key at all the API is open. Every
HTTP route but /health and every LLMService RPC calls `gate.admit(authorization)` with the
`Authorization` header / `authorization` metadata: it compares the bearer token with every key in
constant time and returns the key's name (the tenant, put on the GenerateRequest), raises an
UNAUTHENTICATED ApiError (HTTP 401 / gRPC UNAUTHENTICATED), or `RateLimited` when the key's
bucket is empty (cluster/ingress/ratelimit.py). Once the request is parsed, IngressCore calls
`admit_tokens` (the key's `tokens_per_minute`: max_tokens × n now, the prompt's tokens through
`charge_prompt` when the engine has counted them). Keys are never logged or echoed.
"""

from __future__ import annotations

import hmac
import os
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from shardserve.cluster.config import AuthSection, ConfigError
from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.ingress.ratelimit import RateLimiter
from shardserve.cluster.messages import ErrorKind, GenerateRequest
from shardserve.workers.env_overrides import api_key

ENV_KEY_NAME = "default"
OPEN_HTTP_PATHS = frozenset({"/health", "/metrics"})
# The tenant of the HTTP request being handled (set by the auth middleware, read by the route).
CURRENT_TENANT: ContextVar[str | None] = ContextVar("shardserve_tenant", default=None)


@dataclass(frozen=True)
class ApiKey:
    name: str
    secret: bytes = field(repr=False)
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None


def load_keys(section: AuthSection) -> list[ApiKey]:
    keys = []
    for i, entry in enumerate(section.api_keys):
        where = f"auth.api_keys[{i}] ({entry.name})"
        if entry.key is not None:
            secret = entry.key.get_secret_value()
        elif entry.key_env is not None:
            secret = os.environ.get(entry.key_env, "")
            if not secret:
                raise ConfigError(f"{where}.key_env: environment variable {entry.key_env} is not set or empty")
        else:
            path = Path(entry.key_file or "")
            try:
                secret = path.read_text().strip()
            except OSError as err:
                raise ConfigError(f"{where}.key_file: cannot read {path}: {err.strerror}") from None
            if not secret:
                raise ConfigError(f"{where}.key_file: {path} is empty")
        keys.append(ApiKey(entry.name, secret.encode(), entry.requests_per_minute, entry.tokens_per_minute))
    env_key = api_key()
    if env_key:
        keys.append(ApiKey(ENV_KEY_NAME, env_key.encode()))
    secrets = [k.secret for k in keys]
    if len(set(secrets)) != len(secrets):
        names = sorted({k.name for k in keys if secrets.count(k.secret) > 1})
        raise ConfigError(f"auth.api_keys: keys {names} have the same value (each key must name one tenant)")
    return keys


class Gate:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys
        self.limiter = RateLimiter({k.name: k.requests_per_minute for k in keys if k.requests_per_minute})
        self.tokens = RateLimiter({k.name: k.tokens_per_minute for k in keys if k.tokens_per_minute}, unit="tokens")

    @classmethod
    def from_config(cls, section: AuthSection) -> Gate:
        return cls(load_keys(section))

    @property
    def is_open(self) -> bool:
        return not self.keys

    def admit(self, authorization: str | None) -> str | None:
        """The tenant (key name) of an accepted call, None on an open API; raises ApiError otherwise."""
        if self.is_open:
            return None
        if not authorization:
            raise ApiError(ErrorKind.UNAUTHENTICATED, "missing API key: send `Authorization: Bearer <key>`")
        scheme, _, token = authorization.strip().partition(" ")
        presented = token.strip().encode()
        match = None
        for key in self.keys:  # every key is compared, so timing does not tell which one matched
            if hmac.compare_digest(presented, key.secret) and scheme.lower() == "bearer":
                match = key
        if match is None:
            raise ApiError(ErrorKind.UNAUTHENTICATED, "invalid API key (expected `Authorization: Bearer <key>`)")
        self.limiter.take(match.name)
        return match.name

    def admit_tokens(self, request: GenerateRequest) -> bool:
        """Take the request's known tokens from its key's `tokens_per_minute` bucket: max_tokens × n,
        plus the prompt when it comes as token ids. True when the prompt's tokens are still to be
        charged (`charge_prompt`, once the engine has counted them). Raises RateLimited when the
        bucket is short, an INVALID_ARGUMENT ApiError when it could never hold that much."""
        limit = self.tokens.limit(request.tenant or "")
        if limit is None:
            return False
        counted = isinstance(request.prompt, tuple)
        cost = request.params.max_tokens * request.params.n + (len(request.prompt) if counted else 0)
        if cost > limit:
            raise ApiError(
                ErrorKind.INVALID_ARGUMENT,
                f"this request needs {cost} tokens (max_tokens {request.params.max_tokens} x n {request.params.n}"
                f"{' + prompt' if counted else ''}), more than API key {request.tenant!r} may use in a minute "
                f"({limit:g} tokens_per_minute); lower max_tokens",
                "max_tokens",
            )
        self.tokens.take(request.tenant or "", cost)
        return not counted

    def charge_prompt(self, tenant: str | None, num_prompt_tokens: int) -> None:
        self.tokens.charge(tenant or "", num_prompt_tokens)


# The Gate of this process's Ingress. The HTTP middleware is a plain ASGI class registered on the
# FastAPI app (which Serve hands the replica as a pickled copy), so it finds the Gate here.
_installed: Gate | None = None


def install(gate: Gate) -> None:
    global _installed
    _installed = gate


def installed() -> Gate:
    if _installed is None:
        raise RuntimeError("no Ingress in this process has installed its API-key gate")
    return _installed
