"""What ray_vdr.cluster sets for the drivers and the local clusters it starts (the reasons: ray_vdr/cluster.py)."""

from __future__ import annotations

import os

import ray

from ray_vdr.cluster import DRIVER_ENV, SPARE_IDLE_WORKERS, init_ray, local_cluster_env


def test_drivers_read_parquet_footers_with_one_actor_unless_told_otherwise(monkeypatch):
    """Every driver defaults Ray Data's footer-reading pool to one actor (Ray's default starts 32 for each read), also
    when Ray is already initialised (here: said to be, so that no cluster starts); a value the user set wins."""
    key = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.delenv(key, raising=False)
    init_ray()
    assert DRIVER_ENV[key] == os.environ[key] == "1"
    monkeypatch.setenv(key, "8")
    init_ray()
    assert os.environ[key] == "8"


def test_local_clusters_keep_idle_workers_beyond_their_cpus():
    assert local_cluster_env(2) == {"RAY_worker_niceness": "0",
                                    "RAY_num_workers_soft_limit": str(2 + SPARE_IDLE_WORKERS)}
    assert local_cluster_env()["RAY_num_workers_soft_limit"] == str((os.cpu_count() or 1) + SPARE_IDLE_WORKERS)
