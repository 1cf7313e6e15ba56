"""The chart with each CI values file (and its defaults): lint, render, schema-check every object,
and check what the chart promises: the Serve config is the app's schema, replicas fit the GPU pods,
Services point at the ports the app listens on, storage and the API key reach the pods."""

from __future__ import annotations

import copy
import importlib
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from helmkit import (
    CHART,
    CI_VALUES_DIR,
    RELEASE,
    drop_nulls,
    load_values,
    of_kind,
    only,
    render,
    run_helm,
    serve_config,
    validate_object,
)

CI_FILES = sorted(CI_VALUES_DIR.glob("*.yaml"))
CASES = [None, *CI_FILES]  # None: the chart's own defaults
IDS = ["defaults", *(p.stem for p in CI_FILES)]
REQUIRED_CI_FILES = {"cpu-small", "cpu-tls-keys", "llama-3.1-8b-tp2", "qwen3-30b-a3b-ep2", "llama-70b-tp4-pp2"}


def ray_groups(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    return cluster["headGroupSpec"], cluster.get("workerGroupSpecs", [])


def container(group: dict[str, Any]) -> dict[str, Any]:
    containers = group["template"]["spec"]["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def expected_args(values: dict[str, Any]) -> dict[str, Any]:
    """The app's args the chart should render: `shardserve:` plus the tls and apiKeys sections."""
    args = copy.deepcopy({k: v for k, v in values["shardserve"].items() if k != "ray"})
    tls = values["tls"]
    if tls["secretName"]:
        args["tls"] = {"cert_file": f"{tls['mountPath']}/tls.crt", "key_file": f"{tls['mountPath']}/tls.key"}
        if tls["requireClientAuth"]:
            args["tls"].update(ca_file=f"{tls['mountPath']}/ca.crt", require_client_auth=True)
    keys = values["apiKeys"]["keys"]
    if keys:
        auth = args.setdefault("auth", {})
        auth["api_keys"] = [*auth.get("api_keys", []), *(
            {"name": k["name"], "key_file": f"{values['apiKeys']['mountPath']}/{k['secretKey']}",
             **({"requests_per_minute": k["requestsPerMinute"]} if k.get("requestsPerMinute") else {}),
             **({"tokens_per_minute": k["tokensPerMinute"]} if k.get("tokensPerMinute") else {})}
            for k in keys
        )]  # fmt: skip
    return args


def test_ci_values_files_present() -> None:
    assert {p.stem for p in CI_FILES} >= REQUIRED_CI_FILES


@pytest.mark.parametrize("values_file", CASES, ids=IDS)
def test_helm_lint_strict(values_file: Path | None) -> None:
    result = run_helm("lint", "--strict", str(CHART), *(["-f", str(values_file)] if values_file else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values_file", CASES, ids=IDS)
def test_every_rendered_object_is_schema_valid(values_file: Path | None) -> None:
    objects = render(values_file)
    kinds = sorted(o["kind"] for o in objects)
    assert {"RayService", "Service", "PodDisruptionBudget"} <= set(kinds), kinds
    errors = [error for obj in objects for error in validate_object(obj)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("values_file", CASES, ids=IDS)
def test_serve_config_is_the_values_document_and_valid(values_file: Path | None) -> None:
    from shardserve.cluster.config import AppConfig, ServeConfig, parse_config

    values = load_values(values_file)
    doc = serve_config(only(render(values_file), "RayService"))
    (app,) = doc["applications"]
    assert app["import_path"] == "shardserve.cluster.app:app_builder"
    assert app["route_prefix"] == values["serve"]["routePrefix"]
    args = app["args"]
    assert "ray" not in args, "the Ray cluster provides ray:, args must not carry it"
    # The values' `shardserve:` section verbatim (helm drops null entries), plus what the chart's tls
    # and apiKeys sections mount.
    assert drop_nulls(args) == drop_nulls(expected_args(values))
    config = ServeConfig.model_validate(args)
    assert parse_config(args, AppConfig) == AppConfig.model_validate(args)  # what app_builder runs
    assert [m.name for m in config.models] == [m["name"] for m in values["shardserve"]["models"]]
    https = {}
    mutual = config.tls is not None and config.tls.require_client_auth
    if config.tls is not None and not mutual:  # Serve's HTTP proxy serves HTTPS
        https = {"ssl_certfile": config.tls.cert_file, "ssl_keyfile": config.tls.key_file}
        https.update({"ssl_ca_certs": config.tls.ca_file} if config.tls.ca_file else {})
    assert doc["http_options"] == {"host": config.http.host, "port": config.http.port, **https}
    # Mutual TLS: no Serve HTTP proxy, the Ingress replicas serve HTTPS (as serve_options does).
    assert doc["proxy_location"] == ("Disabled" if mutual else values["serve"]["proxyLocation"])
    assert "grpc_options" not in doc  # Serve starts no gRPC proxy: the Ingress serves gRPC itself


def test_serve_entry_points_resolve() -> None:
    """import_path in serveConfigV2 names a real callable."""
    doc = serve_config(only(render(None), "RayService"))
    module, _, attr = doc["applications"][0]["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("values_file", CASES, ids=IDS)
def test_gpu_math_replicas_fit_worker_pods(values_file: Path | None) -> None:
    """GPUs per replica = num_gpus_per_worker x tp x pp; tp workers of one stage share a pod; a
    replica's pp stages may span pods of one group; pods request nvidia.com/gpu = Ray's num-gpus."""
    from shardserve.cluster.config import ServeConfig

    objects = render(values_file)
    values = load_values(values_file)
    config = ServeConfig.model_validate(serve_config(only(objects, "RayService"))["applications"][0]["args"])
    head, workers = ray_groups(objects)

    head_resources = container(head)["resources"]
    assert "nvidia.com/gpu" not in head_resources.get("limits", {})
    assert head["rayStartParams"]["num-gpus"] == "0"

    autoscaler = values["rayAutoscaler"]["enabled"]
    pods = []  # (gpus per pod, ray cpus per pod, pods available)
    by_name = {g["name"]: g for g in values["workerGroups"]}
    for group in workers:
        want = by_name[group["groupName"]]
        limits, requests = container(group)["resources"]["limits"], container(group)["resources"]["requests"]
        gpus = int(group["rayStartParams"]["num-gpus"])
        assert gpus == want["gpusPerPod"]
        if gpus:
            assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == str(gpus)
        else:
            assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests
        assert int(group["rayStartParams"]["num-cpus"]) == int(limits["cpu"]) == want["cpusPerPod"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pods.append((gpus, int(limits["cpu"]), group["maxReplicas"] if autoscaler else group["replicas"]))
    if int(head["rayStartParams"]["num-cpus"]):
        pods.append((0, int(head["rayStartParams"]["num-cpus"]), 1))
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    assert cluster.get("enableInTreeAutoscaling", False) == autoscaler

    total_gpus = sum(g * n for g, _, n in pods)
    need_min = need_max = 0.0
    for model in config.models:
        tp, pp = model.parallel.tensor_parallel_size, model.parallel.pipeline_parallel_size
        gpw, cpw = model.resources.num_gpus_per_worker, model.resources.num_cpus_per_worker
        per_replica = gpw * tp * pp
        stage_gpus, stage_cpus = gpw * tp, cpw * tp
        hosts = []
        for gpus, cpus, count in pods:
            per_pod = min(
                gpus // stage_gpus if stage_gpus else math.inf, cpus // stage_cpus if stage_cpus else math.inf
            )
            if per_pod >= 1 and math.ceil(pp / per_pod) <= count:
                hosts.append((gpus, cpus, count))
        assert hosts, (
            f"{model.name}: no worker group holds a replica ({per_replica} GPUs, stage {stage_gpus})"
        )
        if model.device == "cuda" or per_replica:
            assert per_replica > 0 and any(g >= stage_gpus for g, _, _ in hosts)
        lo, hi = (
            (model.autoscaling.min_replicas, model.autoscaling.max_replicas)
            if model.autoscaling
            else (model.num_replicas, model.num_replicas)
        )
        need_min += per_replica * lo
        need_max += per_replica * hi
    assert need_min <= need_max <= total_gpus, (need_min, need_max, total_gpus)


def test_gpu_math_of_the_ci_layouts() -> None:
    """The four CI layouts mean what their names say."""

    def gpus(stem: str) -> tuple[float, list[int]]:
        objects = render(CI_VALUES_DIR / f"{stem}.yaml")
        model = serve_config(only(objects, "RayService"))["applications"][0]["args"]["models"][0]
        par, res = model["parallel"], model["resources"]
        per_replica = res["num_gpus_per_worker"] * par["tensor_parallel_size"] * par["pipeline_parallel_size"]
        _, workers = ray_groups(objects)
        return per_replica, [
            int(container(g)["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in workers
        ]

    assert gpus("cpu-small") == (0, [0])
    assert gpus("llama-3.1-8b-tp2") == (2, [2])
    assert gpus("qwen3-30b-a3b-ep2") == (2, [2])
    per_replica, per_pod = gpus("llama-70b-tp4-pp2")
    assert (per_replica, per_pod) == (8, [4])  # one replica spans two 4-GPU pods: PP across pods
    _, workers = ray_groups(render(CI_VALUES_DIR / "llama-70b-tp4-pp2.yaml"))
    assert workers[0]["replicas"] == 2


@pytest.mark.parametrize("values_file", CASES, ids=IDS)
def test_service_ports_match_values_and_app(values_file: Path | None) -> None:
    objects = render(values_file)
    values = load_values(values_file)
    doc = serve_config(only(objects, "RayService"))
    args = doc["applications"][0]["args"]
    head, workers = ray_groups(objects)
    services = {
        s["metadata"]["labels"]["app.kubernetes.io/component"]: s for s in of_kind(objects, "Service")
    }
    assert set(services) == {"http", "grpc"}
    expected = {
        "http": (values["shardserve"]["http"]["port"], args["http"]["port"], doc["http_options"]["port"]),
        "grpc": (values["shardserve"]["grpc"]["port"], args["grpc"]["port"]),
    }
    for kind, service in services.items():
        (port,) = service["spec"]["ports"]
        assert len(set(expected[kind])) == 1, expected[kind]
        assert port["port"] == expected[kind][0]
        selector = service["spec"]["selector"]
        assert selector["app.kubernetes.io/instance"] == RELEASE
        # KubeRay's ray.io/serve label comes from a plaintext check: with TLS the chart's probes decide.
        assert selector.get("ray.io/serve") == (None if args.get("tls") else "true")
        # gRPC (and with mutual TLS HTTP) is served by the Ingress replicas, on the head pod (cluster/app.py).
        mutual = bool(args.get("tls", {}).get("require_client_auth"))
        on_head = values["service"]["podSelector"] == "head" or kind == "grpc" or mutual
        assert (selector.get("ray.io/node-type") == "head") == on_head
        # targetPort names a container port carrying the same number on every pod it may select.
        for group in [head, *workers]:
            labels = group["template"]["metadata"]["labels"]
            selectable = all(labels.get(k) == v for k, v in selector.items() if not k.startswith("ray.io/"))
            assert selectable
            named = {p["name"]: p["containerPort"] for p in container(group)["ports"]}
            assert named[port["targetPort"]] == port["port"]
    metrics_port = values["metrics"]["port"]
    for group in [head, *workers]:
        assert group["rayStartParams"]["metrics-export-port"] == str(metrics_port)
        assert {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"} in container(group)[
            "ports"
        ]
    for monitor in of_kind(objects, "PodMonitor"):
        app = ["serve"] if values["metrics"]["podMonitor"]["scrapeApp"] else []
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics", *app]
    assert bool(of_kind(objects, "PodMonitor")) == values["metrics"]["podMonitor"]["enabled"]


@pytest.mark.parametrize("mutual", [True, False], ids=["mutual-tls", "server-tls"])
def test_tls_readiness_probes_check_health_over_https(tmp_path: Path, mutual: bool) -> None:
    """With TLS the chart's readiness probes replace KubeRay's plaintext ones: the head GETs /health
    over HTTPS (with mutual TLS through `shardserve probe` and the Secret's certificate, parsed here
    by the real CLI); workers check their proxy over HTTPS, or the raylet when they run no proxy."""
    from shardserve.cluster.cli import build_parser

    values = load_values(CI_VALUES_DIR / "cpu-tls-keys.yaml")
    values["tls"]["requireClientAuth"] = mutual
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    head, workers = ray_groups(render(path))
    port, mount = values["shardserve"]["http"]["port"], values["tls"]["mountPath"]
    probe = container(head)["readinessProbe"]
    if mutual:
        command = probe["exec"]["command"]
        args = build_parser(only="probe").parse_args(command[1:])
        assert command[0] == "shardserve" and args.func.__module__ == "shardserve.cluster.commands.probe"
        assert (args.url, args.cert, args.key) == (
            f"https://127.0.0.1:{port}/health", f"{mount}/tls.crt", f"{mount}/tls.key"
        )
    else:
        assert probe["httpGet"] == {"path": "/health", "port": "serve", "scheme": "HTTPS"}
    for group in workers:
        get = container(group)["readinessProbe"]["httpGet"]
        proxy = not mutual and values["serve"]["proxyLocation"] == "EveryNode"
        expected = {"path": "/-/healthz", "port": "serve", "scheme": "HTTPS"} if proxy else {
            "path": "/api/local_raylet_healthz", "port": 52365, "scheme": "HTTP"}  # fmt: skip
        assert get == expected
    plain_head, plain_workers = ray_groups(render(CI_VALUES_DIR / "cpu-small.yaml"))
    assert all("readinessProbe" not in container(g) for g in [plain_head, *plain_workers])  # KubeRay's own


@pytest.mark.parametrize("values_file", CASES, ids=IDS)
def test_pods_get_shm_storage_nccl_and_api_key(values_file: Path | None) -> None:
    objects = render(values_file)
    values = load_values(values_file)
    head, workers = ray_groups(objects)
    storage = values["modelStorage"]
    secrets = {s["metadata"]["name"]: s for s in of_kind(objects, "Secret")}
    claims = {c["metadata"]["name"] for c in of_kind(objects, "PersistentVolumeClaim")}
    for group in [head, *workers]:
        spec, main = group["template"]["spec"], container(group)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"] == "/dev/shm"
        env = {e["name"]: e for e in main.get("env", [])}
        for name, value in [*values["nccl"]["env"].items(), *values["rayServe"]["env"].items()]:
            assert env[name]["value"] == str(value)
        if storage["type"] == "image":
            assert "models" not in volumes
        else:
            assert mounts["models"] == storage["mountPath"]
            if storage["type"] == "pvc":
                claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
                assert claim == (storage["pvc"]["existingClaim"] or f"{RELEASE}-shardserve-models")
                assert (claim in claims) == (not storage["pvc"]["existingClaim"])
            else:
                assert volumes["models"]["hostPath"]["path"] == storage["hostPath"]["path"]
        if values["apiKey"]["enabled"]:
            ref = env["SHARDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == values["apiKey"]["existingSecretKey"]
            if values["apiKey"]["existingSecret"]:
                assert ref["name"] == values["apiKey"]["existingSecret"] and ref["name"] not in secrets
            else:
                assert ref["key"] in secrets[ref["name"]]["data"]
        else:
            assert "SHARDSERVE_API_KEY" not in env
    if storage["type"] != "image":
        for model in values["shardserve"]["models"]:
            if model["source"].startswith("/"):
                assert model["source"].startswith(storage["mountPath"].rstrip("/") + "/"), model["source"]


def test_chart_sets_the_serve_env_of_the_app() -> None:
    """The chart's Ray Serve switches are the ones `shardserve serve` sets for a local Ray."""
    from shardserve.cluster.app import SERVE_ENV

    assert load_values(None)["rayServe"]["env"] == SERVE_ENV


def test_tls_and_api_key_secrets_reach_every_ray_pod() -> None:
    """tls.secretName and apiKeys.existingSecret are mounted read-only on every Ray pod (HTTPS is
    served by Serve's proxy on each pod, or with mutual TLS by the Ingress on the head; the Ingress
    may read keys on the head) where the args say."""
    values_file = CI_VALUES_DIR / "cpu-tls-keys.yaml"
    values = load_values(values_file)
    objects = render(values_file)
    args = serve_config(only(objects, "RayService"))["applications"][0]["args"]
    head, workers = ray_groups(objects)
    for group in [head, *workers]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m for m in container(group)["volumeMounts"]}
        assert volumes["tls"]["secret"]["secretName"] == values["tls"]["secretName"]
        assert volumes["api-keys"]["secret"]["secretName"] == values["apiKeys"]["existingSecret"]
        assert mounts["tls"] == {"name": "tls", "mountPath": values["tls"]["mountPath"], "readOnly": True}
        assert mounts["api-keys"]["mountPath"] == values["apiKeys"]["mountPath"] and mounts["api-keys"]["readOnly"]
    for path in (args["tls"]["cert_file"], args["tls"]["key_file"], args["tls"]["ca_file"]):
        assert path.startswith(values["tls"]["mountPath"] + "/")
    files = [k["key_file"] for k in args["auth"]["api_keys"] if k.get("key_file")]
    assert files == [f"{values['apiKeys']['mountPath']}/{k['secretKey']}" for k in values["apiKeys"]["keys"]]
    # Without the sections nothing is mounted.
    head, _ = ray_groups(render(None))
    assert not {"tls", "api-keys"} & {v["name"] for v in head["template"]["spec"]["volumes"]}


def test_pod_disruption_budget_selects_the_ray_pods() -> None:
    objects = render(CI_VALUES_DIR / "llama-70b-tp4-pp2.yaml")
    pdb = only(objects, "PodDisruptionBudget")
    head, workers = ray_groups(objects)
    for group in [head, *workers]:
        labels = group["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_notes_tell_how_to_call_http_and_grpc(tmp_path: Path) -> None:
    """NOTES.txt rendered (helm template skips it, so render it through a copy of the chart)."""
    import shutil

    import yaml

    chart = tmp_path / "shardserve"
    shutil.copytree(CHART, chart)
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{- define "notes.test" -}}\n' + notes + "\n{{- end -}}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ include "notes.test" . | quote }}}\n'
    )
    values_file = CI_VALUES_DIR / "llama-70b-tp4-pp2.yaml"
    result = run_helm(
        "template", RELEASE, str(chart), "-f", str(values_file), "--show-only", "templates/zz-notes.yaml"
    )
    assert result.returncode == 0, result.stderr
    text = yaml.safe_load(result.stdout)["data"]["notes"]
    assert f"svc/{RELEASE}-shardserve-http 8080:8080" in text
    assert "localhost:8080/v1/chat/completions" in text and '"model": "llama-3.1-70b-instruct"' in text
    assert f"svc/{RELEASE}-shardserve-grpc 50051:50051" in text
    assert "grpcurl" in text and "localhost:50051 shardserve.v1.LLMService/Generate" in text


def test_validators_reject_broken_objects() -> None:
    """The schema checks above can fail: a mutated object of each kind is rejected."""
    objects = render(CI_VALUES_DIR / "llama-3.1-8b-tp2.yaml")
    rayservice = copy.deepcopy(only(objects, "RayService"))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["gpusPerPod"] = 2  # not a KubeRay field
    assert any("gpusPerPod" in e for e in validate_object(rayservice))
    rayservice = copy.deepcopy(only(objects, "RayService"))
    container(rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0])["volumeMounts"][0][
        "mountPath"
    ] = 5
    assert validate_object(rayservice)
    service = copy.deepcopy(of_kind(objects, "Service")[0])
    service["spec"]["ports"][0]["prot"] = "TCP"
    assert validate_object(service)
    monitor = copy.deepcopy(only(objects, "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["portt"] = "metrics"
    assert any("portt" in e for e in validate_object(monitor))
    pdb = copy.deepcopy(only(objects, "PodDisruptionBudget"))
    pdb["spec"]["maxUnavailable"] = [1]
    assert validate_object(pdb)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert validate_object(unknown)
