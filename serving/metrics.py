"""The endpoint's Prometheus metrics, through Ray Serve's metrics API (``ray.serve.metrics``, which adds the
application, deployment and replica tags) and exported by Ray's metrics agent on every node
(``ray start --metrics-export-port``; KubeRay's port ``metrics``, 8080). Ray prefixes custom metric names with
``ray_``, so what a scrape shows is :data:`EXPORTED`.

Ours, next to Ray Serve's own (requests, latency, ongoing and queued requests per deployment and proxy, listed in
:data:`SERVE_METRICS`):

- ``ray_vdr_requests_total{route, status}``: every answer of the ingress, 401/403/413/503 included;
- ``ray_vdr_stage_latency_ms{route, stage}``: embed, search, rerank and total of a request, as its ``timings``;
- ``ray_vdr_batch_size{stage}``: the requests each batched model call took (embed, search, rerank);
- ``ray_vdr_unavailable_total{reason}``: 503s, by why (``not_ready``, ``over_capacity``); the proxy's own 503s
  (the ingress queue full) are Serve's ``ray_serve_num_http_error_requests_total{error_code="503"}``;
- ``ray_vdr_generation_live{generation}`` (1 for the live one; a replaced one stops being recorded, and Ray's
  metrics agent drops it),
  ``ray_vdr_index_vectors``, ``ray_vdr_index_live_pages`` and ``ray_vdr_index_age_seconds`` (since the live index
  version was published).

Ray (2.60) exports a histogram's ``_sum`` at its buckets' midpoints: quantiles and counts are exact, means are not.
``serve.metrics: false`` turns ours off (the bench compares); with it on, a metric costs a few microseconds.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

__all__ = ["EXPORTED", "SERVE_METRICS", "EndpointMetrics", "quiet_health_probes", "route_label"]

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128]

# what a Prometheus scrape shows (Ray adds "ray_"; counters get "_total", histograms "_bucket", "_sum", "_count")
EXPORTED = ("ray_vdr_requests_total", "ray_vdr_stage_latency_ms", "ray_vdr_batch_size", "ray_vdr_unavailable_total",
            "ray_vdr_generation_live", "ray_vdr_index_vectors", "ray_vdr_index_live_pages", "ray_vdr_index_age_seconds")
# Ray Serve's own that the dashboard (k8s/monitoring) uses
SERVE_METRICS = ("ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms",
                 "ray_serve_num_http_error_requests_total", "ray_serve_num_ongoing_http_requests",
                 "ray_serve_deployment_queued_queries", "ray_serve_replica_processing_queries",
                 "ray_serve_deployment_processing_latency_ms")


def route_label(request_scope: dict[str, Any]) -> str:
    """The route template a request matched (``/pages/{doc_id:path}``), never its raw path: one series per route,
    not per page; ``other`` for a path no route matched."""
    route = request_scope.get("route")
    return getattr(route, "path", None) or "other"


class EndpointMetrics:
    """The metrics one replica records; every method is a no-op when ``enabled`` is false."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from ray.serve.metrics import Counter, Gauge, Histogram

        self._requests = Counter("vdr_requests", description="Answers of the retrieval endpoint, by route and status.",
                                 tag_keys=("route", "status"))
        self._latency = Histogram("vdr_stage_latency_ms", description="Time of each stage of a request (embed, "
                                  "search, rerank) and in all (total), in milliseconds.", boundaries=LATENCY_MS,
                                  tag_keys=("route", "stage"))
        self._batch = Histogram("vdr_batch_size", description="Requests in each batch a stage formed.",
                                boundaries=BATCH, tag_keys=("stage",))
        self._unavailable = Counter("vdr_unavailable", description="503 answers of the ingress, by reason.",
                                    tag_keys=("reason",))
        self._live = Gauge("vdr_generation_live", description="1 for the generation served first.",
                           tag_keys=("generation",))
        self._vectors = Gauge("vdr_index_vectors", description="Vectors in the live generation's index (removed "
                              "pages included until a compaction).")
        self._live_pages = Gauge("vdr_index_live_pages", description="Pages a search of the live generation can "
                                 "return.")
        self._age = Gauge("vdr_index_age_seconds", description="Seconds since the live index version was published.")

    def request(self, route: str, status: int) -> None:
        if self.enabled:
            self._requests.inc(tags={"route": route, "status": str(status)})

    def stages(self, route: str, ms: dict[str, float]) -> None:
        """One observation per stage, e.g. ``{"embed": 3.1, "search": 0.4, "total": 3.9}``."""
        if self.enabled:
            for stage, value in ms.items():
                self._latency.observe(value, tags={"route": route, "stage": stage})

    def batch(self, stage: str, size: int) -> None:
        if self.enabled:
            self._batch.observe(size, tags={"stage": stage})

    def unavailable(self, reason: str) -> None:
        if self.enabled:
            self._unavailable.inc(tags={"reason": reason})

    def generation(self, gid: str, vectors: int, live_pages: int, updated_at: str | None) -> None:
        """The generation served first now, its index's vectors, live pages and publication time (ISO 8601)."""
        if not self.enabled:
            return
        self._live.set(1, tags={"generation": gid})
        self._vectors.set(vectors)
        self._live_pages.set(live_pages)
        if updated_at:
            published = datetime.fromisoformat(updated_at.replace("Z", "+00:00")).timestamp()
            self._age.set(max(0.0, time.time() - published))


def _not_a_health_probe(record) -> bool:
    """False for Ray Serve's access-log line of a health probe: ``GET /healthz`` at the ingress, and the ``status``
    calls it makes to each stage. Every other request keeps its line, with its x-request-id."""
    if not getattr(record, "serve_access_log", False):
        return True
    return not (str(getattr(record, "route", "") or "").endswith("/healthz")
                or str(record.getMessage()).startswith("CALL status "))


def quiet_health_probes() -> None:
    """Keep health probes out of this replica's access log (Ray Serve logs every request, probes included)."""
    serve_logger = logging.getLogger("ray.serve")
    if _not_a_health_probe not in serve_logger.filters:
        serve_logger.addFilter(_not_a_health_probe)
