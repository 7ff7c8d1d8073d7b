"""LoRA adapters (PEFT) on a Sentence Transformers embedder or CrossEncoder: added, listed, saved alone, merged.

Adapters go into the model's transformer with PEFT's ``inject_adapter_in_model`` (transformers' own PEFT
integration, behind Sentence Transformers' ``add_adapter``, wants a newer PEFT than the package index holds), and
the transformer's own weights stop training; modules outside it (a reranker's Dense head) keep training.
Before the final save every rank merges them into the weights (scale alpha / rank) and unloads them, so
the saved model is a plain model that the index, mining and serving load as any other; ``save_adapter`` writes the
adapters alone first (``adapter_config.json``, ``adapter_model.safetensors``: load them on the base model with
``model.load_adapter``). Initialisation is seeded, so every rank, and a single-process reference, starts equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ray_vdr.config import LoraConfig

__all__ = ["add_lora", "has_lora", "lora_parameters", "merge_lora", "save_adapter"]


ADAPTER = "default"


def _peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha or 2 * lora.rank, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), bias="none")


def add_lora(model, lora: LoraConfig, seed: int) -> None:
    """Add one LoRA adapter (``default``) to the model's transformer, initialised from ``seed``; the transformer's
    own weights stop training."""
    config = _peft_config(lora)
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model.transformers_model, ADAPTER)
    for name, p in model.transformers_model.named_parameters():
        p.requires_grad_("lora_" in name)
    if not lora_parameters(model):
        raise ValueError(f"model.lora.target_modules {lora.target_modules} match no linear layer of the model")


def has_lora(model) -> bool:
    return bool(lora_parameters(model))


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The adapters' parameters by name."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def save_adapter(model, folder: str | Path, lora: LoraConfig) -> None:
    """The adapters alone, in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``), while they are
    still attached."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    hf = model.transformers_model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _peft_config(lora)
    config.base_model_name_or_path = getattr(hf, "name_or_path", None)
    config.save_pretrained(str(folder))
    state = get_peft_model_state_dict(hf, adapter_name=ADAPTER)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))


def merge_lora(model) -> None:
    """Fold every adapter into its layer's weight and put the plain layer back: the model saves and loads as one
    without adapters (no ``peft`` needed to serve it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    hf = model.transformers_model
    for name, module in list(hf.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent) if parent else hf, child, module.get_base_layer())
