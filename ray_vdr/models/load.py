"""The one builder every job uses to get a Sentence Transformers model from a :class:`ModelConfig`."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ray_vdr.config import ModelConfig

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' = bfloat16 on a CUDA device that supports it, else float32 (CPU kernels are fastest in fp32)."""
    import torch

    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_attn_implementation(name: str, device: str) -> str:
    """'auto' = flash_attention_2 when flash_attn imports and the device is CUDA, else PyTorch sdpa."""
    if name != "auto":
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise RuntimeError(
                "model.attn_implementation=flash_attention_2 but flash_attn is not installed; "
                "install the 'gpu' extra or set model.attn_implementation=auto (falls back to sdpa)"
            )
        return name
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def ensure_model_files(cfg: ModelConfig) -> str:
    """Build a random-weight model into ``cfg.name_or_path`` when the config asks for one and it is missing."""
    if cfg.builder == "load":
        return cfg.name_or_path
    path = Path(cfg.name_or_path)
    if (path / "modules.json").is_file():
        return str(path)
    import torch.distributed as dist
    from filelock import FileLock

    from ray_vdr.models import builders

    if dist.is_available() and dist.is_initialized():
        # transformers writes checkpoint files on rank 0 only, so a build inside a worker group is half-written
        raise RuntimeError(f"model {path} does not exist yet; build it before starting workers "
                           "(`ray-vdr build-model`, or ray_vdr.train.run, which builds it in the driver)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # several processes on one machine may race to build it
        if (path / "modules.json").is_file():
            return str(path)
        _build(cfg, path, builders)
    return str(path)


def _build(cfg: ModelConfig, path: Path, builders) -> None:
    """Build into a temporary sibling, then rename: a crash never leaves a half-written model behind."""
    logger.info("building a %s model with random weights at %s", cfg.builder, path)
    tmp = path.with_name(f".{path.name}.building-{os.getpid()}")
    pixels = {k: v for k, v in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels)) if v}
    if cfg.builder == "tiny-qwen3vl":
        builders.build_qwen3vl_embedder(tmp, **pixels)
    elif cfg.builder in ("qwen3vl-2b-shape", "qwen3vl-8b-shape"):
        shape = builders.QWEN3VL_2B_SHAPE if cfg.builder == "qwen3vl-2b-shape" else builders.QWEN3VL_8B_SHAPE
        builders.build_qwen3vl_embedder(tmp, shape, dtype="bfloat16", **pixels)
    elif cfg.builder == "tiny-clip":
        builders.build_tiny_clip(tmp)
    elif cfg.builder == "tiny-qwen3vl-reranker":
        builders.build_qwen3vl_reranker(tmp, head=cfg.head, **pixels)
    elif cfg.builder == "qwen3vl-2b-reranker-shape":
        builders.build_qwen3vl_reranker(tmp, builders.QWEN3VL_2B_SHAPE, head=cfg.head, dtype="bfloat16", **pixels)
    elif cfg.builder == "reranker-from-vlm":
        from ray_vdr.index import _local_model

        if not cfg.base_model:
            raise ValueError("model.builder 'reranker-from-vlm' needs model.base_model (the VLM to build on)")
        builders.wrap_reranker(_local_model(cfg.base_model), tmp, head=cfg.head)
    else:  # pragma: no cover - guarded by the config Literal
        raise ValueError(cfg.builder)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def set_pixel_bounds(model: SentenceTransformer, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound image tokens on Qwen-VL style processors (size = {shortest_edge: min_pixels, longest_edge: max_pixels})."""
    if min_pixels is None and max_pixels is None:
        return
    processor = getattr(model[0], "processor", None)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or not hasattr(image_processor, "merge_size"):
        raise ValueError(
            "model.min_pixels/max_pixels apply to Qwen-VL style processors only; "
            f"{type(image_processor).__name__} has no pixel budget"
        )
    size = dict(image_processor.size or {})
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    image_processor.size = size


def build_model(cfg: ModelConfig, device: str | None = None, *, reranker: bool = False):
    """Load (or build, then load) the model described by ``cfg`` on ``device``: a SentenceTransformer embedder, or
    with ``reranker`` a CrossEncoder."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from ray_vdr.models.processor import install_image_only_processor

    if cfg.builds_reranker != reranker and cfg.builder != "load":
        kind = "a reranker" if cfg.builds_reranker else "an embedder"
        raise ValueError(f"model.builder {cfg.builder!r} builds {kind}; this job needs "
                         f"{'a reranker' if reranker else 'an embedder'}")
    install_image_only_processor()
    device = device or default_device()
    path = ensure_model_files(cfg)
    model_kwargs = {
        "dtype": resolve_dtype(cfg.dtype, device),
        "attn_implementation": resolve_attn_implementation(cfg.attn_implementation, device),
    }
    logger.info("loading %s on %s (%s, %s)", path, device, model_kwargs["dtype"], model_kwargs["attn_implementation"])
    cls = CrossEncoder if reranker else SentenceTransformer
    model = cls(path, device=device, model_kwargs=model_kwargs, trust_remote_code=cfg.trust_remote_code)
    set_pixel_bounds(model, cfg.min_pixels, cfg.max_pixels)
    if reranker:
        if cfg.max_seq_length is not None:
            model.max_seq_length = cfg.max_seq_length
        return model
    if cfg.query_prompt is not None:
        model.prompts["query"] = cfg.query_prompt
    if cfg.document_prompt is not None:
        model.prompts["document"] = cfg.document_prompt
    if cfg.max_seq_length is not None:
        model.max_seq_length = cfg.max_seq_length
    return model
