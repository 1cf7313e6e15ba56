"""A model's measured cost on `/v1/stats`: the sum over its replicas of what each engine reported.

Data flow: each LLMServer replica reports its engine's `CostStats` (workers/cost.py) in its routing
stats (`record_routing_stats`, polled by Serve every few seconds); the Ingress's router keeps the latest
per replica (`router_stats`), and `model_cost` adds them up, so cost per million tokens is the model's
total cost over its total tokens. None when no replica reports a price (or none reported yet).
"""

from __future__ import annotations

from typing import Any


def model_cost(router: dict[str, Any] | None) -> dict[str, Any] | None:
    reports = [r["engine"]["cost"] for r in (router or {}).get("replicas", {}).values()
               if (r.get("engine") or {}).get("cost")]
    if not reports:
        return None
    total = sum(r["cost_usd_total"] for r in reports)
    num_tokens = sum(r["num_tokens"] for r in reports)
    num_output_tokens = sum(r["num_output_tokens"] for r in reports)
    return {
        "usd_per_hour": sum(r["usd_per_hour"] for r in reports),  # every replica's worker group
        "cost_usd_total": total,
        "busy_s": sum(r["busy_s"] for r in reports),
        "num_tokens": num_tokens,
        "num_output_tokens": num_output_tokens,
        "cost_per_million_tokens_usd": total / num_tokens * 1e6 if num_tokens else None,
        "cost_per_million_output_tokens_usd": total / num_output_tokens * 1e6 if num_output_tokens else None,
    }
