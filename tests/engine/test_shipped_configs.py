"""Every shipped config starts: each model of configs/*.yaml and helm/ci/*.yaml builds its engine.

Data flow: a config file -> its ModelSections (configs/: `load_config`; helm/ci/: the values'
`shardserve.models`, which the chart passes to the app verbatim) -> `to_engine_config()`, the
EngineConfig a replica builds -> the same config with the weights swapped for a tiny checkpoint of
the model's family (the named shape's transformers config, same model type, rope and tying, shrunk
to a few narrow layers) and CPU / float32 / gloo, a small KV pool, and the ranks started as local
processes (`multiproc`; the server's Ray launcher is tests/cluster/test_worker_group.py's job) ->
an LLMEngine in the config's exact tp / pp / ep layout (and micro-batches, scheduler, block size,
context length) -> a few greedy tokens, which must equal a single-process engine's on the same
checkpoint, with every KV block back in the pool.
A config whose model shape is unknown (a `dummy:` name missing from workers/models/dummy.py, a
weights path not in SOURCE_SHAPES below) fails here instead of at a replica's start.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from shardserve.cluster.config import ModelSection, load_config
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.models.dummy import dummy_config
from shardserve.workers.request import SamplingParams

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))
HELM_CI_FILES = sorted((REPO / "helm" / "ci").glob("*.yaml"))
# The real weights a shipped config points at, by the dummy shape of the same model.
SOURCE_SHAPES = {
    "default": "smollm2-135m",
    "/models/Meta-Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "/weights/Meta-Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "/models/Qwen3-30B-A3B": "qwen3-30b-a3b",
}
PROMPTS = {"a": [3, 17, 42, 7, 99], "b": [11, 5, 200, 64, 8, 1, 150, 33, 77]}
MAX_TOKENS = 4
NUM_BLOCKS = 32


def shipped_models() -> list[tuple[str, ModelSection]]:
    cases = []
    for path in CONFIG_FILES:
        cases += [(f"configs/{path.name}:{m.name}", m) for m in load_config(path).models]
    for path in HELM_CI_FILES:
        models = yaml.safe_load(path.read_text())["shardserve"]["models"]
        cases += [(f"helm/ci/{path.name}:{m['name']}", ModelSection.model_validate(m)) for m in models]
    return cases


CASES = shipped_models()


def shape_of(source: str) -> str:
    if source.startswith("dummy:"):
        return source.removeprefix("dummy:")
    assert source in SOURCE_SHAPES, f"no shape known for source {source!r}: add it to SOURCE_SHAPES"
    return SOURCE_SHAPES[source]


def tiny_of(shape: str, tp: int, pp: int, ep: int) -> Any:
    """The named shape's transformers config, narrowed: same model type, rope, tying and norm;
    KV heads min(real, tp) (fewer than tp ranks is replicated, as in the real layout), the real
    query-per-KV-head ratio, head_dim 16, 2 layers per pipeline stage, 8 experts (top-2) for MoE."""
    config = copy.deepcopy(dummy_config(shape))
    group = config.num_attention_heads // config.num_key_value_heads
    num_kv_heads = min(config.num_key_value_heads, tp)
    num_heads = num_kv_heads * group
    experts_key = next((k for k in ("num_experts", "num_local_experts") if hasattr(config, k)), None)
    config.update({
        "vocab_size": 256, "hidden_size": 16 * num_heads, "intermediate_size": 128, "head_dim": 16,
        "num_hidden_layers": 2 * pp, "num_key_value_heads": num_kv_heads,
        "num_attention_heads": num_heads, "bos_token_id": 1, "eos_token_id": 2,
        "initializer_range": 0.1,
    })
    if experts_key is not None:
        assert 8 % ep == 0, ep
        config.update({experts_key: 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32})
        if getattr(config, "shared_expert_intermediate_size", None):
            config.update({"shared_expert_intermediate_size": 64})
    return config


@dataclass(frozen=True)
class Tiny:
    folder: Path  # the saved checkpoint
    reference: dict[str, tuple[int, ...]]  # its greedy tokens from one in-process engine


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """(shape, tp, pp, ep) -> Tiny, made once per module (configs/ and helm/ci/ share layouts)."""
    from transformers import AutoModelForCausalLM

    made: dict[tuple[str, int, int, int], Tiny] = {}

    def get(shape: str, tp: int, pp: int, ep: int) -> Tiny:
        key = (shape, tp, pp, ep)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{shape}-tp{tp}pp{pp}ep{ep}")
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(tiny_of(*key), dtype=torch.float32).save_pretrained(folder)
            one_process = EngineConfig(model=ModelConfig(model=str(folder), dtype="float32", device="cpu"),
                                       cache=CacheConfig(num_blocks=NUM_BLOCKS))
            made[key] = Tiny(folder, run(one_process))
        return made[key]

    return get


def run(config: EngineConfig) -> dict[str, tuple[int, ...]]:
    engine = LLMEngine(config)
    try:
        ranks = getattr(engine.executor, "world_size", 1)  # LocalExecutor: the engine's own process
        assert ranks == config.parallel.world_size, (ranks, config.parallel)
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for request_id, token_ids in PROMPTS.items():
            engine.add_request(request_id, token_ids, params)
        finals = {}
        while engine.has_unfinished_requests():
            finals.update({o.request_id: o for o in engine.step() if o.finished})
        assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1, "KV blocks leaked"
        return {k: tuple(v.outputs[0].token_ids) for k, v in finals.items()}
    finally:
        engine.shutdown()


def test_every_shipped_file_is_covered() -> None:
    files = {case.split(":")[0] for case, _ in CASES}
    assert files == {f"configs/{p.name}" for p in CONFIG_FILES} | {f"helm/ci/{p.name}" for p in HELM_CI_FILES}
    layouts = {m.world_size for _, m in CASES}
    assert max(layouts) == 8, layouts  # the tp4 x pp2 example is among them


@pytest.mark.timeout(300)
@pytest.mark.parametrize("section", [m for _, m in CASES], ids=[c for c, _ in CASES])
def test_shipped_config_builds_and_generates(section: ModelSection, tiny_models) -> None:
    shipped = section.to_engine_config()
    layout = shipped.parallel
    tiny = tiny_models(shape_of(section.source), layout.tensor_parallel_size, layout.pipeline_parallel_size,
                       layout.expert_parallel_size)
    config = replace(
        shipped,
        # `gguf` names the real checkpoint's packing (cpu-default.yaml): the tiny stand-in is a float folder
        model=replace(shipped.model, model=str(tiny.folder), device="cpu", dtype="float32",
                      quantization=None if shipped.model.quantization == "gguf" else shipped.model.quantization),
        cache=replace(shipped.cache, num_blocks=NUM_BLOCKS),
        parallel=replace(layout, launcher="multiproc", collective_timeout_s=60.0, step_timeout_s=120.0),
    )
    got = run(config)
    assert all(len(tokens) == MAX_TOKENS for tokens in got.values()), got
    assert got == tiny.reference, f"{section.name} in its layout {layout} differs from one process"
