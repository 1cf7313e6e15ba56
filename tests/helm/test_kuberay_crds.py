"""Where the RayService schema comes from: the vendored KubeRay CRD, or $SHARDSERVE_KUBERAY_CRDS.

The chart tests validate every rendered RayService against KubeRay's CRD (helmkit.crd_validator).
The repository carries the ray.io/v1 RayService CRD with its license, so a fresh clone needs
nothing beside it; the variable points the same validator at another KubeRay release's files.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helmkit import KUBERAY_CRDS_ENV, VENDORED_KUBERAY_CRDS, crd_validator, kuberay_crds_dir


@pytest.fixture
def fresh_validators() -> Iterator[None]:
    crd_validator.cache_clear()
    yield
    crd_validator.cache_clear()


def test_vendored_crd_names_its_source_and_license() -> None:
    path = VENDORED_KUBERAY_CRDS / "ray.io_rayservices.yaml"
    header = path.read_text()[:1000]
    assert "KubeRay" in header and "Apache License 2.0" in header and "v1.7.0" in header
    assert "Apache License" in (VENDORED_KUBERAY_CRDS / "LICENSE").read_text()
    crd = yaml.safe_load(path.read_text())
    assert crd["metadata"]["name"] == "rayservices.ray.io"
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v1"]


def test_default_is_the_vendored_copy(monkeypatch, fresh_validators) -> None:
    monkeypatch.delenv(KUBERAY_CRDS_ENV, raising=False)
    assert kuberay_crds_dir() == VENDORED_KUBERAY_CRDS
    validator = crd_validator("RayService", "ray.io/v1")
    errors = [e.message for e in validator.iter_errors({"apiVersion": "ray.io/v1", "kind": "RayService",
                                                         "metadata": {}, "spec": {"bogus": 1}})]
    assert any("bogus" in message for message in errors), errors


def test_variable_points_the_validator_at_another_copy(tmp_path: Path, monkeypatch, fresh_validators) -> None:
    crd = yaml.safe_load((VENDORED_KUBERAY_CRDS / "ray.io_rayservices.yaml").read_text())
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["bogus"] = {
        "type": "integer"
    }
    (tmp_path / "ray.io_rayservices.yaml").write_text(yaml.safe_dump(crd))
    monkeypatch.setenv(KUBERAY_CRDS_ENV, str(tmp_path))
    validator = crd_validator("RayService", "ray.io/v1")
    obj = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {}, "spec": {"bogus": 1}}
    assert not [e for e in validator.iter_errors(obj) if "bogus" in e.message]


def test_a_wrong_variable_fails_naming_it(tmp_path: Path, monkeypatch, fresh_validators) -> None:
    monkeypatch.setenv(KUBERAY_CRDS_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=KUBERAY_CRDS_ENV):
        crd_validator("RayService", "ray.io/v1")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(VENDORED_KUBERAY_CRDS / "LICENSE", empty)
    monkeypatch.setenv(KUBERAY_CRDS_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match="ray.io_rayservices.yaml"):
        crd_validator("RayService", "ray.io/v1")
