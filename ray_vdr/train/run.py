"""Finetuning on Ray Train, the driver: Ray Data streams validated triplets into workers running Sentence Transformers.

:func:`run`: preflight checks, build the validated streams, plan the steps from the input size and the global
batch, start the :class:`~ray_vdr.train.feeder.BatchFeeder` and fit a TorchTrainer whose workers run
:func:`ray_vdr.train.worker.train_loop` (imported there, not in the driver) with a recipe
(:mod:`ray_vdr.train.recipes`: the embedder, or the reranker).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_vdr.config import TrainConfig, VDRConfig
from ray_vdr.data.triplets import TripletSpec
from ray_vdr.storage import copy_tree, is_file, read_bytes, read_json_files, write_bytes, write_table
from ray_vdr.train.artifacts import FINAL_FILE
from ray_vdr.train.recipes import RECIPES

if TYPE_CHECKING:
    import ray.data

__all__ = ["TrainResult", "plan_steps", "preflight", "run", "seeded_stream", "start_feeder"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model_uri: str
    rejects_uri: str
    metrics: dict[str, Any]
    seconds: float
    eval_table: str | None = None
    rows_trained: int = 0
    rows_dropped: int = 0


def plan_steps(cfg: VDRConfig, n_rows: int | None) -> tuple[int, int, int]:
    """(planned optimizer steps, hard cap on steps, planned rows) for the run.

    An explicit ``train.max_steps`` is both the plan and the cap. Otherwise the plan is the epochs over the input
    rows at the global batch, counting the final partial batch, and the run ends when the data does: duplicate-free
    batching may make an epoch a few steps longer, so the cap is the loosest bound (one row per rank per step).
    The learning-rate schedule follows rows, not steps (see ``lr_factor``).
    """
    world = max(1, cfg.scaling.num_workers)
    global_batch = cfg.train.per_device_batch_size * world
    if cfg.train.max_steps:
        return cfg.train.max_steps, cfg.train.max_steps, cfg.train.max_steps * global_batch
    if n_rows is None:
        raise ValueError("train.max_steps is required when the number of training rows is not known up front")
    if n_rows < global_batch:
        raise ValueError(f"{n_rows} training rows are fewer than one global batch of {global_batch}")
    epochs = cfg.train.epochs or 1.0
    if float(epochs).is_integer():
        rows = int(epochs) * n_rows
        return math.ceil(rows / global_batch), math.ceil(rows / world), rows
    steps = max(1, math.floor(n_rows * epochs / global_batch))
    return steps, steps, steps * global_batch


def _train_loop(config: dict[str, Any]) -> None:
    """The workers' entry point, :func:`ray_vdr.train.worker.train_loop`, imported there: the driver only plans and
    launches the run, and need not import transformers and Sentence Transformers (~6 s of a training job's start)."""
    from ray_vdr.train.worker import train_loop

    train_loop(config)


def rejects_folder(cfg: VDRConfig) -> str:
    """Where the splits' rejected rows go (``<folder>/train``, ``<folder>/eval``)."""
    return (cfg.data.rejects_path or cfg.run.uri("rejects")).rstrip("/")


def train_stream(cfg: VDRConfig) -> ray.data.Dataset:
    """The validated train stream (lazy: the feeder runs it, epoch by epoch)."""
    from ray_vdr.data.sources import build_dataset

    if cfg.data.train is None:
        raise ValueError("data.train is not set")
    return build_dataset(cfg.data.train, TripletSpec.from_config(cfg.data, split="train"),
                         f"{rejects_folder(cfg)}/train", batch_size=cfg.data.batch_size,
                         num_cpus=cfg.data.cpus_per_task)


def preflight(cfg: VDRConfig) -> None:
    """Fail in the driver, with a clear message, on what would otherwise fail later on every worker."""

    from ray_vdr.storage import fs_path

    m = cfg.model
    if m.builder == "load":
        path = Path(m.name_or_path)
        if path.is_absolute() or m.name_or_path.startswith("."):
            if not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
                raise FileNotFoundError(f"model.name_or_path: no model at {m.name_or_path} (expected a Sentence "
                                        "Transformers folder with modules.json, or a transformers folder)")
        else:
            _check_hub_model("model.name_or_path", m.name_or_path)
    from ray_vdr.data.sources import check_source

    for split, source in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if source is not None:
            check_source(source, TripletSpec.from_config(cfg.data, split=split), f"data.{split}.uri")
    probe = cfg.run.uri(".write-probe")
    try:
        write_bytes(b"ok", probe)
        fs, path = fs_path(probe)
        fs.delete_file(path)
    except Exception as e:
        raise PermissionError(f"run.storage_path: cannot write under {cfg.run.uri()}: {e}") from None


def _check_hub_model(field: str, name: str) -> None:
    """A hub model must be in the local cache, or the Hub must answer: else one line naming it and the remedies."""
    import os

    from huggingface_hub import HfApi, try_to_load_from_cache

    from ray_vdr.data.sources import unreachable

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"{field}: {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                                "forbids downloading it: use a local path, or cache it on a machine with network")
    try:
        HfApi().model_info(name, timeout=15)
    except Exception as e:  # no network, DNS, proxy, a private or missing repository
        raise FileNotFoundError(f"{field}: {unreachable(f'the model {name!r}', e)}") from None


def seeded_stream(train_ds: ray.data.Dataset, train: TrainConfig) -> ray.data.Dataset:
    """The training stream in an order that depends on the data and ``train.seed`` only: its blocks in a seeded
    random order (with ``train.shuffle_buffer``), and the order of the blocks entering that shuffle fixed too.

    Ray Data hands blocks on in the order their tasks finish unless the dataset preserves order, so two runs with
    the same seed trained on different batches from the first step (the demo's NDCG@10 at dim 64: 0.31 and 0.36;
    docs/bench/notes/learning.md, 2026-12-04). Mutates the dataset's own DataContext (a read copies the global one).
    """
    train_ds.context.execution_options.preserve_order = True
    return train_ds.randomize_block_order(seed=train.seed) if train.shuffle_buffer else train_ds


def start_feeder(cfg: VDRConfig, train_ds, world: int, max_steps: int, n_rows: int | None):
    """The actor that turns the validated stream into global batches (see ray_vdr.train.feeder)."""
    import ray

    from ray_vdr.train.feeder import BatchFeeder

    global_batch = cfg.train.per_device_batch_size * world
    if cfg.train.max_steps and n_rows:
        epochs = math.ceil(max_steps * global_batch / n_rows)
    else:
        epochs = math.ceil(cfg.train.epochs or 1)
    image_columns = TripletSpec.from_config(cfg.data, split="train").output_columns[2:]
    actor = ray.remote(num_cpus=0, max_concurrency=world + 4)(BatchFeeder)
    return actor.remote(seeded_stream(train_ds, cfg.train), world_size=world,
                        per_device=cfg.train.per_device_batch_size, image_columns=image_columns, epochs=epochs,
                        dedup=cfg.train.duplicate_free_batches, fetch_steps=cfg.train.fetch_steps,
                        shuffle_buffer=cfg.train.shuffle_buffer, seed=cfg.train.seed)


def _completed(cfg: VDRConfig, rejects_uri: str, start: float, metrics: dict[str, Any] | None = None) -> TrainResult:
    """The result of a run whose final model is in storage (``metrics`` default to the saved ones)."""
    import pyarrow.parquet as pq

    from ray_vdr.storage import fs_path

    model_uri = cfg.run.uri("model")
    if metrics is None:
        metrics = json.loads(read_bytes(f"{model_uri}/{FINAL_FILE}"))["metrics"]
    table = read_bytes(f"{model_uri}/eval.md").decode() if is_file(f"{model_uri}/eval.md") else None
    trained = sum(r["rows"] for r in read_json_files(cfg.run.uri("ranks")))
    dropped_uri = cfg.run.uri("dropped.parquet")
    dropped = 0
    if is_file(dropped_uri):
        fs, path = fs_path(dropped_uri)
        dropped = pq.read_metadata(path, filesystem=fs).num_rows
    return TrainResult(model_uri, rejects_uri, metrics, time.time() - start, table, rows_trained=trained,
                       rows_dropped=dropped)


def _prune_orphan_checkpoints(cfg: VDRConfig, result) -> None:
    """Delete checkpoint folders Ray Train does not track: a group that fails right after a report may have
    uploaded a checkpoint the controller never registered, and nothing else would ever remove it."""
    from ray_vdr.storage import list_dirs, remove_tree

    kept = {Path(c.path).name for c, _ in (result.best_checkpoints or [])} | {Path(result.checkpoint.path).name}
    for name in list_dirs(cfg.run.uri()):
        if name.startswith("checkpoint_") and name not in kept:
            logger.info("removing checkpoint %s: uploaded by a failed worker group, never registered", name)
            remove_tree(cfg.run.uri(name))


def run(cfg: VDRConfig, *, chaos: dict[str, Any] | None = None, task: str = "embedder") -> TrainResult:
    """Train the embedder (or with ``task="reranker"`` the reranker) described by ``cfg`` on the current Ray cluster
    (started locally if there is none).

    Rerunning with the same ``run.name`` and ``run.storage_path`` resumes from the latest checkpoint (model,
    optimizer, scheduler, RNG and data position); a run whose final model is already in storage is not trained
    again. ``chaos`` ({"rank", "step", "marker"}) kills one worker once, for failure drills and tests.
    """
    import pyarrow as pa
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_vdr.cluster import init_ray
    from ray_vdr.data.sources import count_rows, eval_blocks
    from ray_vdr.models.load import ensure_model_files

    start = time.time()
    if task == "embedder" and cfg.model.kind == "multi_vector":
        task = "multi_vector"
    RECIPES[task].check(cfg)
    preflight(cfg)
    rejects_uri = rejects_folder(cfg)
    if is_file(cfg.run.uri("model", FINAL_FILE)):
        logger.warning("run %r already finished: its model is at %s (choose a new run.name to train again)",
                       cfg.run.name, cfg.run.uri("model"))
        return _completed(cfg, rejects_uri, start)
    ensure_model_files(cfg.model)  # random-weight builders run here, never inside the worker group
    init_ray()
    # the train stream is consumed by the feeder actor, which logs throughput per epoch: per-operator bars would only
    # garble the job log
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_ds, eval_split = train_stream(cfg), eval_blocks(cfg.data, f"{rejects_uri}/eval")
    n_rows = count_rows(cfg.data.train)
    max_steps, step_cap, planned_rows = plan_steps(cfg, n_rows)
    s = cfg.scaling
    world = max(1, s.num_workers)
    global_batch = cfg.train.per_device_batch_size * world
    logger.info("training %s for %d steps on %d worker(s) (global batch %d)", cfg.model.name_or_path, max_steps,
                s.num_workers, global_batch)
    feeder = start_feeder(cfg, train_ds, world, max_steps, n_rows)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "task": task, "max_steps": max_steps,
                           "step_cap": step_cap,
                           "planned_rows": planned_rows,
                           "eval_blocks": eval_split,
                           "feeder": feeder,
                           "chaos": chaos},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=s.resources_per_worker,
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
    )  # no Ray Train datasets: train rows come from the feeder, the eval split's blocks from the driver
    try:
        result = trainer.fit()
        dropped = ray.get(feeder.dropped.remote())
    finally:
        ray.kill(feeder)
    if dropped:
        write_table(pa.table({"row_id": [d[0] for d in dropped], "reason": [d[1] for d in dropped]}),
                    cfg.run.uri("dropped.parquet"))
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a model checkpoint: {result.error}")
    copy_tree(result.checkpoint.path, cfg.run.uri("model"))
    _prune_orphan_checkpoints(cfg, result)
    return _completed(cfg, rejects_uri, start, dict(result.metrics or {}))
