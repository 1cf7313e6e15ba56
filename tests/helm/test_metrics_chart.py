"""The chart's metrics pieces: the PodMonitor scrapes the app's /metrics (head pod only, HTTPS when
TLS is on) beside Ray's port, and the Grafana dashboard ConfigMap carries the sidecar's label and a
dashboard whose every query names a metric the app exports (cluster/metrics/names.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from helmkit import CHART, CI_VALUES_DIR, of_kind, only, run_helm, template_args, validate_object
from shardserve.cluster.metrics.names import SPECS, Kind

METRIC = re.compile(r"shardserve:[a-zA-Z0-9_:]+")
ON = ("--set", "metrics.podMonitor.enabled=true", "--set", "metrics.grafanaDashboard.enabled=true")


def rendered(*extra: str, values_file: Path | None = None) -> list[dict[str, Any]]:
    result = run_helm(*template_args((values_file,) if values_file else (), extra))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def exported_names() -> set[str]:
    """Every series name the app's /metrics can carry (histograms' and counters' suffixes included)."""
    names = {"shardserve:num_replicas"}
    for spec in SPECS:
        if spec.kind == Kind.HISTOGRAM:
            names |= {spec.full_name + suffix for suffix in ("_bucket", "_sum", "_count")}
        elif spec.kind == Kind.COUNTER:
            names.add(spec.full_name + "_total")
        else:
            names.add(spec.full_name)
    return names


def test_pod_monitor_scrapes_the_app_on_the_head_pod() -> None:
    objects = rendered(*ON)
    assert not [e for obj in objects for e in validate_object(obj)]
    endpoints = {e["port"]: e for e in only(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"metrics", "serve"}
    app = endpoints["serve"]
    assert app["path"] == "/metrics" and "scheme" not in app
    keep = [r for r in app["relabelings"] if r.get("action") == "keep"]
    assert keep == [{"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"], "regex": "head",
                     "action": "keep"}]  # fmt: skip
    off = rendered(*ON, "--set", "metrics.podMonitor.scrapeApp=false")
    assert [e["port"] for e in only(off, "PodMonitor")["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_pod_monitor_uses_https_when_tls_is_on() -> None:
    tls_config = ("--set", "metrics.podMonitor.appTlsConfig.insecureSkipVerify=true")
    objects = rendered(*ON, *tls_config, values_file=CI_VALUES_DIR / "cpu-tls-keys.yaml")
    app = {e["port"]: e for e in only(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]}["serve"]
    assert app["scheme"] == "https" and app["tlsConfig"] == {"insecureSkipVerify": True}
    assert not validate_object(only(objects, "PodMonitor"))


def test_dashboard_config_map_queries_only_exported_metrics() -> None:
    assert not of_kind(rendered(), "ConfigMap"), "the dashboard is off by default"
    objects = rendered(*ON, "--set", "metrics.grafanaDashboard.labels.team=llm")
    config_map = only(objects, "ConfigMap")
    assert not validate_object(config_map)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["team"] == "llm"
    dashboard = json.loads(config_map["data"]["shardserve.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "shardserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used and not used - exported_names(), f"dashboard queries unknown metrics: {used - exported_names()}"
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("time to first token", "inter-token", "throughput", "queue", "kv cache", "cost"):
        assert topic in titles, topic
