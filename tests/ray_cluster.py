"""A private local Ray cluster for tests: it never attaches to a stray cluster on the machine, and it is shut down
when the block ends."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def local_ray(temp_dir: Path, num_cpus: int) -> Iterator:
    import ray

    from ray_vdr.cluster import LOCAL_CLUSTER_ENV

    if ray.is_initialized():
        ray.shutdown()
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(temp_dir),
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()
