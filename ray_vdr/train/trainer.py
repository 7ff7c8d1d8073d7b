"""The Sentence Transformers trainer as the workers run it: fed ready-made batches, with arguments from the config.

- :class:`StreamingTrainer` / :class:`StreamingCrossEncoderTrainer`: the embedder's and the reranker's trainers,
  whose train loader yields this rank's slice of every global batch from the feeder (ray_vdr.train.feeder). The
  batches are already this rank's share, so the loader is not prepared by accelerate (which would shard or dispatch
  it again); the trainer's own collator preprocesses the text, and the pages too unless the loss is cached (then
  each mini-batch's pages are collated inside the loss: :func:`ray_vdr.train.gradcache.defer_page_collation`).
  Under DeepSpeed a cached loss runs as gradient accumulation over its mini-batches (:mod:`ray_vdr.train.gradcache`).
- :func:`training_arguments`: the HF/ST arguments from the typed config; :func:`lr_factor`: the schedule over rows.
- :class:`ThroughputMeter`, :func:`peak_memory_bytes`: what a run reports about its speed and memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from sentence_transformers.cross_encoder import CrossEncoderTrainer
from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainer
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from ray_vdr.config import VDRConfig

__all__ = ["StreamingCrossEncoderTrainer", "StreamingMultiVectorTrainer", "StreamingTrainer", "ThroughputMeter",
           "lr_factor", "peak_memory_bytes", "steps_of", "training_arguments"]


TRAINABLE_FILE = "trainable.safetensors"  # a LoRA checkpoint's adapters (and heads), by parameter name


class _Streaming:
    """What both trainers add: batches from ``batch_stream``, and the learning rate following ``progress()``."""

    def __init__(self, *args, batch_stream: Iterable[list[dict]], progress: Callable[[], float],
                 collate_per_mini_batch: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_stream = batch_stream
        self.progress = progress
        if collate_per_mini_batch:
            from ray_vdr.train.gradcache import defer_page_collation

            defer_page_collation(self)  # a cached loss collates pages per mini-batch

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
        ray_vdr.train.gradcache), which ZeRO-2/3 support; everything else takes the trainer's own path."""
        from ray_vdr.train.gradcache import cached_loss_of, deepspeed_cached_step

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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """A LoRA run's checkpoint also holds its trainable parameters by name (the adapters, and any head outside
        the transformer): what a resume restores onto the freshly built model. DeepSpeed's own checkpoint holds
        them already."""
        super()._save(output_dir, state_dict)
        from ray_vdr.models.lora import has_lora

        if has_lora(self.model) and not self.is_deepspeed_enabled:
            from safetensors.torch import save_file

            save_file({n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
                      os.path.join(output_dir or self.args.output_dir, TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args, **kwargs) -> None:
        path = os.path.join(resume_from_checkpoint, TRAINABLE_FILE)
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)
        from safetensors.torch import load_file

        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        state = load_file(path, device=str(next(self.model.parameters()).device))
        if set(state) != trainable:
            raise ValueError(f"checkpoint {resume_from_checkpoint}: its trainable parameters do not match this "
                             f"model's (model.lora changed?): {sorted(set(state) ^ trainable)[:4]}")
        self.model.load_state_dict(state, strict=False)
        return None


class StreamingTrainer(_Streaming, SentenceTransformerTrainer):
    """The embedder's trainer, fed by the feeder."""


class StreamingCrossEncoderTrainer(_Streaming, CrossEncoderTrainer):
    """The reranker's trainer, fed by the feeder."""


class StreamingMultiVectorTrainer(_Streaming, MultiVectorEncoderTrainer):
    """The multi-vector embedder's trainer, fed by the feeder. Its cached loss embeds the collated pages itself (the
    per-mini-batch page collation is the single-vector cached loss's)."""

    def __init__(self, *args, collate_per_mini_batch: bool = True, **kwargs):
        super().__init__(*args, collate_per_mini_batch=False, **kwargs)


def _precision(cfg: VDRConfig, cuda: bool) -> tuple[bool, bool]:
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if cuda else "fp32"
    return p == "bf16", p == "fp16"


def steps_of(fraction: float | None, max_steps: int) -> int | None:
    """An interval given as a fraction of the run (train.eval_every, save_every, log_every), in steps."""
    return None if fraction is None else max(1, round(fraction * max_steps))


def lr_factor(done: float, warmup_ratio: float) -> float:
    """Linear warm-up then linear decay to 0, as a function of the fraction of the run's rows trained."""
    done = min(max(done, 0.0), 1.0)
    if warmup_ratio > 0 and done < warmup_ratio:
        return done / warmup_ratio
    return max(0.0, (1.0 - done) / (1.0 - warmup_ratio))


def training_arguments(cfg: VDRConfig, max_steps: int, output_dir: str, cuda: bool,
                       prompts: dict[str, str] | str | None, step_cap: int | None = None, args_cls=None):
    """HF/ST arguments from the typed config. ``max_steps`` is the planned length (logging, evaluation and
    checkpoint intervals follow it); ``step_cap`` (default: the plan) is where the loop stops at the latest.
    ``args_cls`` defaults to SentenceTransformerTrainingArguments (CrossEncoderTrainingArguments for rerankers)."""
    from ray_vdr.train.deepspeed import deepspeed_config

    if args_cls is None:
        from sentence_transformers.sentence_transformer.training_args import (
            SentenceTransformerTrainingArguments as args_cls,
        )

    t = cfg.train
    bf16, fp16 = _precision(cfg, cuda)
    save_steps = steps_of(t.save_every, max_steps)
    return args_cls(
        output_dir=output_dir,
        max_steps=step_cap or max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=steps_of(t.log_every, max_steps),
        # HF writes its full checkpoint (model, optimizer, scheduler, RNG, trainer state; DeepSpeed shards on every
        # rank) into a local folder, which the worker hands to Ray Train for upload to run.storage_path
        save_strategy="steps" if save_steps else "no",
        **({"save_steps": save_steps} if save_steps else {}),
        ignore_data_skip=True,  # the feeder resumes the data itself: HF must not skip batches of the stream
        report_to="none",
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,  # without it accelerate sees DistributedType.NO on CPU and each rank trains alone
        seed=t.seed,
        dataloader_num_workers=t.dataloader_workers,
        activation_checkpointing=t.gradient_checkpointing,
        ddp_find_unused_parameters=False,  # every parameter takes part in each step; the extra graph walk costs time
        # each rank reads its own Ray shard: never let rank 0 read and dispatch (it would slice pixel patches)
        accelerator_config={"dispatch_batches": False, "split_batches": False},
        deepspeed=deepspeed_config(t, bf16=bf16, fp16=fp16, cuda=cuda) if t.strategy == "deepspeed" else None,
        prompts=prompts,
        disable_tqdm=True,
    )


def peak_memory_bytes(cuda: bool) -> int:
    """This process's peak memory so far: the CUDA allocator's peak on GPU, peak resident set size on CPU."""
    import torch

    from ray_vdr.cluster import process_memory

    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return process_memory()[1]


class ThroughputMeter(TrainerCallback):
    """Rows/s from the end of the first step to the last (start-up and warm-up excluded); ``rows()`` counts the rows
    this process has trained so far."""

    def __init__(self, rows: Callable[[], int]):
        self.rows = rows
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        point = (time.perf_counter(), self.rows())
        if self.first is None:
            self.first = point
        else:
            self.last = point

    def rate(self) -> float:
        if not (self.first and self.last) or self.last[0] <= self.first[0]:
            return 0.0
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])
