"""Private local Ray clusters for tests: they never attach to a stray cluster on the machine. ``local_ray`` is shut
down when its block ends; ``SharedCluster`` serves consecutive test modules with one cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# Ray's metrics pipeline, reported every second rather than every ten (Ray's config names are case-sensitive)
METRICS_ON_ENV = {"RAY_enable_open_telemetry": "1", "RAY_enable_metrics_collection": "1",
                  "RAY_metrics_report_interval_ms": "1000"}


def start_local_ray(temp_dir: Path, num_cpus: int, metrics_export_port: int | None = None,
                    resources: dict[str, float] | None = None):
    """Start a fresh local cluster (shutting down the one this process is attached to, if any); returns ``ray``.
    ``metrics_export_port``: where Ray's metrics agent exports Prometheus metrics, reported every second rather
    than every ten (a test scrapes them); ``resources``: the node's custom resources."""
    import ray

    from ray_vdr.cluster import local_cluster_env

    if ray.is_initialized():
        ray.shutdown()
    for key, value in local_cluster_env(num_cpus).items():
        os.environ.setdefault(key, value)
    metrics, saved = {}, {}
    if metrics_export_port is not None:  # the suite turns Ray's metrics off (tests/conftest.py); on for this cluster
        metrics = {"_metrics_export_port": metrics_export_port}
        for key, value in METRICS_ON_ENV.items():
            saved[key] = os.environ.get(key)
            os.environ[key] = value
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(temp_dir),
                 resources=resources, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, **metrics)
    finally:  # the raylet and its workers keep what they inherited; later clusters get the suite's defaults
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@contextlib.contextmanager
def local_ray(temp_dir: Path, num_cpus: int, metrics_export_port: int | None = None,
              resources: dict[str, float] | None = None) -> Iterator:
    """A fresh local cluster for the block (start_local_ray's arguments)."""
    ray = start_local_ray(temp_dir, num_cpus, metrics_export_port, resources)
    try:
        yield ray
    finally:
        ray.shutdown()


class SharedCluster:
    """One local cluster for consecutive test modules that ask for the same CPUs: each start and stop costs ~6 s
    here, and its idle workers stay warm. A module that needs a cluster of its own (the serving package's) replaces
    it; the next module to ask starts a new one. Only a cluster this object started is ever shut down by it."""

    def __init__(self, new_temp_dir):
        self._new_temp_dir = new_temp_dir
        self._address: str | None = None
        self._cpus: int | None = None

    def _attached(self) -> bool:
        import ray

        return (self._address is not None and ray.is_initialized()
                and ray.get_runtime_context().gcs_address == self._address)

    def get(self, num_cpus: int):
        """The shared cluster with ``num_cpus`` logical CPUs, started if there is none (or it has other CPUs)."""
        import ray

        if self._attached() and self._cpus == num_cpus:
            return ray
        self.close()
        start_local_ray(self._new_temp_dir(), num_cpus)
        self._address, self._cpus = ray.get_runtime_context().gcs_address, num_cpus
        return ray

    def close(self) -> None:
        import ray

        if self._attached():
            ray.shutdown()
        self._address = self._cpus = None


def stop_ray_start(proc) -> None:
    """Stop a ``ray start --block`` process this test started (in its own session), by its PID: SIGTERM stops the
    processes it started, and only those; SIGKILL to its process group if it hangs (never anything by name)."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
