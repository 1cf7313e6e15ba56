"""Expert parallelism through the multi-process executor equals the single-process engine.

Mixtral, EP 2 over TP 2 with every step dispatched by all-to-all. Qwen3-MoE (6 experts, a
dense second layer), EP 2 over TP 2 with `auto` dispatch: the 39-token prefill step goes
through all-to-all and the 3-token decode steps through the all-reduce path; its per-expert
load counters must equal the single-process model's on every rank. Mixtral with TP 4 and
EP 2 splits each expert's features over 2 ranks as well (all-reduce path).
"""

from __future__ import annotations

from parallel_helpers import (
    assert_same_outputs,
    engine_config,
    make_prompts,
    run_engine,
    single_process,
    write_checkpoint,
)
from shardserve.workers.engine import LLMEngine


def _compare(config, prompts) -> tuple[LLMEngine, LLMEngine]:
    reference = LLMEngine(single_process(config))
    want = run_engine(reference, prompts)
    engine = LLMEngine(config)
    try:
        assert_same_outputs(want, run_engine(engine, prompts))
    except BaseException:
        engine.shutdown()
        raise
    return reference, engine


def test_mixtral_ep2_all_to_all(tmp_path) -> None:
    folder = write_checkpoint("mixtral", tmp_path / "mixtral")
    _, engine = _compare(engine_config(folder, tp=2, ep=2, expert_dispatch="all_to_all"), make_prompts(256))
    engine.shutdown()


def test_qwen3_moe_ep2_auto_dispatch_and_load_counters(tmp_path) -> None:
    folder = write_checkpoint("qwen3_moe", tmp_path / "qwen3_moe")
    config = engine_config(folder, tp=2, ep=2, expert_dispatch="auto", all_to_all_min_tokens=16)
    reference, engine = _compare(config, make_prompts(256))
    try:
        per_rank = engine.executor.call("expert_load")
    finally:
        engine.shutdown()
    want = {name.removesuffix(".expert_load"): buf.tolist()
            for name, buf in reference.runner.model.named_buffers() if name.endswith("expert_load")}
    assert list(want) == ["model.layers.0.mlp"]  # layer 1 is dense (mlp_only_layers)
    assert sum(want["model.layers.0.mlp"]) == 2 * (39 + 3 * 7)  # top-2 of every token forwarded
    assert per_rank == [want, want]


def test_mixtral_tp4_ep2_splits_experts_and_features(tmp_path) -> None:
    folder = write_checkpoint("mixtral", tmp_path / "mixtral")
    _, engine = _compare(engine_config(folder, tp=4, ep=2), make_prompts(256))
    engine.shutdown()
