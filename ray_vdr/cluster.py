"""Connecting to Ray (the cluster a job was submitted to, or a private local one) and what its workers share: logging,
their device and threads, their memory readings, objects the driver puts once per run, skipping what an earlier run
did."""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

# Environment the Train and Data workers need to behave like the driver (offline hub, cached JIT extensions).
_PROPAGATED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_EXTENSIONS_DIR", "HF_HOME")


# Ray Data 2.60 lists Parquet files by reading their footers on a pool of actors that every read_parquet call starts:
# 32 by default, whatever the number of files, each a new worker process. ray-vdr's reads list at most thousands of
# part files, and one actor reads 128 footers at a time. The driver's environment decides (the reader is planned
# there); a value already set wins. On a 2-CPU node this took a make-training-data run of 23 pages from 44 s to 30 s.
DRIVER_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}
# Idle worker processes a node keeps beyond its CPUs. Ray keeps as many idle workers as the node has CPUs and stops
# the others after a second; actors count, and Ray Data runs three of its own for each driver. On a 2-CPU node every
# short Data stage (a listing, a groupby's map and reduce) then started new worker processes, ~1.5 s each: the same
# make-training-data run went from 30 s to 20 s with 4 more kept (docs/benchmarks.md).
SPARE_IDLE_WORKERS = 4


def local_cluster_env(num_cpus: int | None = None) -> dict[str, str]:
    """Environment for the raylet of a cluster on this machine with ``num_cpus`` CPUs (default: all of them).

    Ray starts worker processes at nice 15 so that its own daemons stay responsive. Train workers then lose the CPU to
    any normal-priority process, and their OpenMP threads stall each other at every barrier: on a 2-core machine the
    same training step ran 3x slower (docs/benchmarks.md). Workers here run at nice 0, and the node keeps
    ``SPARE_IDLE_WORKERS`` idle workers beyond its CPUs. Set the same variables on the nodes of `ray start` clusters
    with few CPUs."""
    cpus = num_cpus or os.cpu_count() or 1
    return {"RAY_worker_niceness": "0", "RAY_num_workers_soft_limit": str(cpus + SPARE_IDLE_WORKERS)}


def _job_env_keys() -> set[str]:
    """Environment variables the runtime env of the `ray job submit` job this driver runs in already sets (Ray
    refuses a ray.init runtime env that sets any of them again)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager for job drivers
    if not raw:
        return set()
    try:
        return set(((json.loads(raw).get("runtime_env") or {}).get("env_vars")) or {})
    except (ValueError, AttributeError):
        return set()


def init_ray(num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Attach to the cluster in RAY_ADDRESS (``ray job submit`` sets it), else start a local one for this process.

    ``address="local"`` never attaches to a stray cluster that happens to run on the machine. Sets ``DRIVER_ENV``'s
    defaults in this driver first, also when Ray is already initialised.
    """
    import ray

    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    job_keys = _job_env_keys()
    env_vars = {k: os.environ[k] for k in _PROPAGATED_ENV if k in os.environ and k not in job_keys}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if os.environ.get("RAY_ADDRESS"):
        logger.info("connecting to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(runtime_env=runtime_env, log_to_driver=True)
    else:
        logger.info("starting a local Ray cluster (num_cpus=%s)", num_cpus or "all")
        for key, value in local_cluster_env(num_cpus).items():
            os.environ.setdefault(key, value)  # read by the raylet this call starts
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
                 runtime_env=runtime_env)


def worker_logging(level: int = logging.INFO) -> None:
    """Make ``ray_vdr`` log records visible from Ray actors and workers (their root logger is not configured)."""
    lib = logging.getLogger("ray_vdr")
    lib.setLevel(level)
    if not lib.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        lib.addHandler(handler)
        lib.propagate = False


def worker_device(use_gpu: bool, num_cpus: float = 1.0) -> str:
    """The torch device of a Ray actor or task that asked for a GPU when ``use_gpu`` (CUDA if it got one), and on CPU
    as many torch threads as CPUs it reserved (Ray sets one OpenMP thread per whole CPU reserved)."""
    import math

    import torch

    if use_gpu and torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(max(1, math.ceil(num_cpus)))
    return "cpu"


_SHARED: dict[str, object] = {}


def process_memory() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process: VmRSS and VmHWM (getrusage's maximum would carry the parent's
    over a fork and exec). Writing 5 to /proc/self/clear_refs resets the peak to the current resident size."""
    try:
        with open("/proc/self/status") as fh:
            status = dict(line.split(":", 1) for line in fh if line.startswith(("VmRSS", "VmHWM")))
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):  # not Linux
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak


def fetch_once(ref, convert=None):
    """An object the driver put in the object store once per run (``ray.put``), fetched (and converted) once per
    worker process. Workers outlive runs: only the few latest objects are kept."""
    import ray

    key = ref.hex()
    if key not in _SHARED:
        while len(_SHARED) >= 4:
            _SHARED.pop(next(iter(_SHARED)))
        value = ray.get(ref)
        _SHARED[key] = convert(value) if convert is not None else value
    return _SHARED[key]


def skip_known(batch, *, column: str, known_ref: list):
    """map_batches stage (pyarrow): the rows whose ``column`` is not in the set the driver put as ``known_ref[0]`` (what
    an earlier run already did)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    known = fetch_once(known_ref[0], lambda done: pa.array(sorted(done), pa.string()))
    if not len(known):
        return batch
    return batch.filter(pc.invert(pc.is_in(batch.column(column), value_set=known)))


def chaos_strike(chaos: dict | None, batches: int, what: str) -> None:
    """Fault injection for tests and failure drills, in an actor after it published its ``batches``-th batch (result
    not yet returned): ``chaos['sleep']`` seconds of delay every batch; SIGKILL once after ``chaos['after_batches']``
    batches (``chaos['marker']`` is created first, so the restarted actor does not fire again)."""
    import time
    from pathlib import Path

    chaos = chaos or {}
    if chaos.get("sleep"):
        time.sleep(chaos["sleep"])
    after, marker = chaos.get("after_batches"), chaos.get("marker")
    if after and batches >= after and marker and not os.path.exists(marker):
        Path(marker).write_text(f"killed {what} pid {os.getpid()} after {batches} batches")
        logger.warning("chaos: killing the %s actor after %d batches", what, batches)
        os.kill(os.getpid(), 9)
