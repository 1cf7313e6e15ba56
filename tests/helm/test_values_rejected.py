"""Bad values are refused before anything reaches a cluster: by values.schema.json (types, enums,
minimums, required fields) or by the chart's template checks (templates/_validate.tpl). Each case
asserts that helm exits non-zero and that its message names the offending field. The chart's schema
of the serve config must also stay in step with cluster/config.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helmkit import CHART, CI_VALUES_DIR, run_helm, template_args

Values = dict[str, Any]


def model0(values: Values) -> Values:
    return values["shardserve"]["models"][0]


def _set(path: str, value: Any) -> Callable[[Values], None]:
    def mutate(values: Values) -> None:
        node: Any = values
        *parents, last = path.split("/")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _del_source(values: Values) -> None:
    del model0(values)["source"]


def _both_replicas_and_autoscaling(values: Values) -> None:
    model0(values)["replicas"] = 2
    model0(values)["autoscaling"] = {"min_replicas": 1, "max_replicas": 2}


# (id, CI values file, change, substrings the error must contain, extra helm args)
CASES: list[tuple[str, str, Callable[[Values], None], list[str], list[str]]] = [
    (
        "gpu-count-string",
        "llama-3.1-8b-tp2",
        _set("workerGroups/0/gpusPerPod", "2"),
        ["/workerGroups/0/gpusPerPod", "string"],
        [],
    ),
    (
        "gpus-per-worker-string",
        "llama-3.1-8b-tp2",
        _set("shardserve/models/0/resources/num_gpus_per_worker", "1"),
        ["/shardserve/models/0/resources/num_gpus_per_worker", "string"],
        [],
    ),
    (
        "gpu-count-negative",
        "llama-70b-tp4-pp2",
        _set("workerGroups/0/gpusPerPod", -4),
        ["/workerGroups/0/gpusPerPod", "minimum"],
        [],
    ),
    ("source-missing", "cpu-small", _del_source, ["/shardserve/models/0", "'source'"], []),
    (
        "source-empty",
        "cpu-small",
        _set("shardserve/models/0/source", ""),
        ["/shardserve/models/0/source"],
        [],
    ),
    # Without the schema, the template check still names the field.
    (
        "source-missing-template",
        "cpu-small",
        _del_source,
        ["shardserve.models[0] (smollm2).source: required"],
        ["--skip-schema-validation"],
    ),
    (
        "dtype-enum",
        "cpu-small",
        _set("shardserve/models/0/dtype", "fp16"),
        ["/shardserve/models/0/dtype"],
        [],
    ),
    (
        "unknown-model-field",
        "llama-3.1-8b-tp2",
        _set("shardserve/models/0/parallel", {"tensor_paralel_size": 2}),
        ["tensor_paralel_size"],
        [],
    ),
    (
        "tp-not-dividing-heads",
        "cpu-small",
        _set("shardserve/models/0/parallel/tensor_parallel_size", 2),
        ["parallel.tensor_parallel_size: 2 does not divide modelHints.smollm2.numAttentionHeads (9)"],
        [],
    ),
    (
        "tp-vs-kv-heads",
        "llama-70b-tp4-pp2",
        _set("modelHints/llama-3.1-70b-instruct/numKeyValueHeads", 6),
        ["tensor_parallel_size", "numKeyValueHeads (6)"],
        [],
    ),
    (
        "ep-not-dividing-experts",
        "qwen3-30b-a3b-ep2",
        _set("modelHints/qwen3-30b-a3b/numExperts", 127),
        ["parallel.expert_parallel_size: 2 does not divide modelHints.qwen3-30b-a3b.numExperts (127)"],
        [],
    ),
    (
        "ep-not-dividing-world",
        "qwen3-30b-a3b-ep2",
        _set("shardserve/models/0/parallel/expert_parallel_size", 4),
        ["expert_parallel_size: 4 must divide tensor_parallel_size 2"],
        [],
    ),
    (
        "replicas-and-autoscaling",
        "qwen3-30b-a3b-ep2",
        _both_replicas_and_autoscaling,
        ["shardserve.models[0] (qwen3-30b-a3b): set either replicas (2) or autoscaling, not both"],
        [],
    ),
    (
        "tp-larger-than-pod",
        "llama-70b-tp4-pp2",
        _set("shardserve/models/0/parallel/tensor_parallel_size", 8),
        ["parallel.tensor_parallel_size 8", "must fit on one pod", "gpu-4x: 2 x (4 GPUs"],
        [],
    ),
    (
        "pp-needs-two-pods",
        "llama-70b-tp4-pp2",
        _set("workerGroups/0/replicas", 1),
        ["a replica needs 8 GPUs", "pipeline_parallel_size 2"],
        ["--set", "workerGroups[0].minReplicas=1"],
    ),
    (
        "gpu-model-on-cpu-pods",
        "cpu-small",
        _set("shardserve/models/0/resources/num_gpus_per_worker", 1),
        ["resources.num_gpus_per_worker 1", "worker group cpu: 1 x (0 GPUs"],
        [],
    ),
    (
        "max-replicas-exceed-gpus",
        "qwen3-30b-a3b-ep2",
        _set("shardserve/models/0/autoscaling", {"min_replicas": 1, "max_replicas": 8}),
        ["autoscaling.max_replicas", "need 16 GPUs", "offer 8"],
        [],
    ),
    (
        "replicas-exceed-gpus",
        "llama-3.1-8b-tp2",
        _set("shardserve/models/0/replicas", 3),
        ["need 6 GPUs", "offer 4"],
        [],
    ),
    (
        "worker-replicas-out-of-range",
        "llama-3.1-8b-tp2",
        _set("workerGroups/0/replicas", 5),
        ["workerGroups[0] (gpu-2x): replicas 5 must lie in [minReplicas 2, maxReplicas 2]"],
        [],
    ),
    (
        "source-outside-mount",
        "llama-3.1-8b-tp2",
        _set("shardserve/models/0/source", "/data/llama"),
        ["shardserve.models[0] (llama-3.1-8b-instruct).source", "modelStorage.mountPath"],
        [],
    ),
    ("api-key-without-secret", "cpu-small", _set("apiKey/value", ""), ["apiKey", "existingSecret"], []),
    (
        "tls-secret-and-config-tls",
        "cpu-tls-keys",
        _set("shardserve/tls", {"cert_file": "/c.pem", "key_file": "/k.pem"}),
        ["tls.secretName", "leave shardserve.tls null"],
        [],
    ),
    ("client-auth-without-secret", "cpu-tls-keys", _set("tls/secretName", ""), ["tls.requireClientAuth"], []),
    (
        "client-auth-with-serve-pods",
        "cpu-tls-keys",
        lambda values: values.setdefault("service", {}).update(podSelector="serve"),
        ["service.podSelector: serve is not possible with mutual TLS"],
        [],
    ),
    ("api-keys-without-secret", "cpu-tls-keys", _set("apiKeys/existingSecret", ""), ["apiKeys.existingSecret"], []),
    (
        "api-key-name-twice",
        "cpu-tls-keys",
        _set("apiKeys/keys/1/name", "ops"),
        ["apiKeys.keys", '"ops" appears twice'],
        [],
    ),
    (
        "api-key-rate-not-positive",
        "cpu-tls-keys",
        _set("apiKeys/keys/0/requestsPerMinute", 0),
        ["requestsPerMinute"],
        [],
    ),
    (
        "api-key-token-rate-not-positive",
        "cpu-tls-keys",
        _set("apiKeys/keys/0/tokensPerMinute", -5),
        ["tokensPerMinute"],
        [],
    ),
    (
        "port-clash",
        "cpu-small",
        _set("shardserve/grpc/port", 8000),
        ["port 8000", "shardserve.http.port"],
        [],
    ),
    (
        "cuda-without-gpus",
        "cpu-small",
        _set("shardserve/models/0/device", "cuda"),
        ["shardserve.models[0] (smollm2).device: cuda needs resources.num_gpus_per_worker > 0"],
        [],
    ),
]


@pytest.mark.parametrize(
    ("base", "mutate", "expected", "extra"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_values_are_rejected(
    tmp_path: Path, base: str, mutate: Callable[[Values], None], expected: list[str], extra: list[str]
) -> None:
    values = yaml.safe_load((CI_VALUES_DIR / f"{base}.yaml").read_text())
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(values))
    ok = run_helm(*template_args((good,)))
    assert ok.returncode == 0, f"the unmodified {base} values must render:\n{ok.stderr}"

    mutate(values)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    result = run_helm(*template_args((bad,), tuple(extra)))
    assert result.returncode != 0, f"helm accepted bad values:\n{yaml.safe_dump(values)}"
    for text in expected:
        assert text in result.stderr, f"{text!r} not in helm's error:\n{result.stderr}"


def test_lint_strict_rejects_bad_values(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"workerGroups": [{"name": "gpu", "gpusPerPod": "four"}]}))
    result = run_helm("lint", "--strict", str(CHART), "-f", str(bad))
    assert result.returncode != 0
    assert "gpusPerPod" in result.stdout + result.stderr


# --- the chart's schema of the serve config is generated from cluster/config.py -----------------


def test_chart_schema_is_generated(capsys: pytest.CaptureFixture[str]) -> None:
    """values.schema.json is exactly what `shardserve config helm-schema` generates from the serve
    config's pydantic models (themselves generated from the engine's dataclasses) and the chart's
    base: a field added to the engine or cluster/config.py cannot be refused by the chart."""
    from shardserve.cluster.cli import main

    assert main(["config", "helm-schema", "--chart", str(CHART)]) == 0
    generated = capsys.readouterr().out
    committed = (CHART / "values.schema.json").read_text()
    assert generated == committed, "run `shardserve config helm-schema --write` and commit the result"
    schema = json.loads(committed)["properties"]["shardserve"]
    model = schema["properties"]["models"]["items"]
    assert set(model["required"]) == {"name", "source"}  # the base's overlay applies
    assert {"async_scheduling", "num_blocks", "pdl"} <= set(model["properties"]["scheduler"]["properties"]) | set(
        model["properties"]["cache"]["properties"]) | set(model["properties"]["parallel"]["properties"])
