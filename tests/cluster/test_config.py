"""The serve config schema (no Ray): shipped configs, errors naming the field, app options, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shardserve.cluster.cli import main
from shardserve.cluster.config import (
    AppConfig,
    ConfigError,
    ModelSection,
    ServeConfig,
    load_config,
    parse_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_all_shipped_configs_are_present():
    names = {p.name for p in CONFIGS}
    assert {"cpu-default.yaml", "llama-3.1-8b-tp2.yaml", "qwen3-30b-a3b-ep2.yaml",
            "llama-70b-tp4-pp2.yaml", "autoscaling-dp.yaml"} <= names  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates_and_builds_engine_config(path):
    config = load_config(path)
    for model in config.models:
        engine = model.to_engine_config()
        assert engine.model.model == model.source
        assert engine.parallel.world_size == model.world_size
        assert engine.scheduler.max_num_seqs == model.scheduler.max_num_seqs


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"parallel": {"tensor_parallel_size": 0}}, "models[0].parallel.tensor_parallel_size: must be >= 1, got 0"),
        ({"dtype": "fp7"}, "models[0].dtype: must be one of"),
        ({"cache": {"gpu_memory_utilization": 1.5}}, "models[0].cache.gpu_memory_utilization: must be <= 1.0, got 1.5"),
        ({"bogus": 1}, "models[0].bogus: unknown field"),
        # no YAML way to import code into replicas: test doubles come in from Python (build_app)
        ({"engine_factory": "os:system"}, "models[0].engine_factory: unknown field"),
        ({"replicas": 2, "autoscaling": {"max_replicas": 3}}, "models[0]: replicas and autoscaling are mutually exclusive"),
        ({"autoscaling": {"max_replicas": 3}, "router": {"direct_stream": True}},
         "models[0]: router.direct_stream: true needs a fixed replica count"),
        ({"autoscaling": {"min_replicas": 4, "max_replicas": 2}}, "models[0].autoscaling: max_replicas must be >= min_replicas=4"),
        ({"autoscaling": {"downscale_delay_s": -1}}, "models[0].autoscaling.downscale_delay_s: must be >= 0.0, got -1"),
        ({"autoscaling": {"upscale_delay_s": 7200}}, "models[0].autoscaling.upscale_delay_s: must be <= 3600.0, got 7200"),
        ({"autoscaling": {"look_back_period_s": 5}}, "models[0].autoscaling.look_back_period_s: must be > 10.0, got 5"),
        ({"parallel": {"tensor_parallel_size": 2, "expert_parallel_size": 3}},
         "models[0].parallel: expert_parallel_size 3 must divide tensor_parallel_size 2"),
        # the engine's rule (experts split inside a stage), not tp x pp: this used to pass validate and fail at start
        ({"parallel": {"tensor_parallel_size": 1, "pipeline_parallel_size": 2, "expert_parallel_size": 2}},
         "models[0].parallel: expert_parallel_size 2 must divide tensor_parallel_size 1"),
        ({"scheduler": {"async_scheduling": True}, "parallel": {"pipeline_parallel_size": 2}},
         "models[0]: async_scheduling requires pipeline_parallel_size == 1"),
        ({"scheduler": {"max_num_seqs": 4, "min_admit_batch": 8}},
         "models[0].scheduler: min_admit_batch must be in [1, max_num_seqs=4], got 8"),
        ({"scheduler": {"async_depth": 5}}, "models[0].scheduler.async_depth: must be <= 4, got 5"),
        ({"cache": {"num_blocks": 0}}, "models[0].cache.num_blocks: must be >= 1, got 0"),
        ({"parallel": {"fused_allreduce_protocol": "smoke"}}, "models[0].parallel.fused_allreduce_protocol: must be one of"),
        ({"parallel": {"launcher": "multiproc"}}, "models[0].parallel.launcher: unknown field"),
        ({"scheduler": {"policy": "lifo"}}, "models[0].scheduler.policy: must be one of"),
        ({"parallel": {"pipeline_parallel_size": 2, "pipeline_micro_batches": 5}},
         "models[0].parallel: pipeline_micro_batches must be in [pipeline_parallel_size, 2 x pipeline_parallel_size]"
         " = [2, 4], got 5"),
        ({"parallel": {"pipeline_parallel_size": 2, "pipeline_micro_batches": 1}}, "= [2, 4], got 1"),
        ({"parallel": {"pipeline_micro_batches": 2}},
         "models[0].parallel: pipeline_micro_batches must be None (null) or 1 with pipeline_parallel_size = 1, got 2"),
        ({"parallel": {"pipeline_parallel_size": 2, "pipeline_micro_batches": 0}},
         "models[0].parallel.pipeline_micro_batches: must be >= 1, got 0"),
    ],
)
def test_errors_name_the_field(patch, expected):
    with pytest.raises(ConfigError) as err:
        parse_config({"models": [{"name": "m", **patch}]})
    assert expected in str(err.value)


def test_pipeline_micro_batches_reach_the_engine_config():
    model = parse_config({"models": [{"name": "m", "parallel": {"pipeline_parallel_size": 2,
                                                                 "pipeline_micro_batches": 3}}]}).models[0]
    parallel = model.to_engine_config().parallel
    assert (parallel.pipeline_micro_batches, parallel.pipeline_depth) == (3, 3)
    default = parse_config({"models": [{"name": "m", "parallel": {"pipeline_parallel_size": 2}}]}).models[0]
    assert default.to_engine_config().parallel.pipeline_depth == 2


def test_unique_names_and_top_level_errors():
    with pytest.raises(ConfigError, match="model names must be unique, 'a' appears twice"):
        parse_config({"models": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match=r"http.port: must be <= 65535, got 70000"):
        parse_config({"http": {"port": 70000}, "models": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="models: Field required"):
        parse_config({})
    with pytest.raises(ConfigError, match="ray: unknown field"):  # app_builder args have no ray section
        parse_config({"ray": {}, "models": [{"name": "a"}]}, AppConfig)


def test_load_config_reports_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: x\n    replicas: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\nmodels\[0\].replicas: must be >= 1, got 0"):
        load_config(bad)
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_app_args_round_trip_through_app_builder_schema():
    config = load_config(CONFIGS[0])
    assert parse_config(config.app_args(), AppConfig).models == config.models


def test_llm_server_options_reserve_a_worker_group():
    from shardserve.cluster.app import DRAFT_DRIVER_GPU_SHARE, llm_server_options

    tp4pp2 = load_config(Path(CONFIGS[0]).parent / "llama-70b-tp4-pp2.yaml").models[0]
    options = llm_server_options(0, tp4pp2)
    # Bundle 0 holds the replica (the engine's driver, CPUs only) and rank 0; one rank per other bundle.
    assert options["placement_group_bundles"] == [{"CPU": 8, "GPU": 1}] + [{"CPU": 4, "GPU": 1}] * 7
    assert options["placement_group_strategy"] == "PACK"  # two pipeline stages may span nodes
    actor = options["ray_actor_options"]
    assert options["num_replicas"] == 1 and (actor["num_cpus"], actor["num_gpus"]) == (4, 0)
    # No runtime_env: while one was set, Ray's gRPC proxy crashed cancelling streams (cluster/app.py).
    assert "runtime_env" not in actor
    router = options["request_router_config"]
    assert router.request_router_kwargs == {"prefix_affinity": True, "max_load_imbalance": 8}
    # A draft model runs in the driver (workers/spec/draft.py): the replica takes a sliver of rank 0's
    # GPU so it sees that device; the ranks take the rest of theirs (workers/group.py). Not on CPU.
    for num_gpus, driver in ((1, DRAFT_DRIVER_GPU_SHARE), (0, 0)):
        draft = ModelSection.model_validate({
            "name": "d", "source": "default", "parallel": {"tensor_parallel_size": 2},
            "resources": {"num_gpus_per_worker": num_gpus},
            "speculative": {"method": "draft", "draft_model": "default"}})  # fmt: skip
        assert llm_server_options(0, draft)["ray_actor_options"]["num_gpus"] == driver
    auto = load_config(Path(CONFIGS[0]).parent / "autoscaling-dp.yaml").models[0]
    scaling = llm_server_options(0, auto)
    assert scaling["autoscaling_config"]["max_replicas"] == 8 and "num_replicas" not in scaling
    zero = ModelSection.model_validate({"name": "z", "source": "default", "autoscaling": {
        "min_replicas": 0, "upscale_delay_s": 0, "downscale_delay_s": 5, "look_back_period_s": 12}})
    config = llm_server_options(0, zero)["autoscaling_config"]
    assert (config["min_replicas"], config["upscale_delay_s"], config["downscale_delay_s"]) == (0, 0, 5)
    assert config["look_back_period_s"] == 12
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**config)  # Serve accepts what the section gives it
    assert "placement_group_bundles" not in scaling


def test_cli_schema_and_validate(capsys, tmp_path):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == ServeConfig.model_json_schema()
    assert "description" in schema["$defs"]["ModelSection"]["properties"]["source"]
    assert main(["config", "validate", *map(str, CONFIGS)]) == 0
    assert capsys.readouterr().out.count("ok: ") == len(CONFIGS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: x\n    parallel: {pipeline_parallel_size: 0}\n")
    assert main(["config", "validate", str(bad)]) == 1
    assert "models[0].parallel.pipeline_parallel_size: must be >= 1, got 0" in capsys.readouterr().err


def test_serve_usage_text_names_endpoints():
    from shardserve.cluster.commands.serve import usage_text

    text = usage_text(load_config(Path(CONFIGS[0]).parent / "cpu-default.yaml"))
    assert "curl http://localhost:8000/v1/chat/completions" in text and "localhost:9000" in text


@pytest.mark.parametrize(("section", "expected"), [
    ({}, 0.0),  # CPU: one message per engine step
    ({"device": "cuda"}, 50.0),
    ({"resources": {"num_gpus_per_worker": 1}}, 50.0),
    ({"device": "cuda", "stream_interval_ms": 0}, 0.0),  # an explicit value wins
    ({"stream_interval_ms": 20}, 20.0),
])
def test_stream_interval_defaults_to_50_ms_on_gpus(section, expected):
    model = ModelSection.model_validate({"name": "m", "source": "default", **section})
    assert model.effective_stream_interval_ms() == expected


@pytest.mark.parametrize(("section", "expected"), [
    ({}, True),  # fixed replicas: the Ingress streams direct
    ({"autoscaling": {"max_replicas": 2}}, False),  # Serve's autoscaler must see the calls
    ({"router": {"direct_stream": False}}, False),
    ({"autoscaling": {"max_replicas": 2}, "router": {"direct_stream": False}}, False),
])
def test_direct_stream_defaults_to_on_without_autoscaling(section, expected):
    assert ModelSection.model_validate({"name": "m", "source": "default", **section}).direct_stream is expected


def test_quantization_values_reach_the_engine_or_are_refused():
    """Every accepted `quantization` value is one the engine implements and receives; others are refused."""
    from shardserve.cluster.config import ConfigError, parse_config
    from shardserve.workers.config import QUANTIZATION_METHODS, ModelConfig

    for method in QUANTIZATION_METHODS:
        section = parse_config({"models": [{"name": "m", "quantization": method,
                                            "quantization_group_size": 64}]}).models[0]
        engine = section.to_engine_config().model
        assert (engine.quantization, engine.quantization_group_size) == (method, 64)
    with pytest.raises(ConfigError, match=r"models\[0\]\.quantization"):
        parse_config({"models": [{"name": "m", "quantization": "int3"}]})
    with pytest.raises(ConfigError, match=r"quantization_group_size"):
        parse_config({"models": [{"name": "m", "quantization": "int4", "quantization_group_size": 48}]})
    with pytest.raises(ValueError, match="quantization must be null or one of"):
        ModelConfig(quantization="int3")
    assert parse_config({"models": [{"name": "m", "quantization": None}]}).models[0].quantization is None
