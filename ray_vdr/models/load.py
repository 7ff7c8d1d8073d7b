"""The one model loader: a Sentence Transformers model from a :class:`ModelConfig`, and the embedder an index was
built with from its binding (path, prompts, pixel bounds), so every job encodes as the index did.

- :func:`build_model`: load (or build, then load) what a config describes; every job goes through it.
- :func:`embedder_binding` / :func:`load_embedder`: how an index encodes (:mod:`ray_vdr.models.binding`). The
  embedding job stores the binding in the index manifest; every encoder loads the embedder from a binding
  (:class:`ray_vdr.models.encoder.IndexEncoder`), with a :class:`Runtime` (dtype, attention, device).
- :func:`local_model`, :func:`model_fingerprint`, :func:`model_signature`: where a model's files are, and its identity
  (a full hash once, at index build; a cheap signature at load).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_vdr.config import ModelConfig
from ray_vdr.models.binding import EmbedderBinding, PixelBounds

if TYPE_CHECKING:
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from ray_vdr.config import VDRConfig

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
        if not cfg.base_model:
            raise ValueError("model.builder 'reranker-from-vlm' needs model.base_model (the VLM to build on)")
        builders.wrap_reranker(local_model(cfg.base_model), tmp, head=cfg.head)
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
    """Load (or build, then load) the model described by ``cfg`` on ``device``: a SentenceTransformer embedder (a
    MultiVectorEncoder with ``model.kind: multi_vector``, ray_vdr.models.multivector), or with ``reranker`` a
    CrossEncoder."""
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
    if cfg.kind == "multi_vector":
        if reranker:
            raise ValueError("model.kind 'multi_vector' is for embedders; a reranker scores (query, page) pairs")
        from ray_vdr.models.multivector import build_multi_vector

        model = build_multi_vector(path, device, model_kwargs, token_dim=cfg.token_dim,
                                   trust_remote_code=cfg.trust_remote_code)
    else:
        from ray_vdr.models.multivector import is_multi_vector

        if is_multi_vector(path):
            raise ValueError(f"{cfg.name_or_path} is a multi-vector model (MultiVectorEncoder): set model.kind "
                             "'multi_vector' to load it")
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


# ---------------------------------------------------------------------------------------------------------------------
# Where a model's files are, and what identifies them


def local_model(uri: str) -> str:
    """A local folder with the model: a folder as it is; s3://, gs:// copied once into the temp dir; a hub id resolved
    by huggingface_hub (its cache, or a download unless HF_HUB_OFFLINE=1)."""
    from ray_vdr.storage import copy_tree

    if "://" in uri:
        dest = Path(tempfile.gettempdir()) / "ray-vdr-models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
        if not (dest / "modules.json").is_file():
            copy_tree(uri, str(dest))
        return str(dest)
    if Path(uri).is_dir():
        return uri
    from huggingface_hub import snapshot_download

    return snapshot_download(uri)


def _model_files(root: Path) -> list[Path]:
    """The files that make a model (the model card carries dates and metrics, not weights; hidden files are locks)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "README.md")


def model_fingerprint(path: str | Path) -> str:
    """sha256 over every file of a model folder (relative names and contents): equal iff the folders are equal.

    Reads the whole model (a 2B model in ~5 s): computed once, when an index is built, and stored in its manifest;
    loaders compare the cheap :func:`model_signature` instead.
    """
    root = Path(path)
    h = hashlib.sha256()
    for f in _model_files(root):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


SIGNATURE_SMALL_FILE = 1 << 20
SIGNATURE_SAMPLES = 8
SIGNATURE_BLOCK = 1 << 16


def model_signature(uri: str | Path) -> str:
    """A cheap identity of a model folder, for checks at load time: every file's name and size, the whole of every
    file up to 1 MiB (configs, prompts, processor settings) and 8 blocks of 64 KiB spread over each larger file.

    It reads well under 1 MiB per weight file, however large, and reads a remote folder (``s3://``, ``gs://``) in
    place rather than copying it. Two trainings of one architecture differ in every sampled block, so a model swapped
    under an index's path is caught at load without hashing the weights again; :func:`model_fingerprint`, stored with
    the index, is the full identity.
    """
    import posixpath

    import pyarrow.fs as pafs

    from ray_vdr.storage import fs_path

    fs, root = fs_path(str(uri))
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted((posixpath.relpath(i.path, root), i.size) for i in infos if i.type == pafs.FileType.File
                   and not posixpath.basename(i.path).startswith(".") and posixpath.basename(i.path) != "README.md")
    h = hashlib.sha256()
    for rel, size in files:
        h.update(f"{rel}\0{size}\0".encode())
        with fs.open_input_file(posixpath.join(root, rel)) as fh:
            if size <= SIGNATURE_SMALL_FILE:
                h.update(fh.read())
                continue
            for i in range(SIGNATURE_SAMPLES):
                h.update(fh.read_at(SIGNATURE_BLOCK, (size - SIGNATURE_BLOCK) * i // (SIGNATURE_SAMPLES - 1)))
    return h.hexdigest()


def embedding_dimension(path: str | Path) -> int:
    """The model's output dimension, from its Pooling (or Dense) module config, without loading the weights."""
    dim = None
    for module in json.loads((Path(path) / "modules.json").read_text()):
        conf = Path(path) / module.get("path", "") / "config.json"
        if module.get("type", "").endswith(("Pooling", "Dense")) and conf.is_file():
            c = json.loads(conf.read_text())
            dim = c.get("out_features") or c.get("embedding_dimension") or c.get("word_embedding_dimension") or dim
    if dim is None:
        raise ValueError(f"cannot tell the embedding dimension of {path}: no Pooling or Dense module config")
    return int(dim)


# ---------------------------------------------------------------------------------------------------------------------
# The embedder an index was built with


def _pixel_bounds(cfg: ModelConfig, path: Path) -> dict[str, Any]:
    """The image processor's pixel budget as the embedder will use it (the saved one, overridden by ``cfg``)."""
    size: dict[str, Any] = {}
    for name, nested in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        f = path / name
        if f.is_file():
            data = json.loads(f.read_text())
            size = dict((data.get(nested, {}) if nested else data).get("size") or {}) or size
    if cfg.min_pixels:
        size["shortest_edge"] = cfg.min_pixels
    if cfg.max_pixels:
        size["longest_edge"] = cfg.max_pixels
    return {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")}


def embedder_binding(cfg: ModelConfig, uri: str) -> EmbedderBinding:
    """How the embedder at ``uri`` encodes when a job runs it with the model section ``cfg``: its path, the prompts
    (the saved ones, overridden by ``cfg``), processor pixel bounds (likewise), token limit, saved truncation, whether
    it normalises, and whether it needs its own code (``cfg.trust_remote_code``). Reads configuration files only.

    The embedding job stores this in the index manifest (``model``), with the model's identity; every job that
    encodes against an index encodes through :class:`ray_vdr.models.encoder.IndexEncoder` from it, so queries are
    encoded exactly as the index's pages were, and an evaluation computes it from the same config as the job would.
    """
    from ray_vdr.models.multivector import is_multi_vector

    local = Path(local_model(uri))
    st_cfg = local / "config_sentence_transformers.json"
    st = json.loads(st_cfg.read_text()) if st_cfg.is_file() else {}
    modules = json.loads((local / "modules.json").read_text())
    prompts = dict(st.get("prompts") or {})
    if cfg.document_prompt is not None:
        prompts["document"] = cfg.document_prompt
    if cfg.query_prompt is not None:
        prompts["query"] = cfg.query_prompt
    return EmbedderBinding(path=uri, truncate_dim=st.get("truncate_dim"),
                           normalized=any(m.get("type", "").endswith("Normalize") for m in modules),
                           document_prompt=prompts.get("document"), query_prompt=prompts.get("query"),
                           pixel_bounds=PixelBounds(**_pixel_bounds(cfg, local)), max_seq_length=cfg.max_seq_length,
                           trust_remote_code=cfg.trust_remote_code, multi_vector=is_multi_vector(local))


@dataclass(frozen=True)
class Runtime:
    """Where and how a job runs a model (not how it encodes: that is the binding): dtype, attention, device."""

    dtype: str = "auto"
    attn_implementation: str = "auto"
    device: str | None = None


def load_embedder(binding: EmbedderBinding, runtime: Runtime | None = None) -> SentenceTransformer:
    """The embedder of a binding (:func:`embedder_binding`, or an index manifest's ``model``), encoding with its
    prompts, pixel bounds and token limit, with its own code when the binding says it needs it."""
    runtime, bounds = runtime or Runtime(), binding.pixel_bounds
    cfg = ModelConfig(name_or_path=local_model(binding.path), builder="load", dtype=runtime.dtype,
                      attn_implementation=runtime.attn_implementation, min_pixels=bounds.min_pixels,
                      max_pixels=bounds.max_pixels, query_prompt=binding.query_prompt,
                      document_prompt=binding.document_prompt, max_seq_length=binding.max_seq_length,
                      trust_remote_code=binding.trust_remote_code,
                      kind="multi_vector" if binding.multi_vector else "single_vector")
    return build_model(cfg, device=runtime.device)


def load_reranker(uri: str, runtime: Runtime | None = None, *, min_pixels: int | None = None,
                  max_pixels: int | None = None, trust_remote_code: bool = False) -> CrossEncoder:
    """A saved CrossEncoder (folder, URI or hub id), with its saved pixel bounds unless given, and its own code when
    ``trust_remote_code``."""
    runtime = runtime or Runtime()
    cfg = ModelConfig(name_or_path=local_model(uri), builder="load", dtype=runtime.dtype,
                      attn_implementation=runtime.attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels,
                      trust_remote_code=trust_remote_code)
    return build_model(cfg, device=runtime.device, reranker=True)


def trained_reranker(cfg: VDRConfig) -> str | None:
    """The reranker this config's reranker run saved, if it has finished; else None."""
    from ray_vdr.storage import is_file

    uri = cfg.reranker_run().uri("model")
    return uri if is_file(f"{uri}/modules.json") else None
