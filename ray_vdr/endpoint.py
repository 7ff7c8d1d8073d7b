"""Deploying the retrieval endpoint on Ray Serve from ray-vdr (the CLI, the demo, tests) and waiting until it answers.

The application is the one a Serve config names: ``serve.application`` is its builder's import path
(``serving.app:build_app``, as in serving/config.yaml and the RayService), resolved here like ``serve run`` does. The
library never imports the app (``serving/`` builds on ``ray_vdr``, not the other way round).
"""

from __future__ import annotations

import importlib
import logging
import time

from ray_vdr.client import EndpointClient
from ray_vdr.config import ServeConfig

__all__ = ["deploy", "endpoint_url"]

logger = logging.getLogger(__name__)


def endpoint_url(cfg: ServeConfig) -> str:
    """The URL the endpoint answers at on this machine."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/"


def deploy(cfg: ServeConfig, *, ready_timeout_s: float = 600.0) -> str:
    """Deploy on the Ray cluster in RAY_ADDRESS (or a new local one), wait until ``/healthz`` says ready, and return
    the endpoint's URL. Raises TimeoutError with the last health report if it never gets ready, RuntimeError as soon
    as a stage failed to load."""
    from ray import serve

    from ray_vdr.cluster import init_ray

    module, _, name = cfg.application.partition(":")
    build_app = getattr(importlib.import_module(module), name)
    init_ray()
    fit = _fit(cfg)
    if fit:
        logger.warning("%s: the endpoint can only start where the cluster grows (an autoscaler)", fit)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    url = endpoint_url(cfg)
    client = EndpointClient(url, timeout=10)
    deadline, last = time.time() + ready_timeout_s, "no answer"
    while time.time() < deadline:
        try:
            status, report = client.health()
        except OSError as e:
            last = str(e)
        else:
            if status == 200:
                return url  # every stage loaded
            last = report.detail or f"HTTP {status}"
            if any(s.state == "failed" for s in report.stages.values()):
                raise RuntimeError(f"the endpoint failed to load: {last}")
        time.sleep(1.0)
    raise TimeoutError(f"the endpoint at {url} was not ready after {ready_timeout_s:.0f}s: {last}"
                       + (f"; {fit}" if fit else ""))


def _fit(cfg: ServeConfig) -> str | None:
    """Why the deployments' replicas do not fit the cluster as it is (its CPUs now), or None when they do."""
    import ray

    from ray_vdr.corpus.store import read_manifest

    deployments = {"embedder": cfg.embedder, "retriever": cfg.retriever, "ingress": cfg.ingress}
    if cfg.reranker is not None:
        deployments["rerank"] = cfg.rerank
    manifest = read_manifest(cfg.index) if cfg.index else None
    shards = cfg.retriever.shards or (manifest.shard_count if manifest is not None else 1)  # a Retriever group each
    need = sum(d.min_replicas * d.num_cpus * (shards if n == "retriever" else 1) for n, d in deployments.items())
    have = float(ray.cluster_resources().get("CPU", 0.0))
    if need <= have + 1e-9:
        return None
    parts = ", ".join(f"serve.{n}: {d.min_replicas} x {d.num_cpus}" for n, d in deployments.items())
    parts += f"; the retriever once per each of {shards} index shards" if shards > 1 else ""
    return f"the deployments need {need:g} CPUs at min_replicas ({parts}); the cluster has {have:g}"
