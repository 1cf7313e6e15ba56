"""One source of configuration: every engine field is reachable from YAML and from LLM(**kwargs),
the SHARDSERVE_* overrides are read in one module and reach the ranks through the config."""

from __future__ import annotations

import ast
import pickle
import typing
from dataclasses import fields, replace
from pathlib import Path

import pytest
from ports import free_port
from shardserve.cluster.config import ConfigError, parse_config
from shardserve.parallel.options import DEFAULT_KERNEL_OPTIONS, kernel_options
from shardserve.workers import env_overrides
from shardserve.workers.config import SECTIONS, EngineConfig, ModelConfig
from shardserve.workers.env_overrides import OVERRIDES, apply_env_overrides
from shardserve.workers.llm import _apply_overrides

ROOT = Path(__file__).resolve().parents[2]
# Engine fields YAML does not offer, and why (everything else must be settable there).
NOT_IN_YAML = {
    ("parallel", "launcher"): "a replica's multi-rank group always runs as Ray actors (cluster/server.py)",
    ("cost", "gpus_per_rank"): "set from resources.num_gpus_per_worker (ModelSection.to_engine_config)",
    ("cost", "cpus_per_rank"): "set from resources.num_cpus_per_worker (ModelSection.to_engine_config)",
}
# Engine fields YAML names otherwise (cluster/config.py renames).
YAML_NAMES = {("speculative", "speculative_method"): "method"}
# A non-default value per field that every check accepts (alone, on top of the defaults).
SAMPLE = {
    ("model", "model"): "dummy:tiny-llama", ("model", "dtype"): "float32", ("model", "device"): "cpu",
    ("model", "max_model_len"): 128, ("model", "seed"): 7, ("model", "gguf_cache_dir"): "/tmp/gguf",
    ("model", "quantization"): "int8", ("model", "quantization_group_size"): 64, ("model", "cpu_activations"): "int8",
    ("cache", "block_size"): 32, ("cache", "gpu_memory_utilization"): 0.5, ("cache", "cpu_kv_cache_bytes"): 4096,
    ("cache", "num_blocks"): 9, ("cache", "enable_prefix_caching"): False,
    ("scheduler", "max_num_seqs"): 8, ("scheduler", "max_num_batched_tokens"): 64,
    ("scheduler", "enable_chunked_prefill"): False, ("scheduler", "policy"): "priority", ("scheduler", "mode"): "static",
    ("scheduler", "max_queue_len"): 5, ("scheduler", "max_queue_tokens"): 500, ("scheduler", "min_admit_batch"): 2,
    ("scheduler", "async_scheduling"): False, ("scheduler", "async_depth"): 3,
    ("parallel", "tensor_parallel_size"): 2, ("parallel", "pipeline_parallel_size"): 1,
    ("parallel", "expert_parallel_size"): 1, ("parallel", "pipeline_layer_partition"): (4,),
    ("parallel", "pipeline_micro_batches"): 1, ("parallel", "expert_dispatch"): "all_to_all",
    ("parallel", "all_to_all_min_tokens"): 4, ("parallel", "collective_timeout_s"): 30.0,
    ("parallel", "step_timeout_s"): 60.0, ("parallel", "launcher"): "ray", ("parallel", "pdl"): False,
    ("parallel", "decode_gemv"): False, ("parallel", "gemv_tiles"): "/tmp/tiles.json",
    ("parallel", "custom_allreduce"): False, ("parallel", "custom_allreduce_max_bytes"): 4096,
    ("parallel", "custom_allreduce_one_shot_max_bytes"): 1024, ("parallel", "fused_allreduce_norm"): False,
    ("parallel", "fused_allreduce_norm_bytes"): 2048, ("parallel", "fused_allreduce_protocol"): "flags",
    ("parallel", "l2_prefetch_mb"): 2.5,
    ("speculative", "speculative_method"): "ngram", ("speculative", "num_speculative_tokens"): 3,
    ("speculative", "prompt_lookup_min"): 1, ("speculative", "prompt_lookup_max"): 3,
    ("speculative", "max_verify_tokens"): 64, ("speculative", "suffix_max_cached_tokens"): 1000,
    ("speculative", "suffix_max_depth"): 8, ("speculative", "suffix_min_probability"): 0.2,
    ("speculative", "draft_model"): "default", ("speculative", "draft_quantization"): "int8",
    ("speculative", "draft_num_layers"): 12, ("speculative", "draft_num_blocks"): 64,
    ("cost", "gpu_hour_usd"): 2.5, ("cost", "cpu_hour_usd"): 0.05, ("cost", "gpus_per_rank"): 2.0,
    ("cost", "cpus_per_rank"): 4.0,
}
ENGINE_FIELDS = [(section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)]
# Fields valid only beside others (same section), which the samples above set with them: the draft
# model's fields are refused unless speculative_method is `draft` (and that needs a draft_model).
_DRAFT = {"speculative_method": "draft", "draft_model": "default"}
COMPANIONS = {("speculative", name): _DRAFT for name in ("draft_model", "draft_quantization", "draft_num_layers",
                                                        "draft_num_blocks")}


def _sample(section: str, name: str) -> dict:
    """The field's sample value with the values of its section it needs beside it."""
    return {**COMPANIONS.get((section, name), {}), name: SAMPLE[section, name]}


def test_every_engine_field_has_a_sample_and_a_description():
    assert set(SAMPLE) == set(ENGINE_FIELDS), "add a SAMPLE value for each new engine field"
    undocumented = [(s, f.name) for s, cls in SECTIONS.items() for f in fields(cls)
                    if "description" not in f.metadata]
    assert undocumented == []


@pytest.mark.parametrize(("section", "name"), ENGINE_FIELDS, ids=lambda v: v)
def test_every_engine_field_is_reachable_from_llm_kwargs(section, name):
    config = _apply_overrides(EngineConfig(), _sample(section, name))
    assert getattr(getattr(config, section), name) == SAMPLE[section, name]


@pytest.mark.parametrize(("section", "name"), [f for f in ENGINE_FIELDS if f not in NOT_IN_YAML], ids=lambda v: v)
def test_every_engine_field_is_settable_from_yaml(section, name):
    value = SAMPLE[section, name]
    yaml_value = list(value) if isinstance(value, tuple) else value
    entry: dict = {"name": "m"}
    if section == "model":
        entry["source" if name == "model" else name] = yaml_value
    else:
        entry[section] = {YAML_NAMES.get((section, key), key): value for key, value in _sample(section, name).items()}
        entry[section][YAML_NAMES.get((section, name), name)] = yaml_value
    engine = parse_config({"models": [entry]}).models[0].to_engine_config()
    assert getattr(getattr(engine, section), name) == value


def test_yaml_refuses_what_the_engine_refuses():
    with pytest.raises(ValueError, match="min_admit_batch must be in") as engine_err:
        EngineConfig(scheduler=replace(EngineConfig().scheduler, max_num_seqs=4, min_admit_batch=8))
    with pytest.raises(ConfigError, match="models\\[0\\].scheduler: min_admit_batch") as yaml_err:
        parse_config({"models": [{"name": "m", "scheduler": {"max_num_seqs": 4, "min_admit_batch": 8}}]})
    assert str(engine_err.value) in str(yaml_err.value)


def test_env_overrides_parse_and_validate():
    config = apply_env_overrides(EngineConfig(), {
        "SHARDSERVE_PDL": "0", "SHARDSERVE_DECODE_GEMV": "false", "SHARDSERVE_L2_PREFETCH_MB": "24",
        "SHARDSERVE_FUSED_ALLREDUCE_PROTOCOL": "flags", "SHARDSERVE_CUSTOM_ALLREDUCE_MAX_BYTES": "4096",
        "UNRELATED": "x"})
    par = config.parallel
    assert (par.pdl, par.decode_gemv, par.l2_prefetch_mb, par.fused_allreduce_protocol) == (False, False, 24.0, "flags")
    assert par.custom_allreduce_max_bytes == 4096 and config.model == EngineConfig().model
    assert apply_env_overrides(EngineConfig(), {}) == EngineConfig()
    with pytest.raises(ValueError, match="SHARDSERVE_PDL must be one of 1/true/yes/on/0/false/no/off, got 'maybe'"):
        apply_env_overrides(EngineConfig(), {"SHARDSERVE_PDL": "maybe"})
    with pytest.raises(ValueError, match="SHARDSERVE_L2_PREFETCH_MB must be a number, got 'lots'"):
        apply_env_overrides(EngineConfig(), {"SHARDSERVE_L2_PREFETCH_MB": "lots"})
    with pytest.raises(ValueError, match="l2_prefetch_mb must be >= 0, got -1.0 .from the environment"):
        apply_env_overrides(EngineConfig(), {"SHARDSERVE_L2_PREFETCH_MB": "-1"})
    with pytest.raises(ValueError, match="fused_allreduce_protocol must be one of lamport, flags, got 'pigeon'"):
        apply_env_overrides(EngineConfig(), {"SHARDSERVE_FUSED_ALLREDUCE_PROTOCOL": "pigeon"})
    with pytest.raises(ValueError, match="SHARDSERVE_DISABLE_CUSTOM_ALLREDUCE is no longer read; use "
                                         "SHARDSERVE_CUSTOM_ALLREDUCE=0"):
        apply_env_overrides(EngineConfig(), {"SHARDSERVE_DISABLE_CUSTOM_ALLREDUCE": "1"})
    for variable, (section, name) in OVERRIDES.items():
        assert name in typing.get_type_hints(SECTIONS[section]), variable


def _environment_names(path: Path) -> list[str]:
    """String constants that are exactly a SHARDSERVE_* variable name (docstrings don't count)."""
    tree = ast.parse(path.read_text())
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and node.value.startswith("SHARDSERVE_") and node.value.isupper()]


def test_only_env_overrides_names_shardserve_variables():
    product = [p for d in ("cluster", "workers", "parallel") for p in (ROOT / d).rglob("*.py") if "gen" not in p.parts]
    named = {str(p.relative_to(ROOT)): _environment_names(p) for p in product}
    assert {p: n for p, n in named.items() if n} == {"workers/env_overrides.py": ["SHARDSERVE_"]}  # its PREFIX
    assert env_overrides.PREFIX == "SHARDSERVE_"


def test_a_rank_installs_the_kernel_options_of_the_config_it_is_sent(monkeypatch):
    """The pickled config is all a rank gets (over its pipe or to its Ray actor): the rank's kernels
    follow it, not the rank's own environment."""
    from shardserve.parallel.state import destroy_parallel
    from shardserve.workers.worker.worker import Worker, WorkerSpec

    monkeypatch.setenv("SHARDSERVE_PDL", "1")  # a rank's environment is never read
    config = EngineConfig(model=ModelConfig(model="dummy:tiny-llama", dtype="float32", device="cpu"))
    config = replace(config, parallel=replace(config.parallel, pdl=False, l2_prefetch_mb=3.0),
                     cache=replace(config.cache, num_blocks=8))
    spec = pickle.loads(pickle.dumps(WorkerSpec(config, 0, "127.0.0.1", free_port(), backend="gloo", num_threads=1)))
    Worker(spec)
    try:
        assert kernel_options() == config.parallel.kernel_options()
        assert not kernel_options().pdl and kernel_options().l2_prefetch_mb == 3.0
    finally:
        destroy_parallel()
    assert kernel_options() == DEFAULT_KERNEL_OPTIONS


def _generate_parser():
    import argparse

    from shardserve.cluster.commands import generate

    parser = argparse.ArgumentParser(prog="shardserve")
    generate.register(parser.add_subparsers(dest="command"))
    return parser


def _flag_text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize(("section", "name"), [f for f in ENGINE_FIELDS if SAMPLE[f] is not None], ids=lambda v: v)
def test_every_engine_field_is_a_generate_flag(section, name):
    from shardserve.cluster.commands.engine_flags import engine_config_from_flags

    flag = "--model-seed" if name == "seed" else "--" + name.replace("_", "-")  # --seed: the sampling seed
    companions = [text for key, value in COMPANIONS.get((section, name), {}).items() if key != name
                  for text in ("--" + key.replace("_", "-"), _flag_text(value))]
    args = _generate_parser().parse_args(["generate", "--prompt", "hi", *companions, flag,
                                          _flag_text(SAMPLE[section, name])])
    assert getattr(getattr(engine_config_from_flags(args), section), name) == SAMPLE[section, name]


def test_generate_flags_default_to_the_engine_and_refuse_with_its_message(capsys):
    from shardserve.cluster.cli import main
    from shardserve.cluster.commands.engine_flags import engine_config_from_flags

    args = _generate_parser().parse_args(["generate", "--prompt", "hi", "--seed", "3"])
    assert engine_config_from_flags(args) == EngineConfig() and args.seed == 3
    assert main(["generate", "--prompt", "hi", "--async-depth", "7"]) == 2
    assert "async_depth must be an integer in [2, 4], got 7" in capsys.readouterr().err
