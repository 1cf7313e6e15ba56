"""Fixtures for the Helm chart tests: helm must be installed (a missing helm fails, never skips)."""

from __future__ import annotations

import importlib.util

import pytest
from helmkit import CHART, CI_VALUES_DIR, HELM_VERSION_PREFIX, helm_binary, kuberay_crds_dir, run_helm


@pytest.fixture(scope="session", autouse=True)
def helm_ready() -> str:
    try:
        helm = helm_binary()
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)
    missing = [
        name
        for name in ("kubernetes_validate", "cloudcoil.models.prometheus_operator")
        if not _importable(name)
    ]
    if missing:
        pytest.fail(
            f"{missing} not installed: pip install kubernetes-validate "
            "'cloudcoil-models-prometheus-operator==0.80.1.0' (the Makefile's test set-up does)",
            pytrace=False,
        )
    version = run_helm("version", "--short").stdout.strip()
    if not version.startswith(HELM_VERSION_PREFIX):
        pytest.fail(
            f"{helm} is helm {version!r}; the chart tests pin helm {HELM_VERSION_PREFIX}x", pytrace=False
        )
    try:
        kuberay_crds_dir()
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)
    assert (CHART / "Chart.yaml").is_file() and sorted(CI_VALUES_DIR.glob("*.yaml")), (
        "chart or CI values missing"
    )
    return helm


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
