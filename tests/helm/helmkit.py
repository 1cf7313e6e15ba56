"""Helpers for the Helm chart tests: find helm, render the chart, and validate rendered objects.

Data flow: a values file -> `helm template` (subprocess) -> a list of Kubernetes objects (dicts) ->
one validator per kind: built-in kinds through `kubernetes-validate` (strict, pinned Kubernetes
version), the RayService through the KubeRay CRD's openAPIV3Schema (vendored in tests/helm/kuberay/,
or the copy in $SHARDSERVE_KUBERAY_CRDS; made strict: unknown fields are errors, as with `kubectl
apply --validate=strict`), and the Prometheus operator's PodMonitor through its pydantic model
(round-tripped, so unknown fields are errors too). A kind with no validator is an error: nothing
rendered goes unchecked.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "shardserve"
CI_VALUES_DIR = REPO_ROOT / "helm" / "ci"
# KubeRay's RayService CRD (ray.io/v1, Apache-2.0) vendored so the tests need only the repository;
# set SHARDSERVE_KUBERAY_CRDS to a folder of KubeRay CRD files (ray-operator/config/crd/bases of a
# KubeRay checkout) to validate against another KubeRay release instead.
KUBERAY_CRDS_ENV = "SHARDSERVE_KUBERAY_CRDS"
VENDORED_KUBERAY_CRDS = Path(__file__).resolve().parent / "kuberay"
# Kubernetes version the built-in kinds are validated against (kubernetes-validate ships its schemas).
KUBE_VERSION = "1.31.0"
HELM_VERSION_PREFIX = "v3.19."
RELEASE = "ci"
NAMESPACE = "shardserve"


def helm_binary() -> str:
    """helm from $HELM, else the repo-local .tools/bin/helm that get-helm.sh installs, else PATH."""
    candidates = [os.environ.get("HELM"), str(REPO_ROOT / ".tools" / "bin" / "helm"), shutil.which("helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "helm not found (looked at $HELM, .tools/bin/helm and PATH); install it with "
        "`bash .ci/get-helm.sh .tools/bin` from the repository root (`make test` does)"
    )


@dataclass(frozen=True)
class HelmResult:
    returncode: int
    stdout: str
    stderr: str


def run_helm(*args: str) -> HelmResult:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60, check=False)
    return HelmResult(proc.returncode, proc.stdout, proc.stderr)


def template_args(values_files: tuple[Path, ...], extra: tuple[str, ...] = ()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in values_files:
        args += ["-f", str(path)]
    return [*args, *extra]


@functools.cache
def render(values_file: Path | None) -> list[dict[str, Any]]:
    """Rendered objects for the chart with one values file (None: the chart's defaults)."""
    result = run_helm(*template_args((values_file,) if values_file else ()))
    if result.returncode != 0:
        raise AssertionError(f"helm template failed for {values_file}:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def load_values(values_file: Path | None) -> dict[str, Any]:
    """The chart's defaults overlaid with a values file, as helm merges them (maps merge, lists replace)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file is not None:
        _merge(values, yaml.safe_load(values_file.read_text()) or {})
    return values


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


# --- KubeRay CRD schema -------------------------------------------------------------------------


def _strict_openapi(node: Any) -> Any:
    """openAPIV3Schema (Kubernetes flavour) -> JSON schema that rejects what the API server would.

    nullable -> a null type; x-kubernetes-int-or-string -> integer or string; objects with declared
    properties and no x-kubernetes-preserve-unknown-fields reject unknown keys (the server prunes or,
    with strict field validation, rejects them). CEL rules (x-kubernetes-validations) are not run.
    """
    if isinstance(node, list):
        return [_strict_openapi(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict_openapi(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False) and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def kuberay_crds_dir() -> Path:
    """$SHARDSERVE_KUBERAY_CRDS when set (it must exist), else the vendored tests/helm/kuberay/."""
    override = os.environ.get(KUBERAY_CRDS_ENV)
    if not override:
        return VENDORED_KUBERAY_CRDS
    path = Path(override)
    if not path.is_dir():
        raise FileNotFoundError(f"${KUBERAY_CRDS_ENV}={override} is not a folder of KubeRay CRD files")
    return path


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    files = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
    if kind not in files:
        raise AssertionError(f"no KubeRay CRD known for kind {kind!r}; known: {sorted(files)}")
    path = kuberay_crds_dir() / files[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"KubeRay CRD {path} missing (vendored: RayService only; ${KUBERAY_CRDS_ENV} may name a "
            "folder holding KubeRay's ray.io_*.yaml files)"
        )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group, (crd["spec"]["group"], group)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = _strict_openapi(entry["schema"]["openAPIV3Schema"])
            schema["required"] = sorted(
                {*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"}
            )
            jsonschema.Draft7Validator.check_schema(schema)
            return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"{path.name} has no version {version}")


# --- validators per kind ------------------------------------------------------------------------


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "<root>"


def validate_builtin(obj: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{obj['kind']}/{obj['metadata']['name']}: {_where(error)}: {error.message}"]
    return []


def validate_crd(obj: dict[str, Any]) -> list[str]:
    validator = crd_validator(obj["kind"], obj["apiVersion"])
    return [
        f"{obj['kind']}/{obj['metadata']['name']}: {_where(e)}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def validate_pod_templates(obj: dict[str, Any]) -> list[str]:
    """The RayService's pod templates again as core/v1 PodTemplates (quantities, probes, volumes...)."""
    cluster = obj["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [
        (group["groupName"], group) for group in cluster.get("workerGroupSpecs", [])
    ]
    errors = []
    for name, group in groups:
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{obj['metadata']['name']}-{name}"},
            "template": group["template"],
        }
        errors += validate_builtin(pod_template)
    return errors


def validate_prometheus_operator(obj: dict[str, Any]) -> list[str]:
    """monitoring.coreos.com/v1 kinds through their pydantic models; a dropped key is an unknown field."""
    from cloudcoil.models.prometheus_operator import v1 as prom

    model = getattr(prom, obj["kind"], None)
    if model is None:
        return [f"{obj['kind']}: no monitoring.coreos.com/v1 model for this kind"]
    try:
        parsed = model.model_validate(obj)
    except Exception as error:  # pydantic.ValidationError
        return [f"{obj['kind']}/{obj['metadata']['name']}: {error}"]
    dumped = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
    return [f"{obj['kind']}/{obj['metadata']['name']}: {msg}" for msg in _unknown_keys(obj, dumped, "")]


def _unknown_keys(given: Any, kept: Any, where: str) -> list[str]:
    if isinstance(given, dict) and isinstance(kept, dict):
        problems = [f"{where}/{key}: unknown field" for key in given if key not in kept]
        for key in given:
            if key in kept:
                problems += _unknown_keys(given[key], kept[key], f"{where}/{key}")
        return problems
    if isinstance(given, list) and isinstance(kept, list):
        if len(given) != len(kept):
            return [f"{where}: {len(given)} items, the model kept {len(kept)}"]
        return [
            p
            for i, (a, b) in enumerate(zip(given, kept, strict=True))
            for p in _unknown_keys(a, b, f"{where}/{i}")
        ]
    return []


def validate_object(obj: dict[str, Any]) -> list[str]:
    """Every rendered object goes through exactly one schema; an unknown kind is an error."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    if api_version.startswith("ray.io/"):
        return validate_crd(obj) + (validate_pod_templates(obj) if kind == "RayService" else [])
    if api_version.startswith("monitoring.coreos.com/"):
        return validate_prometheus_operator(obj)
    if "." in api_version.split("/")[0] and not api_version.split("/")[0].endswith(".k8s.io"):
        return [f"{kind} ({api_version}): no schema to validate this kind against"]
    return validate_builtin(obj)


# --- rendered-object accessors ------------------------------------------------------------------


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(text)


def drop_nulls(value: Any) -> Any:
    """Helm drops null map entries when merging values; compare documents without them."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return copy.deepcopy(value)
