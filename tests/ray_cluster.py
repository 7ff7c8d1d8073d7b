"""A private local Ray cluster for tests: it never attaches to a stray cluster on the machine, and it is shut down
when the block ends."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def local_ray(temp_dir: Path, num_cpus: int, metrics_export_port: int | None = None) -> Iterator:
    """``metrics_export_port``: where Ray's metrics agent exports Prometheus metrics, reported every second rather
    than every ten (a test scrapes them)."""
    import ray

    from ray_vdr.cluster import LOCAL_CLUSTER_ENV

    if ray.is_initialized():
        ray.shutdown()
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    metrics = {}
    if metrics_export_port is not None:
        metrics = {"_metrics_export_port": metrics_export_port}
        os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112 (Ray config: case-sensitive)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(temp_dir),
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, **metrics)
    os.environ.pop("RAY_metrics_report_interval_ms", None)  # noqa: SIM112
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()
