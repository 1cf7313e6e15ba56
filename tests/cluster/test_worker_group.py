"""A Serve app whose model runs with tensor_parallel_size 2 on a Ray worker group (CPU, gloo).

The app `tp2` (route prefix /tp2) runs next to the fake-engine app in the session's Serve
instance. Its model is a tiny random Llama with a character-level tokenizer, saved as a real
safetensors folder, so text goes in and out over HTTP. The LLMServer replica is the engine's
driver; its two ranks are Ray actors in the replica's placement group. An HTTP completion must
return the same greedy text as a single-process engine on the same checkpoint; a rank killed
with `ray.kill` must make the replica's Serve health check fail while it is idle, and the next
request end in HTTP 503 (never a hang). Deleting the app leaves no rank actor behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
import torch
from ports import free_port

pytestmark = pytest.mark.slow
APP = "tp2"
MODEL = "tiny-tp2"
PROMPT = "hello world"
MAX_TOKENS = 8


def write_tiny_checkpoint(folder: Path) -> Path:
    """A 2-layer random Llama over a 96-symbol character vocabulary, with its tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.5, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, architectures=["LlamaForCausalLM"])
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def model_section(folder: Path, tp: int) -> dict:
    return {"name": MODEL, "source": str(folder), "device": "cpu", "dtype": "float32", "max_model_len": 256,
            "parallel": {"tensor_parallel_size": tp}, "resources": {"num_cpus_per_worker": 0.25},
            "cache": {"cpu_kv_cache_bytes": 4 << 20}}  # fmt: skip


def rank_actors() -> list[dict]:
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("shardserve-rank-")]


def reference_text(folder: Path) -> str:
    from shardserve.cluster.config import ModelSection
    from shardserve.workers.engine import LLMEngine
    from shardserve.workers.request import SamplingParams

    engine = LLMEngine(ModelSection.model_validate(model_section(folder, tp=1)).to_engine_config())
    engine.add_request("ref", PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].new_text
    return text


@pytest.fixture(scope="module")
def tp2(cluster, tmp_path_factory):
    from ray import serve
    from shardserve.cluster.app import build_app
    from shardserve.cluster.config import AppConfig, parse_config

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")
    grpc = {"port": free_port(taken=(cluster.config.http.port, cluster.config.grpc.port))}  # the Ingress binds it
    config = parse_config({"models": [model_section(folder, tp=2)], "grpc": grpc}, AppConfig)
    serve.run(build_app(config), name=APP, route_prefix="/tp2")
    try:
        yield cluster, folder
    finally:
        serve.delete(APP)
        wait_rank_actors_gone()


def wait_rank_actors_gone(timeout_s: float = 30) -> None:
    """After serve.delete: the replica's rank actors must go with it."""
    deadline = time.monotonic() + timeout_s
    while left := rank_actors():
        assert time.monotonic() < deadline, f"rank actors left behind after serve.delete: {left}"
        time.sleep(0.5)


def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.http_url + "/tp2/v1", api_key="unused", max_retries=0, timeout=60)


def llm_handle():
    from ray import serve

    return serve.get_deployment_handle(f"LLMServer_0_{MODEL}", app_name=APP)


def test_completion_runs_on_the_worker_group(tp2):
    import ray

    cluster, folder = tp2
    actors = rank_actors()
    assert len(actors) == 2, f"expected one Ray actor per rank, got {actors}"
    ranks = [ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).describe.remote(), timeout=30) for a in actors]
    # Each rank took its share of the replica's placement group (cluster/app.py): 0.25 CPU, no GPU.
    assert [r["resources"] for r in ranks] == [{"CPU": 0.25}] * 2, ranks
    resp = client(cluster).completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert resp.usage.completion_tokens == MAX_TOKENS and resp.choices[0].finish_reason == "length"
    text = resp.choices[0].text
    assert text and text == reference_text(folder)
    stream = client(cluster).completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_dead_rank_fails_health_check_and_requests_get_503(tp2):
    import ray

    cluster, _ = tp2
    victim = rank_actors()[-1]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
    start = time.monotonic()
    while True:  # idle engine: only Serve's health hook (-> executor.check_health) can notice
        try:
            llm_handle().check_health.remote().result(timeout_s=30)
        except Exception as err:
            assert "worker rank" in str(err), err
            break
        assert time.monotonic() - start < 10, "check_health kept passing with a rank dead"
        time.sleep(0.2)
    assert llm_handle().health.remote().result(timeout_s=30)["status"].startswith("dead: ")
    with pytest.raises(openai.APIStatusError) as err:
        client(cluster).completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert err.value.status_code == 503 and "worker rank" in str(err.value)
    assert time.monotonic() - start < 20
