"""The DeepSpeed JSON for the Hugging Face Trainer integration, generated from the typed training config."""

from __future__ import annotations

from typing import Any

from ray_vdr.config import TrainConfig

__all__ = ["REDUCE_BUCKET_ELEMENTS", "deepspeed_config"]

REDUCE_BUCKET_ELEMENTS = 50_000_000


def deepspeed_config(train: TrainConfig, *, bf16: bool, fp16: bool = False, cuda: bool = True) -> dict[str, Any]:
    """DeepSpeed JSON for the HF Trainer integration, generated from the typed config.

    Batch sizes, lr and scheduler are "auto" so the Trainer fills them from its own arguments: there is one
    source of truth (TrainConfig) and no way for the two to disagree.
    """
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 2:
        # ZeRO-2/3 reduce gradients after every engine backward: with the cached loss that is once per mini-batch
        # (192 times a step in the reference recipe), so reduce in few large buckets (50 M elements: 200 MB in fp32)
        # rather than "auto" (hidden_size², ~500 buckets for a 2B model). Overlapping the reduction with the backward
        # and copying gradients into one contiguous buffer pay off on GPUs (CUDA streams, less fragmentation); on CPU
        # they only add copies: ZeRO-2 steps took 1.6x as long as ZeRO-1's on gloo with them, 0.99x without them
        # (docs/benchmarks.md).
        zero.update(overlap_comm=cuda, contiguous_gradients=cuda, reduce_bucket_size=REDUCE_BUCKET_ELEMENTS)
    if train.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # bf16 weights, fp32 gradient accumulation: the cached loss adds one backward per mini-batch (192 at batch 64,
        # mini-batch 1, 3 columns), too many to sum in bf16. ZeRO-1 then runs DeepSpeed's BF16_Optimizer.
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "fp16": {"enabled": fp16},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
