"""k8s/monitoring: the PodMonitor scrapes every Ray pod the manifests create, and the Grafana dashboard queries only
metrics the endpoint exports (tests/serving/test_auth.py checks the same names against a live scrape)."""

from __future__ import annotations

import pytest

from serving.metrics import EXPORTED, SERVE_METRICS
from tests.k8s.manifests import (
    USES_GPU,
    cluster_specs,
    dashboard,
    dashboard_metrics,
    dashboard_queries,
    pod_groups,
    podmonitor,
    ray_container,
    rendered,
)


def test_dashboard_queries_exported_metrics_only():
    board = dashboard()
    used = dashboard_metrics(board)
    assert used - set(EXPORTED) - set(SERVE_METRICS) == set(), "the dashboard queries metrics nothing exports"
    assert set(EXPORTED) <= used, "a metric of serving/metrics.py has no panel"
    queries = dashboard_queries(board)
    assert all(queries.values()), [t for t, q in queries.items() if not q]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"]


def test_dashboard_metric_names_are_parsed():
    """The name extraction the checks above rely on: a histogram by its family, a counter with _total."""
    board = {"panels": [{"title": "t", "targets": [{"expr": 'histogram_quantile(0.5, sum by (le) (rate('
                                                             'ray_vdr_stage_latency_ms_bucket{stage="embed"}[5m])))'},
                                                    {"expr": "sum(rate(ray_vdr_requests_total[1m]))"}]}],
             "templating": {"list": [{"type": "query", "query": "label_values(ray_vdr_batch_size_count, stage)"}]}}
    assert dashboard_metrics(board) == {"ray_vdr_stage_latency_ms", "ray_vdr_requests_total", "ray_vdr_batch_size"}


@pytest.mark.parametrize("name", sorted(USES_GPU))
def test_podmonitor_selects_every_ray_pod(name):
    monitor = podmonitor()
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    # KubeRay adds the port `metrics` (8080, where `ray start` exports) unless a container declares one itself
    assert endpoint["port"] == "metrics" and endpoint.get("path", "/metrics") == "/metrics"
    for where, spec in cluster_specs(rendered(name)):
        for group, g in pod_groups(spec):
            labels = g["template"].get("metadata", {}).get("labels", {})
            missing = {k: v for k, v in wanted.items() if labels.get(k) != v}
            assert not missing, f"{where} {group}: its pods lack {missing}: the PodMonitor would not scrape them"
            ports = {p.get("name"): p["containerPort"] for p in ray_container(g).get("ports", [])}
            assert ports.get("metrics", 8080) == 8080 and 8080 not in {v for k, v in ports.items() if k != "metrics"}
            assert g.get("rayStartParams", {}).get("metrics-export-port", "8080") == "8080", where
