"""A served draft model (speculative method `draft`) over HTTP, against the real engine (SmolLM2 on CPU).

App `draft` (route prefix /draft) beside the session's apps: real_app.SECTION with `speculative:
{method: draft, draft_model: default, draft_num_layers: 24, num_speculative_tokens: 3}` — the
embedded SmolLM2 drafting for itself with its first 24 of 30 layers. Its greedy completion must
equal the served SmolLM2 without speculation: the `real` app answering the same request with a
`seed` (a seeded request is never given drafts, workers/spec/speculator.py `eligible`; the test
checks that app's draft counters did not move). The draft app's speculation counters must then have
moved, on /metrics (`shardserve:spec_decode_*`) and on /v1/stats (each replica's engine view, which
also names the resolved `cpu_activations`).
"""

from __future__ import annotations

import time

import openai
import pytest
import requests
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from real_app import MODEL, SECTION, http_client, llm_stats

pytestmark = pytest.mark.slow
APP, PREFIX = "draft", "/draft"
DRAFT = {"method": "draft", "draft_model": "default", "draft_num_layers": 24, "num_speculative_tokens": 3}
PROMPT = "Count: one, two, three, four, five, six,"
MAX_TOKENS = 12
STATS_TIMEOUT_S = 30  # Serve polls each replica's routing stats (shown on /v1/stats) every few seconds


@pytest.fixture(scope="module")
def draft_app(real):
    from ray import serve
    from shardserve.cluster.app import build_app
    from shardserve.cluster.config import AppConfig, parse_config

    port = free_port(taken=(real.config.http.port, real.config.grpc.port))
    config = parse_config({"models": [{**SECTION, "speculative": DRAFT}], "grpc": {"port": port}}, AppConfig)
    serve.run(build_app(config), name=APP, route_prefix=PREFIX)
    try:
        yield real.http_url + PREFIX
    finally:
        serve.delete(APP)


def spec_totals(url: str) -> dict[str, float]:
    """The app's shardserve:spec_decode_* counters on /metrics, summed over replicas and positions."""
    body = requests.get(url + "/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(body) for s in family.samples
            if s.name.startswith("shardserve:spec_decode_") and s.labels.get("position") is None
            and s.labels.get("model") == MODEL}


def test_served_draft_model_answers_plain_greedy_text_and_counts_its_drafts(real, draft_app) -> None:
    before = llm_stats()["spec_decode"]
    plain = http_client(real).completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                 seed=7)
    assert llm_stats()["spec_decode"]["num_drafts"] == before["num_drafts"], "the seeded request speculated"
    client = openai.OpenAI(base_url=draft_app + "/v1", api_key="unused", max_retries=0, timeout=120)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert got.choices[0].text == plain.choices[0].text and got.usage.completion_tokens == MAX_TOKENS

    totals = spec_totals(draft_app)
    drafts, draft_tokens = totals["shardserve:spec_decode_num_drafts_total"], \
        totals["shardserve:spec_decode_num_draft_tokens_total"]
    accepted = totals["shardserve:spec_decode_num_accepted_tokens_total"]
    assert drafts > 0 and draft_tokens >= drafts and 0 < accepted <= draft_tokens, totals
    deadline = time.monotonic() + STATS_TIMEOUT_S
    while True:
        router = requests.get(draft_app + "/v1/stats", timeout=30).json()["models"][MODEL]["router"]
        engines = [replica["engine"] for replica in router["replicas"].values()]
        spec = [e["spec_decode"] for e in engines if e.get("spec_decode")]
        if spec and spec[0]["num_drafts"] == drafts:
            break
        assert time.monotonic() < deadline, f"/v1/stats never showed the replica's {drafts:g} drafts: {engines}"
        time.sleep(0.5)
    assert spec[0]["num_draft_tokens"] == draft_tokens and spec[0]["num_accepted_tokens"] == accepted
    # model.cpu_activations as each replica's engine resolved it: `auto` on float weights is float
    assert {e["cpu_activations"] for e in engines} == {"float"} and llm_stats()["cpu_activations"] == "float"
