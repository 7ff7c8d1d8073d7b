"""Finetuning on Ray Train: Ray Data streams validated triplets into workers running Sentence Transformers.

Driver side (:func:`run`): preflight checks, build the validated streams, plan the steps from the input size and
the global batch, start the :class:`~ray_vdr.feeder.BatchFeeder` and fit a TorchTrainer. Worker side
(:func:`train_loop`): build the model with the project's builder, take this rank's slice of every global batch
from the feeder, and train with the Sentence Transformers trainer and its own collator; rank 0 evaluates.

The same machinery (streaming, checkpoints and resume, DeepSpeed, the audit trail) trains both models; a
:class:`Task` holds what differs: the embedder (SentenceTransformer, (Cached)MNRL in MatryoshkaLoss, retrieval
evaluation) and the reranker (CrossEncoder, BinaryCrossEntropyLoss over (query, page, 1/0) pairs made from each
triplet, CrossEncoderRerankingEvaluator).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_vdr.config import TrainConfig, VDRConfig, deepspeed_config
from ray_vdr.data.triplets import TripletSpec
from ray_vdr.storage import copy_tree, is_file, read_bytes, read_json_files, write_bytes, write_table

if TYPE_CHECKING:
    import ray.data
    from sentence_transformers import SentenceTransformer

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


# ---------------------------------------------------------------------------------------------------------------------
# Pieces the worker assembles (plain functions: testable without Ray)


def build_loss(model: SentenceTransformer, train: TrainConfig, *, gather: bool):
    """(Cached)MultipleNegativesRankingLoss, optionally inside MatryoshkaLoss. In-batch negatives span all ranks."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    if train.loss == "cached_mnrl":
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=train.mini_batch_size,
                                                  gather_across_devices=gather)
    else:
        loss = MultipleNegativesRankingLoss(model, gather_across_devices=gather)
    if train.matryoshka_dims:
        dim = model.get_embedding_dimension()
        if dim is not None and train.matryoshka_dims[0] > dim:
            raise ValueError(f"train.matryoshka_dims starts at {train.matryoshka_dims[0]} but the model outputs {dim}")
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=train.matryoshka_dims)
    return loss


def column_schema(image_columns: list[str]):
    """A `datasets.IterableDataset` that only declares the columns: ST reads names and prompts from it, while the
    batches themselves come from the feeder (see :func:`streaming_trainer_cls`)."""
    import datasets

    features = datasets.Features({"query": datasets.Value("string"), **{c: datasets.Image() for c in image_columns}})

    def nothing():
        yield from ()

    return datasets.IterableDataset.from_generator(nothing, features=features)


def streaming_trainer_cls(base=None):
    """``base`` (default SentenceTransformerTrainer; CrossEncoderTrainer for rerankers) whose train loader yields
    the feeder's ready-made per-device batches.

    The batches are already this rank's share of a global batch, so the loader is not prepared by accelerate
    (which would shard or dispatch it again); ST's collator still does all the preprocessing.
    """
    from torch.utils.data import DataLoader

    if base is None:
        from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer as base

    class StreamingTrainer(base):
        def __init__(self, *args, batch_stream, progress, **kwargs):
            super().__init__(*args, **kwargs)
            self.batch_stream = batch_stream
            self.progress = progress

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            """Linear warm-up and decay over the *rows* of the run, not its steps: duplicate-free batching can make
            an epoch a few steps longer than planned, and the schedule must still end as the data does."""
            from torch.optim.lr_scheduler import LambdaLR

            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda _: self.progress())
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def training_step(self, model, inputs, num_items_in_batch=None):
            """Under DeepSpeed, a cached loss runs as gradient accumulation over its mini-batches (see
            ray_vdr.gradcache), which ZeRO-2/3 support; everything else takes the trainer's own path."""
            from ray_vdr.gradcache import cached_loss_of, deepspeed_cached_step

            cached = cached_loss_of(self.loss) if self.is_deepspeed_enabled else None
            if cached is None:
                return super().training_step(model, inputs, num_items_in_batch)
            model.train()
            inputs = self._prepare_inputs(inputs)
            inputs.pop("dataset_name", None)
            features, labels = self.collect_features(inputs)
            if model is self.model_wrapped and self.loss.model is not model:
                self.override_model_in_loss(self.loss, model)  # forwards must go through the engine
            gas = self.current_gradient_accumulation_steps
            sync = self.accelerator.sync_gradients
            with self.compute_loss_context_manager():
                loss = deepspeed_cached_step(model, cached, features, labels, boundary=sync, scale=1.0 / gas)
            if sync:
                model.step()  # what accelerate's DeepSpeed backward does at a boundary (optimizer and scheduler)
            return loss / gas

        def get_train_dataloader(self) -> DataLoader:
            return DataLoader(self.batch_stream, batch_size=None, collate_fn=self.data_collator,
                              num_workers=0, pin_memory=self.args.dataloader_pin_memory)

    return StreamingTrainer


def _precision(cfg: VDRConfig, cuda: bool) -> tuple[bool, bool]:
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if cuda else "fp32"
    return p == "bf16", p == "fp16"


def _steps(fraction: float | None, max_steps: int) -> int | None:
    return None if fraction is None else max(1, round(fraction * max_steps))


def lr_factor(done: float, warmup_ratio: float) -> float:
    """Linear warm-up then linear decay to 0, as a function of the fraction of the run's rows trained."""
    done = min(max(done, 0.0), 1.0)
    if warmup_ratio > 0 and done < warmup_ratio:
        return done / warmup_ratio
    return max(0.0, (1.0 - done) / (1.0 - warmup_ratio))


def training_arguments(cfg: VDRConfig, max_steps: int, output_dir: str, cuda: bool, prompts: dict[str, str] | str | None,
                       step_cap: int | None = None, args_cls=None):
    """HF/ST arguments from the typed config. ``max_steps`` is the planned length (logging, evaluation and
    checkpoint intervals follow it); ``step_cap`` (default: the plan) is where the loop stops at the latest.
    ``args_cls`` defaults to SentenceTransformerTrainingArguments (CrossEncoderTrainingArguments for rerankers)."""
    if args_cls is None:
        from sentence_transformers.sentence_transformer.training_args import (
            SentenceTransformerTrainingArguments as args_cls,
        )

    t = cfg.train
    bf16, fp16 = _precision(cfg, cuda)
    save_steps = _steps(t.save_every, max_steps)
    return args_cls(
        output_dir=output_dir,
        max_steps=step_cap or max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=_steps(t.log_every, max_steps),
        # HF writes its full checkpoint (model, optimizer, scheduler, RNG, trainer state; DeepSpeed shards on every
        # rank) into a local folder, which _ReportCheckpoints hands to Ray Train for upload to run.storage_path
        save_strategy="steps" if save_steps else "no",
        **({"save_steps": save_steps} if save_steps else {}),
        ignore_data_skip=True,  # the feeder resumes the data itself: HF must not skip batches of the stream
        report_to="none",
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,  # without it accelerate sees DistributedType.NO on CPU and each rank trains alone
        seed=t.seed,
        dataloader_num_workers=t.dataloader_workers,
        **{_checkpointing_field(args_cls): t.gradient_checkpointing},
        ddp_find_unused_parameters=False,  # every parameter takes part in each step; the extra graph walk costs time
        # each rank reads its own Ray shard: never let rank 0 read and dispatch (it would slice pixel patches)
        accelerator_config={"dispatch_batches": False, "split_batches": False},
        deepspeed=deepspeed_config(t, bf16=bf16, fp16=fp16, cuda=cuda) if t.strategy == "deepspeed" else None,
        prompts=prompts,
        disable_tqdm=True,
    )


def _checkpointing_field(args_cls) -> str:
    """transformers 5.x renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name warns)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def peak_memory_bytes(cuda: bool) -> int:
    """This process's peak memory so far: the CUDA allocator's peak on GPU, peak resident set size on CPU."""
    import resource

    import torch

    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def throughput_meter(rows):
    """A callback measuring rows/s from the end of the first step to the last (start-up and warm-up excluded);
    ``rows()`` counts the rows this process has trained so far."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        first: tuple[float, int] | None = None
        last: tuple[float, int] | None = None

        def on_step_end(self, args, state, control, **kwargs):
            point = (time.perf_counter(), rows())
            if self.first is None:
                self.first = point
            else:
                self.last = point

        def rate(self) -> float:
            if not (self.first and self.last) or self.last[0] <= self.first[0]:
                return 0.0
            return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])

    return Meter()


# ---------------------------------------------------------------------------------------------------------------------
# Worker


class _Evaluator:
    """Evaluation before training, every eval_every, and after training. It runs on rank 0, or on every rank under
    ZeRO-3 (each rank holds a shard of the weights, so every forward is collective); only the ``log`` rank writes
    the tables. Subclasses say what is measured."""

    def __init__(self, model, log: bool = True):
        self.model = model
        self.log = log

    def measure(self) -> dict:
        raise NotImplementedError

    def table(self, results: dict) -> str:
        raise NotImplementedError

    def run(self, label: str) -> dict:
        was_training = self.model.training
        self.model.eval()
        results = self.measure()
        self.model.train(was_training)
        if self.log:
            logger.info("%s on the eval split, %s:\n%s", self.what, label, self.table(results))
        return results

    def periodic(self, every: int, planned_steps: int):
        from transformers import TrainerCallback

        outer = self

        class EvalEvery(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % every == 0 and state.global_step < planned_steps:
                    outer.run(f"step {state.global_step}")

        return EvalEvery()


class _RetrievalEvaluator(_Evaluator):
    """The embedder: InformationRetrievalEvaluator over the eval split's pages at every Matryoshka dim."""

    what = "retrieval"

    def __init__(self, model, eval_set, dims: list[int], batch_size: int, log: bool = True):
        from ray_vdr.evaluate import MatryoshkaRetrievalEvaluator

        super().__init__(model, log)
        self.eval_set = eval_set
        self.dims = dims
        self.evaluator = MatryoshkaRetrievalEvaluator(eval_set, dims, batch_size=batch_size)

    def measure(self) -> dict[int, dict]:
        self.evaluator(self.model)
        return dict(self.evaluator.results)

    def table(self, results: dict) -> str:
        from ray_vdr.evaluate import markdown_table

        return markdown_table(results)

    def summary(self, before: dict[int, dict], after: dict[int, dict]) -> dict[str, float]:
        d = self.dims[0]
        return {"eval_dim": d, "ndcg@10_base": before[d]["ndcg@10"], "ndcg@10": after[d]["ndcg@10"],
                "mrr@10": after[d]["mrr@10"], "recall@10": after[d]["recall@10"]}

    def write_reports(self, out: Path, before: dict, after: dict) -> None:
        from ray_vdr.evaluate import write_reports

        write_reports(out, before, after, {"eval_queries": len(self.eval_set.queries),
                                           "eval_corpus": len(self.eval_set.corpus)})


class _RerankEvaluator(_Evaluator):
    """The reranker: CrossEncoderRerankingEvaluator ranking each eval query's positive among its hard negatives."""

    what = "reranking"

    def __init__(self, model, samples: list[dict], batch_size: int, log: bool = True):
        from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

        super().__init__(model, log)
        self.samples = samples
        self.evaluator = CrossEncoderRerankingEvaluator(samples, at_k=10, batch_size=batch_size, name="vdr",
                                                        write_csv=False)

    def measure(self) -> dict[str, float]:
        metrics = self.evaluator(self.model)
        return {m: float(metrics[f"vdr_{m}"]) for m in ("ndcg@10", "mrr@10", "map")}

    def table(self, results: dict) -> str:
        return "| ndcg@10 | mrr@10 | map |\n|---|---|---|\n" + " | ".join(
            f"{results[m]:.4f}" for m in ("ndcg@10", "mrr@10", "map")).join(("| ", " |"))

    def summary(self, before: dict, after: dict) -> dict[str, float]:
        return {"ndcg@10_base": before["ndcg@10"], "ndcg@10": after["ndcg@10"], "mrr@10": after["mrr@10"],
                "map": after["map"]}

    def write_reports(self, out: Path, before: dict, after: dict) -> None:
        rows = [f"| {m} | {before[m]:.4f} | {after[m]:.4f} | {after[m] - before[m]:+.4f} |"
                for m in ("ndcg@10", "mrr@10", "map")]
        table = "\n".join(["| metric | base | finetuned | Δ |", "|---|---|---|---|", *rows])
        (out / "eval.md").write_text(table + "\n")
        (out / "eval.json").write_text(json.dumps({"base": before, "finetuned": after,
                                                   "eval_queries": len(self.samples)}, indent=2))


def _eval_table(eval_shard):
    """The whole (unsplit) eval stream as one table: small by design (N queries, 5N pages)."""
    import pyarrow as pa

    return pa.concat_tables(list(eval_shard.iter_batches(batch_size=256, batch_format="pyarrow")))


class Task:
    """What training an embedder needs that training a reranker does not, and the other way round."""

    name = "embedder"

    def check(self, cfg: VDRConfig) -> None:
        if cfg.train.loss == "bce":
            raise ValueError("train.loss 'bce' trains rerankers (jobs/train_reranker.py), not the embedder")

    def build(self, cfg: VDRConfig, device: str):
        from ray_vdr.models.load import build_model

        return build_model(cfg.model, device=device)

    def loss(self, model, cfg: VDRConfig, world: int):
        return build_loss(model, cfg.train, gather=world > 1)

    def trainer_base(self):
        return None  # SentenceTransformerTrainer

    def args_cls(self):
        return None  # SentenceTransformerTrainingArguments

    def schema(self, image_columns: list[str]):
        return column_schema(image_columns)

    def transform(self):
        return None  # the collator takes the rows as they are

    def prompts(self, model, image_columns: list[str]) -> dict[str, str] | str | None:
        doc_prompt = model.prompts.get("document")
        prompts = {"query": model.prompts.get("query")} | {c: doc_prompt for c in image_columns}
        return {k: v for k, v in prompts.items() if v}

    def evaluator(self, eval_shard, model, cfg: VDRConfig, log: bool) -> _Evaluator:
        from ray_vdr.evaluate import eval_dims, eval_set_from_table

        dims = eval_dims(model.get_embedding_dimension(), cfg.train.matryoshka_dims)
        return _RetrievalEvaluator(model, eval_set_from_table(_eval_table(eval_shard)), dims,
                                   batch_size=min(16, cfg.train.per_device_batch_size), log=log)

    def before_save(self, model, cfg: VDRConfig) -> None:
        model.truncate_dim = cfg.output.truncate_dim


def rerank_pairs(rows: list[dict]) -> list[dict]:
    """A reranker's training features from triplet rows: (query, positive, 1) and (query, negative_i, 0) each."""
    pairs = []
    for r in rows:
        pairs.append({"query": r["query"], "document": r["image"], "label": 1.0})
        pairs.extend({"query": r["query"], "document": r[c], "label": 0.0} for c in r if c.startswith("negative_"))
    return pairs


def rerank_samples(table) -> list[dict]:
    """CrossEncoderRerankingEvaluator samples from validated eval rows: each query, its positive, its negatives."""
    import io

    from PIL import Image

    def img(data: bytes):
        return Image.open(io.BytesIO(data)).convert("RGB")

    negs = sorted(c for c in table.column_names if c.startswith("negative_"))
    return [{"query": r["query"], "positive": [img(r["image"])], "negative": [img(r[c]) for c in negs]}
            for r in table.to_pylist()]


class RerankerTask(Task):
    name = "reranker"

    def check(self, cfg: VDRConfig) -> None:
        if cfg.train.loss != "bce":
            raise ValueError(f"a reranker trains with train.loss 'bce', not {cfg.train.loss!r}")

    def build(self, cfg: VDRConfig, device: str):
        from ray_vdr.models.load import build_model

        return build_model(cfg.model, device=device, reranker=True)

    def loss(self, model, cfg: VDRConfig, world: int):
        from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

        return BinaryCrossEntropyLoss(model)

    def trainer_base(self):
        from sentence_transformers.cross_encoder import CrossEncoderTrainer

        return CrossEncoderTrainer

    def args_cls(self):
        from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

        return CrossEncoderTrainingArguments

    def schema(self, image_columns: list[str]):
        """An empty map-style dataset declaring the pair columns (CrossEncoderTrainer refuses iterable ones; the
        batches come from the feeder)."""
        import datasets

        features = datasets.Features({"query": datasets.Value("string"), "document": datasets.Image(),
                                      "label": datasets.Value("float32")})
        return datasets.Dataset.from_dict({"query": [], "document": [], "label": []}, features=features)

    def transform(self):
        return rerank_pairs

    def prompts(self, model, image_columns: list[str]) -> str | None:
        """The model's default prompt (the judge instruction): training must see pairs as predict() renders them."""
        name = model.default_prompt_name
        return model.prompts.get(name) or None if name else None

    def evaluator(self, eval_shard, model, cfg: VDRConfig, log: bool) -> _Evaluator:
        return _RerankEvaluator(model, rerank_samples(_eval_table(eval_shard)),
                                batch_size=min(16, cfg.train.per_device_batch_size), log=log)

    def before_save(self, model, cfg: VDRConfig) -> None:
        pass


TASKS: dict[str, Task] = {"embedder": Task(), "reranker": RerankerTask()}


def _sharded_weights(cfg: VDRConfig) -> bool:
    return cfg.train.strategy == "deepspeed" and cfg.train.zero_stage == 3


def _full_weights(model, cfg: VDRConfig):
    """Context in which every rank sees the whole weights (ZeRO-3 gathers its shards; collective), else a no-op."""
    import contextlib

    if not _sharded_weights(cfg):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


STATE_FILE = "ray_vdr_state.json"  # data position and base evaluation, in every intermediate checkpoint
HISTORY_FILE = "ray_vdr_rows.parquet"  # rows trained before the checkpoint (row_id, epoch, step, rank)
FINAL_FILE = "ray_vdr_train.json"  # marks the final artifact (metrics and config)


def _write_state(folder: Path, position: dict[str, Any], base: dict[int, dict] | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_vdr.feeder import HISTORY_SCHEMA

    pq.write_table(pa.table(position["history"], schema=HISTORY_SCHEMA), folder / HISTORY_FILE)
    state = {"step": position["step"], "epoch": position["epoch"], "dropped": position["dropped"], "base_eval": base}
    (folder / STATE_FILE).write_text(json.dumps(state))


def read_state(folder: Path) -> tuple[dict[str, Any], dict[int, dict] | None]:
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
    steps = [int(st["step"]) for st in getattr(optimizer, "state", {}).values() if isinstance(st, dict) and "step" in st]
    return max(steps) if steps else None


def _chaos_callback(chaos: dict[str, Any], rank: int):
    """Fault injection for tests and failure drills: SIGKILL this worker after step ``chaos["step"]`` on rank
    ``chaos["rank"]``, once (``chaos["marker"]`` is created first, so the restarted worker does not fire again)."""
    import os
    import signal

    from transformers import TrainerCallback

    class KillOnce(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marker = Path(chaos["marker"])
            if rank == chaos["rank"] and state.global_step == chaos["step"] and not marker.exists():
                marker.write_text(f"killed rank {rank} after step {state.global_step}")
                logger.warning("chaos: killing rank %d after step %d", rank, state.global_step)
                os.kill(os.getpid(), signal.SIGKILL)

    return KillOnce()


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: fresh, after a worker-group restart, or in a rerun of the same run name."""
    import contextlib
    import uuid

    import ray
    import ray.train
    import ray.train.collective
    import torch
    from transformers import TrainerCallback

    from ray_vdr.cluster import worker_logging
    from ray_vdr.feeder import SliceStream, history_table

    worker_logging()
    cfg = VDRConfig.model_validate(config["cfg"])
    task = TASKS[config.get("task", "embedder")]
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

        cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
        device = f"cuda:{ctx.get_local_rank()}" if cuda else "cpu"
        model = task.build(cfg, device)
        spec = TripletSpec.from_config(cfg.data, split="train")
        image_cols = spec.output_columns[2:]
        # every rank (re)starts the feeder with this group's token: the first call rewinds it to the checkpoint
        feeder = config["feeder"]
        token = ray.train.collective.broadcast_from_rank_zero(uuid.uuid4().hex)
        start_step = ray.get(feeder.start.remote(token, position))
        stream = SliceStream(lambda r, s: ray.get(feeder.get.remote(r, s)), rank, image_cols, start_step=start_step,
                             transform=task.transform())
        rows_before = len(position["history"]["row_id"]) if position else 0
        planned_rows = config["planned_rows"]
        loss = task.loss(model, cfg, world)
        prompts = task.prompts(model, image_cols)

        class ReportMetrics(TrainerCallback):
            """Forward the trainer's logs to Ray (every rank logs at the same steps, so report stays a barrier)."""

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    ray.train.report({**logs, "step": state.global_step})

        class ReportCheckpoints(TrainerCallback):
            """Hand each HF checkpoint to Ray Train, which merges the ranks' folders in run.storage_path and keeps
            the latest run.keep_checkpoints. Rank 0 adds the data position, so a resume skips the rows trained."""

            def on_save(self, args, state, control, **kwargs):
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                folder.mkdir(parents=True, exist_ok=True)
                if rank == 0:
                    _write_state(folder, ray.get(feeder.position.remote(state.global_step)), base)
                ray.train.report({"step": state.global_step, "checkpoint_step": state.global_step},
                                 checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                                 delete_local_checkpoint_after_upload=True)

        # Evaluation runs on rank 0 only (the other ranks wait for it at their next collective), or on every rank
        # when ZeRO-3 shards the weights.
        evaluator = None
        if (rank == 0 or _sharded_weights(cfg)) and config.get("has_eval"):
            evaluator = task.evaluator(ray.train.get_dataset_shard("eval"), model, cfg, log=rank == 0)
        if evaluator and base is None:
            base = evaluator.run("base (before training)")
        meter = throughput_meter(lambda: stream.rows)
        callbacks = [ReportMetrics(), ReportCheckpoints(), meter]
        eval_steps = _steps(cfg.train.eval_every, config["max_steps"])
        if evaluator and eval_steps and eval_steps < config["max_steps"]:
            callbacks.append(evaluator.periodic(eval_steps, config["max_steps"]))
        if config.get("chaos"):
            callbacks.append(_chaos_callback(config["chaos"], rank))

        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        args = training_arguments(cfg, config["max_steps"], tmp, cuda, prompts, config["step_cap"], task.args_cls())
        trainer = streaming_trainer_cls(task.trainer_base())(model=model, args=args,
                                          train_dataset=task.schema(image_cols),
                                          loss=loss, callbacks=callbacks, batch_stream=stream,
                                          progress=lambda: lr_factor((rows_before + stream.rows * world) / planned_rows,
                                                                     cfg.train.warmup_ratio))
        if rank == 0:
            logger.info("distributed type %s, world size %d%s", trainer.accelerator.distributed_type, world,
                        f", resuming from step {start_step}" if resume_dir else "")
        result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
        peak_memory = peak_memory_bytes(cuda)  # training's peak, before evaluation and the full-weight gather
        # an audit trail per rank: the rows it trained in the whole run, and a weight checksum (equal on all ranks
        # when data parallelism works) and the optimizer's own step count (continues across resumes)
        history = history_table(position, stream.trained, rank)
        write_table(history, cfg.run.uri("row_ids", f"rank-{rank:04d}.parquet"))
        after = evaluator.run("finetuned") if evaluator else None
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
        checkpoint = None
        if rank != 0 and _sharded_weights(cfg):
            # saving runs a forward (the model card's usage example), and under ZeRO-3 every forward is collective:
            # the other ranks save a throwaway copy in step with rank 0
            task.before_save(model, cfg)
            model.save(str(Path(tmp) / "discard"))
        if rank == 0:
            out = Path(tmp) / "model"
            if cfg.train.strategy == "deepspeed" and not _sharded_weights(cfg):
                # ZeRO-1/2 leave parameters as views into its flat buffers; modules saved with safetensors directly
                # (a reranker's Dense head) refuse tensors that do not own their storage
                for p in model.parameters():
                    p.data = p.data.clone()
            if evaluator:
                metrics.update(evaluator.summary(base, after))
            task.before_save(model, cfg)
            model.save(str(out))
            if evaluator:
                evaluator.write_reports(out, base, after)
            (out / FINAL_FILE).write_text(json.dumps({"metrics": metrics, "config": config["cfg"]}, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(str(out))
        ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------------------------------
# Driver


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


def build_datasets(cfg: VDRConfig) -> tuple[dict[str, ray.data.Dataset], str]:
    """The validated train (and eval) streams, and the folder their rejects go to."""
    from ray_vdr.data.dataset import build_dataset

    if cfg.data.train is None:
        raise ValueError("data.train is not set")
    rejects_uri = (cfg.data.rejects_path or cfg.run.uri("rejects")).rstrip("/")
    datasets = {}
    for split, source in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if source is not None:
            spec = TripletSpec.from_config(cfg.data, split=split)
            datasets[split] = build_dataset(source, spec, f"{rejects_uri}/{split}", batch_size=cfg.data.batch_size,
                                           num_cpus=cfg.data.cpus_per_task)
    return datasets, rejects_uri


def preflight(cfg: VDRConfig) -> None:
    """Fail in the driver, with a clear message, on what would otherwise fail later on every worker."""
    import os

    from ray_vdr.storage import fs_path

    m = cfg.model
    if m.builder == "load":
        path = Path(m.name_or_path)
        if path.is_absolute() or m.name_or_path.startswith("."):
            if not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
                raise FileNotFoundError(f"model.name_or_path: no model at {m.name_or_path} (expected a Sentence "
                                        "Transformers folder with modules.json, or a transformers folder)")
        elif os.environ.get("HF_HUB_OFFLINE") == "1":
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(m.name_or_path, "config.json"), str):
                raise FileNotFoundError(f"model.name_or_path: {m.name_or_path!r} is not in the local Hugging Face "
                                        "cache and HF_HUB_OFFLINE=1 forbids downloading it")
    probe = cfg.run.uri(".write-probe")
    try:
        write_bytes(b"ok", probe)
        fs, path = fs_path(probe)
        fs.delete_file(path)
    except Exception as e:
        raise PermissionError(f"run.storage_path: cannot write under {cfg.run.uri()}: {e}") from None


def _start_feeder(cfg: VDRConfig, train_ds, world: int, max_steps: int, n_rows: int | None):
    """The actor that turns the validated stream into global batches (see ray_vdr.feeder)."""
    import ray

    from ray_vdr.feeder import BatchFeeder

    global_batch = cfg.train.per_device_batch_size * world
    if cfg.train.max_steps and n_rows:
        epochs = math.ceil(max_steps * global_batch / n_rows)
    else:
        epochs = math.ceil(cfg.train.epochs or 1)
    image_columns = TripletSpec.from_config(cfg.data, split="train").output_columns[2:]
    actor = ray.remote(num_cpus=0, max_concurrency=world + 4)(BatchFeeder)
    if cfg.train.shuffle_buffer:
        train_ds = train_ds.randomize_block_order(seed=cfg.train.seed)
    return actor.remote(train_ds, world_size=world, per_device=cfg.train.per_device_batch_size,
                        image_columns=image_columns, epochs=epochs, dedup=cfg.train.duplicate_free_batches,
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
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_vdr.cluster import init_ray
    from ray_vdr.data.dataset import count_rows
    from ray_vdr.models.load import ensure_model_files

    start = time.time()
    TASKS[task].check(cfg)
    preflight(cfg)
    rejects_uri = (cfg.data.rejects_path or cfg.run.uri("rejects")).rstrip("/")
    if is_file(cfg.run.uri("model", FINAL_FILE)):
        logger.warning("run %r already finished: its model is at %s (choose a new run.name to train again)",
                       cfg.run.name, cfg.run.uri("model"))
        return _completed(cfg, rejects_uri, start)
    ensure_model_files(cfg.model)  # random-weight builders run here, never inside the worker group
    init_ray()
    # the streams are consumed by the feeder actor and the workers; their per-operator bars would only garble the
    # job log (the feeder logs throughput per epoch instead)
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets, rejects_uri = build_datasets(cfg)
    n_rows = count_rows(cfg.data.train)
    max_steps, step_cap, planned_rows = plan_steps(cfg, n_rows)
    s = cfg.scaling
    world = max(1, s.num_workers)
    global_batch = cfg.train.per_device_batch_size * world
    logger.info("training %s for %d steps on %d worker(s) (global batch %d)", cfg.model.name_or_path, max_steps,
                s.num_workers, global_batch)
    feeder = _start_feeder(cfg, datasets.pop("train"), world, max_steps, n_rows)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "task": task, "max_steps": max_steps,
                           "step_cap": step_cap,
                           "planned_rows": planned_rows,
                           "has_eval": "eval" in datasets,
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
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # train rows come from the feeder; eval is read whole
    )
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
