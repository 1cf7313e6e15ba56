"""The `tenant` label of a request: its API key's name, else the OpenAI `user` field, else "".

The `user` field is client-chosen text, so it is cut to `MAX_TENANT_CHARS` and each replica keeps
at most `MAX_TENANTS` distinct values; later ones are labelled `OTHER_TENANT` (an unbounded label
would grow Prometheus' series without limit). API key names come from the config: bounded.
"""

from __future__ import annotations

MAX_TENANT_CHARS = 64
MAX_TENANTS = 1000
OTHER_TENANT = "_other"


class TenantLabels:
    def __init__(self, max_tenants: int = MAX_TENANTS) -> None:
        self._max_tenants = max_tenants
        self._seen: set[str] = set()

    def label(self, api_key_name: str | None, user: str | None) -> str:
        if api_key_name:
            return api_key_name
        if not user:
            return ""
        user = user[:MAX_TENANT_CHARS]
        if user in self._seen:
            return user
        if len(self._seen) >= self._max_tenants:
            return OTHER_TENANT
        self._seen.add(user)
        return user
