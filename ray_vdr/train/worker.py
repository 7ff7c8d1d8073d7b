"""The training loop every Ray Train worker runs: build the recipe's model and loss, take this rank's slice of every
global batch from the feeder, train with the streaming trainer, evaluate on rank 0, checkpoint, save.

Read :func:`train_loop` top to bottom; the callbacks below it hand the trainer's logs and checkpoints to Ray Train,
and the state files record the data position a resume continues from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.collective
import torch
from transformers import TrainerCallback

from ray_vdr.config import VDRConfig
from ray_vdr.data.sources import blocks_table
from ray_vdr.data.triplets import TripletSpec
from ray_vdr.storage import write_bytes, write_table
from ray_vdr.train.artifacts import FINAL_FILE, HISTORY_FILE, STATE_FILE
from ray_vdr.train.feeder import HISTORY_SCHEMA
from ray_vdr.train.recipes import RECIPES, Evaluation
from ray_vdr.train.slices import SliceStream, history_table
from ray_vdr.train.trainer import ThroughputMeter, lr_factor, peak_memory_bytes, steps_of, training_arguments

__all__ = ["read_state", "train_loop"]

logger = logging.getLogger(__name__)



def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: fresh, after a worker-group restart, or in a rerun of the same run name."""
    from ray_vdr.cluster import worker_logging

    worker_logging()
    cfg = VDRConfig.model_validate(config["cfg"])
    recipe = RECIPES[config.get("task", "embedder")]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    checkpoint = ray.train.get_checkpoint()

    with contextlib.ExitStack() as stack:
        resume_dir = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None
        if resume_dir is not None and (resume_dir / FINAL_FILE).is_file():
            # the run had already finished (the driver stopped before collecting it): hand the artifact back
            metrics = json.loads((resume_dir / FINAL_FILE).read_text())["metrics"]
            ray.train.report(metrics, checkpoint=checkpoint if rank == 0 else None)
            return
        position, base = read_state(resume_dir) if resume_dir else (None, None)

        # 1. the model, the data stream and the loss
        cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
        _one_process_without_ddp(cfg, world, cuda)
        model = recipe.build(cfg, f"cuda:{ctx.get_local_rank()}" if cuda else "cpu")
        image_cols = TripletSpec.from_config(cfg.data, split="train").output_columns[2:]
        # every rank (re)starts the feeder with this group's token: the first call rewinds it to the checkpoint
        feeder = config["feeder"]
        token = ray.train.collective.broadcast_from_rank_zero(uuid.uuid4().hex)
        start_step = ray.get(feeder.start.remote(token, position))
        stream = SliceStream(lambda r, s, n: ray.get(feeder.get.remote(r, s, n)), rank, image_cols,
                             start_step=start_step, transform=recipe.transform,
                             fetch_steps=cfg.train.fetch_steps)
        rows_before = len(position["history"]["row_id"]) if position else 0
        loss = recipe.loss(model, cfg, world)

        # 2. evaluation on rank 0 only (the other ranks wait for it at their next collective), or on every rank when
        # ZeRO-3 shards the weights (every forward is then collective)
        evaluation = None
        if (rank == 0 or _sharded_weights(cfg)) and config.get("eval_blocks"):
            evaluation = recipe.evaluation(blocks_table(config["eval_blocks"]), model, cfg)
        if evaluation and base is None:
            base = _evaluate(model, evaluation, "base (before training)", log=rank == 0)

        # 3. the trainer and its callbacks
        meter = ThroughputMeter(lambda: stream.rows)
        callbacks = [ReportMetrics(), ReportCheckpoints(rank, feeder, base), meter]
        eval_steps = steps_of(cfg.train.eval_every, config["max_steps"])
        if evaluation and eval_steps and eval_steps < config["max_steps"]:
            callbacks.append(EvaluateEvery(model, evaluation, eval_steps, config["max_steps"], log=rank == 0))
        if config.get("chaos"):
            callbacks.append(KillOnce(config["chaos"], rank))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        args = training_arguments(cfg, config["max_steps"], tmp, cuda, recipe.prompts(model, image_cols),
                                  config["step_cap"], recipe.args_cls())
        planned_rows = config["planned_rows"]
        trainer = recipe.trainer()(
            model=model, args=args, train_dataset=recipe.schema(image_cols), loss=loss, callbacks=callbacks,
            batch_stream=stream, collate_per_mini_batch=cfg.train.collate_per_mini_batch,
            progress=lambda: lr_factor((rows_before + stream.rows * world) / planned_rows, cfg.train.warmup_ratio))
        if rank == 0:
            logger.info("distributed type %s, world size %d%s", trainer.accelerator.distributed_type, world,
                        f", resuming from step {start_step}" if resume_dir else "")

        # 4. train
        result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
        peak_memory = peak_memory_bytes(cuda)  # training's peak, before evaluation and the full-weight gather

        # 5. the audit trail per rank: the rows it trained in the whole run, a weight checksum (equal on all ranks when
        # data parallelism works) and the optimizer's own step count (continues across resumes)
        history = history_table(position, stream.trained, rank)
        write_table(history, cfg.run.uri("row_ids", f"rank-{rank:04d}.parquet"))
        after = _evaluate(model, evaluation, "finetuned", log=rank == 0) if evaluation else None
        stack.enter_context(_full_weights(model, cfg))  # whole weights for the checksum and the save
        checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
        write_bytes(json.dumps({"rank": rank, "rows": history.num_rows, "steps": trainer.state.global_step,
                                "resumed_from_step": start_step, "optimizer_steps": _optimizer_steps(trainer.optimizer),
                                "param_checksum": checksum, "peak_memory_bytes": peak_memory}).encode(),
                   cfg.run.uri("ranks", f"rank-{rank:04d}.json"))
        seconds = float(result.metrics.get("train_runtime", 0.0))
        metrics = {"train_loss": result.training_loss, "step": trainer.state.global_step,
                   "resumed_from_step": start_step,
                   "distributed_type": str(trainer.accelerator.distributed_type), "world_size": world,
                   "train_seconds": seconds, "torch_threads": torch.get_num_threads(),
                   "rows_per_second": stream.rows * world / seconds if seconds else 0.0,
                   "steady_rows_per_second": meter.rate() * world,
                   "peak_memory_bytes": peak_memory,  # rank 0's; every rank's is in <run>/ranks/
                   "last_grad_norm": next((float(h["grad_norm"]) for h in reversed(trainer.state.log_history)
                                           if "grad_norm" in h), None)}

        # 6. save (rank 0) and report the final artifact
        checkpoint = None
        if rank != 0 and _sharded_weights(cfg):
            # saving runs a forward (the model card's usage example), and under ZeRO-3 every forward is collective:
            # the other ranks save a throwaway copy in step with rank 0
            _before_save(recipe, model, cfg, None)
            model.save(str(Path(tmp) / "discard"))
        if rank == 0:
            out = Path(tmp) / "model"
            if cfg.train.strategy == "deepspeed" and not _sharded_weights(cfg):
                # ZeRO-1/2 leave parameters as views into its flat buffers; modules saved with safetensors directly
                # (a reranker's Dense head) refuse tensors that do not own their storage
                for p in model.parameters():
                    p.data = p.data.clone()
            if evaluation:
                metrics.update(evaluation.summary(base, after))
            _before_save(recipe, model, cfg, out)
            model.save(str(out))
            if evaluation:
                evaluation.write_reports(out, base, after)
            (out / FINAL_FILE).write_text(json.dumps({"metrics": metrics, "config": config["cfg"]}, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(str(out))
        ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


def _evaluate(model, evaluation: Evaluation, label: str, log: bool) -> dict:
    was_training = model.training
    model.eval()
    results = evaluation.measure()
    model.train(was_training)
    if log:
        logger.info("%s on the eval split, %s:\n%s", evaluation.what, label, evaluation.table(results))
    return results


class EvaluateEvery(TrainerCallback):
    """Evaluate every ``every`` steps before the last (the last step is followed by the final evaluation)."""

    def __init__(self, model, evaluation: Evaluation, every: int, planned_steps: int, log: bool):
        self.model, self.evaluation, self.log = model, evaluation, log
        self.every, self.planned_steps = every, planned_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < self.planned_steps:
            _evaluate(self.model, self.evaluation, f"step {state.global_step}", self.log)


# ---------------------------------------------------------------------------------------------------------------------
# reporting to Ray Train


class ReportMetrics(TrainerCallback):
    """Forward the trainer's logs to Ray (every rank logs at the same steps, so report stays a barrier)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            ray.train.report({**logs, "step": state.global_step})


class ReportCheckpoints(TrainerCallback):
    """Hand each HF checkpoint to Ray Train, which merges the ranks' folders in run.storage_path and keeps the latest
    run.keep_checkpoints. Rank 0 adds the data position, so a resume skips the rows trained."""

    def __init__(self, rank: int, feeder, base_eval: dict | None):
        self.rank, self.feeder, self.base_eval = rank, feeder, base_eval

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            _write_state(folder, ray.get(self.feeder.position.remote(state.global_step)), self.base_eval)
        ray.train.report({"step": state.global_step, "checkpoint_step": state.global_step},
                         checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         delete_local_checkpoint_after_upload=True)


class KillOnce(TrainerCallback):
    """Fault injection for tests and failure drills: SIGKILL this worker after step ``chaos["step"]`` on rank
    ``chaos["rank"]``, once (``chaos["marker"]`` is created first, so the restarted worker does not fire again)."""

    def __init__(self, chaos: dict[str, Any], rank: int):
        self.chaos, self.rank = chaos, rank

    def on_step_end(self, args, state, control, **kwargs):
        marker = Path(self.chaos["marker"])
        if self.rank == self.chaos["rank"] and state.global_step == self.chaos["step"] and not marker.exists():
            marker.write_text(f"killed rank {self.rank} after step {state.global_step}")
            logger.warning("chaos: killing rank %d after step %d", self.rank, state.global_step)
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint state and weights


def _write_state(folder: Path, position: dict[str, Any], base: dict | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(position["history"], schema=HISTORY_SCHEMA), folder / HISTORY_FILE)
    state = {"step": position["step"], "epoch": position["epoch"], "dropped": position["dropped"], "base_eval": base}
    (folder / STATE_FILE).write_text(json.dumps(state))


def read_state(folder: Path) -> tuple[dict[str, Any], dict | None]:
    """(data position, base evaluation) stored in an intermediate checkpoint by :func:`train_loop`."""
    import pyarrow.parquet as pq

    state = json.loads((folder / STATE_FILE).read_text())
    position = {"step": state["step"], "epoch": state["epoch"], "dropped": state["dropped"],
                "history": pq.read_table(folder / HISTORY_FILE).to_pydict()}
    base = state["base_eval"]
    if base and all(d.isdigit() for d in base):  # the embedder's results are by dimension
        base = {int(d): r for d, r in base.items()}
    return position, base


def _optimizer_steps(optimizer) -> int | None:
    """The step count in the optimizer's own state (Adam's ``step``): continues across a resume, or restarts at 0
    when the optimizer state was not restored."""
    states = getattr(optimizer, "state", {}).values()
    steps = [int(st["step"]) for st in states if isinstance(st, dict) and "step" in st]
    return max(steps) if steps else None


def _one_process_without_ddp(cfg: VDRConfig, world: int, cuda: bool) -> None:
    """A world of one CPU worker trains without DDP. Ray Train sets LOCAL_RANK and forms a gloo process group even
    for one worker, and accelerate then wraps a CPU model in DistributedDataParallel whatever the number of processes
    (on GPU it does not at one process): an all-reduce with nobody and a bucket copy every step, ~25% of a step here.
    Without LOCAL_RANK, accelerate sees a single process. DeepSpeed keeps it (it runs its engine on the group)."""
    if world == 1 and not cuda and cfg.train.strategy != "deepspeed":
        os.environ.pop("LOCAL_RANK", None)


def _before_save(recipe, model, cfg: VDRConfig, out: Path | None) -> None:
    """What every rank does before the final save, in step: a LoRA run's adapters written alone (``out/adapter``,
    rank 0) and merged into the weights (the saved model is a plain one), then the recipe's own step."""
    from ray_vdr.models.lora import has_lora, merge_lora, save_adapter

    if has_lora(model):
        if out is not None:
            save_adapter(model, out / "adapter", cfg.model.lora)
        merge_lora(model)
    recipe.before_save(model, cfg)


def _sharded_weights(cfg: VDRConfig) -> bool:
    return cfg.train.strategy == "deepspeed" and cfg.train.zero_stage == 3


def _full_weights(model, cfg: VDRConfig):
    """Context in which every rank sees the whole weights (ZeRO-3 gathers its shards; collective), else a no-op."""
    if not _sharded_weights(cfg):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
