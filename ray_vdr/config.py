"""Typed configuration for every ray-vdr job.

One YAML file describes a run: the model, the data, the training recipe, the Ray scaling, where results go
and the saved artifact. Command-line overrides use dotted paths (``train.lr=1e-4``). Everything is validated
here, before any Ray or torch work starts, so a typo fails in a second with the offending field named.

This module imports neither torch nor ray on purpose: the driver of ``ray job submit`` and the CLI must be able
to validate a config cheaply.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ImageLimits",
    "LateIndexConfig",
    "MineConfig",
    "ModelConfig",
    "OutputConfig",
    "QueriesConfig",
    "RerankerConfig",
    "RunConfig",
    "ScalingConfig",
    "ServeConfig",
    "ServeDeploymentConfig",
    "ServeLimits",
    "SourceConfig",
    "SyntheticConfig",
    "TrainConfig",
    "VDRConfig",
    "apply_overrides",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration that cannot run. The message names every offending field by its dotted path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


PositiveInt = Annotated[int, Field(gt=0)]


class LoraConfig(_Strict):
    """LoRA adapters (PEFT) on the model's transformer: only they train (plus heads outside the transformer, such as
    a reranker's Dense layer); the saved model has them merged into its weights, and ``adapter/`` holds them alone."""

    rank: PositiveInt = Field(16, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator (scale = alpha / rank). None = 2·rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Names of the linear layers that get adapters (Qwen3-VL's attention and MLP projections, in the "
        "vision tower too where the names match).",
    )


class ModelConfig(_Strict):
    name_or_path: str = Field(
        "Qwen/Qwen3-VL-Embedding-2B",
        description="Hub id or local/URI path of a Sentence Transformers model (or a plain transformers VLM folder).",
    )
    builder: Literal["load", "tiny-qwen3vl", "tiny-clip", "qwen3vl-2b-shape", "qwen3vl-8b-shape",
                     "tiny-qwen3vl-reranker", "qwen3vl-2b-reranker-shape", "reranker-from-vlm"] = Field(
        "load",
        description=(
            "How the model comes to exist. 'load' reads name_or_path. The other values build a model into "
            "name_or_path when that folder is missing: embedders with random weights — a tiny Qwen3-VL embedder or "
            "tiny CLIP (tests, demo), the real Qwen3-VL-2B or -8B shape (GPU benchmarks); rerankers — a tiny Qwen3-VL "
            "reranker or the 2B shape with random weights, or 'reranker-from-vlm': the VLM in base_model (e.g. "
            "Qwen/Qwen3-VL-2B-Instruct) with the score head in head."
        ),
    )
    head: Literal["logit", "dense"] = Field(
        "logit",
        description="Rerankers built by a builder: 'logit' scores logit('yes') - logit('no') of the VLM's LM head "
        "(as Qwen3-VL-Reranker); 'dense' pools the last token and adds a Dense layer to one score.",
    )
    base_model: str | None = Field(
        None, description="builder 'reranker-from-vlm': the Qwen3-VL checkpoint (hub id, folder or URI) to build on. "
        "None = the embedder this config's training run saved."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight dtype at load time. 'auto' = bfloat16 on a CUDA device that supports it, else float32.",
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel. 'auto' = flash_attention_2 when flash_attn imports and CUDA is present, "
        "else sdpa.",
    )
    min_pixels: PositiveInt | None = Field(
        None, description="Processor lower bound on pixels per image (Qwen-VL min_pixels). None keeps the model's own."
    )
    max_pixels: PositiveInt | None = Field(
        None,
        description="Processor upper bound on pixels per image (Qwen-VL max_pixels); bounds image tokens. "
        "None keeps the model's own.",
    )
    query_prompt: str | None = Field(
        None, description="Prompt for queries (encode_query). None keeps the prompt saved with the model."
    )
    document_prompt: str | None = Field(
        None, description="Prompt for pages (encode_document). None keeps the prompt saved with the model."
    )
    max_seq_length: PositiveInt | None = Field(None, description="Token limit per input. None keeps the model's own.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repository.")
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters instead of the full weights (null = full weights)."
    )
    kind: Literal["single_vector", "multi_vector"] = Field(
        "single_vector",
        description="Embedders: 'single_vector' = one vector per query or page (cosine); 'multi_vector' = one vector "
        "per token or image patch, scored by MaxSim (Sentence Transformers' MultiVectorEncoder, ColPali style). A "
        "single-vector model becomes a multi-vector one with a new token head (token_dim).",
    )
    token_dim: PositiveInt = Field(
        128, description="multi_vector: the token vectors' dimension, when a token head is added to a single-vector "
        "model (ColBERT/ColPali use 128). A multi-vector model keeps its own."
    )

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelConfig:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        return self

    @property
    def builds_reranker(self) -> bool:
        return self.builder in RERANKER_BUILDERS


RERANKER_BUILDERS = ("tiny-qwen3vl-reranker", "qwen3vl-2b-reranker-shape", "reranker-from-vlm")


class RerankerModelConfig(ModelConfig):
    name_or_path: str = Field(
        "Qwen/Qwen3-VL-Reranker-2B",
        description="Hub id or local/URI path of a Sentence Transformers CrossEncoder (or where a builder writes one).",
    )


class SourceConfig(_Strict):
    uri: str = Field(
        description=(
            "Where the rows are: a local path or a pyarrow-filesystem URI (s3://, gs://) of Parquet files or a folder "
            "of them; a folder written by datasets.save_to_disk; a JSONL file whose image columns hold paths "
            "relative to it; or a Hub dataset id with format 'hf_hub'."
        )
    )
    format: Literal["auto", "parquet", "hf_disk", "images_jsonl", "hf_hub"] = Field(
        "auto", description="Reader to use. 'auto' infers it from the URI (.jsonl, dataset_info.json, else Parquet)."
    )
    hf_config: str | None = Field(None, description="Dataset configuration name, for format 'hf_hub'.")
    hf_split: str = Field("train", description="Split to read, for format 'hf_hub'.")
    limit: PositiveInt | None = Field(None, description="Read at most this many rows (smoke runs).")


class ImageLimits(_Strict):
    min_side: PositiveInt = Field(
        16, description="Images with a side shorter than this (e.g. 1x1 placeholders) are rejected."
    )
    max_side: PositiveInt = Field(
        4096, description="Images with a longer side are downscaled (aspect kept) to this size before training."
    )
    max_pixels: PositiveInt = Field(
        64_000_000,
        description="Images declaring more pixels than this are rejected unopened (decompression-bomb guard).",
    )
    max_bytes: PositiveInt = Field(50_000_000, description="Encoded images larger than this many bytes are rejected.")

    @model_validator(mode="after")
    def _consistent(self) -> ImageLimits:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must not exceed max_side ({self.max_side})")
        if self.max_side * self.min_side > self.max_pixels:
            raise ValueError("max_pixels is smaller than min_side*max_side: every resized image would be rejected")
        return self


class DataConfig(_Strict):
    train: SourceConfig | None = Field(None, description="Training triplets (query, positive page, hard negatives).")
    eval: SourceConfig | None = Field(None, description="Evaluation triplets; their pages form the retrieval corpus.")
    query_column: str = Field("query", description="Column holding the query text.")
    positive_column: str = Field("image", description="Column holding the positive page image.")
    negative_prefix: str = Field("negative_", description="Hard-negative columns are named <prefix>0..<prefix>k-1.")
    num_negatives: int = Field(1, ge=0, description="Hard negatives per training row (reference recipe: 1).")
    eval_num_negatives: int = Field(4, ge=0, description="Hard negatives per eval row (reference eval split: 4).")
    id_column: str | None = Field(
        None, description="Column with a unique row id. None = a content hash of query and positive image."
    )
    image: ImageLimits = Field(default_factory=ImageLimits, description="Validation bounds for every image.")
    rejects_path: str | None = Field(
        None, description="Where rejected rows go (Parquet with a reason). None = <run storage>/<name>/rejects."
    )
    batch_size: PositiveInt = Field(16, description="Rows per Ray Data decode/validate batch.")
    cpus_per_task: float = Field(
        1.0, gt=0, description="CPUs reserved per Ray Data read and validate task. A fraction lets the training "
        "stream, the eval split and other jobs' reads share CPUs the workers leave free (small machines)."
    )

    @property
    def negative_columns(self) -> list[str]:
        return [f"{self.negative_prefix}{i}" for i in range(self.num_negatives)]

    @property
    def eval_negative_columns(self) -> list[str]:
        return [f"{self.negative_prefix}{i}" for i in range(self.eval_num_negatives)]


class TrainConfig(_Strict):
    loss: Literal["cached_mnrl", "mnrl", "bce"] = Field(
        "cached_mnrl",
        description="Embedders: CachedMultipleNegativesRankingLoss (GradCache, bounded memory) or plain "
        "MultipleNegativesRankingLoss. Rerankers: 'bce' (BinaryCrossEntropyLoss over (query, positive) = 1 and "
        "(query, negative) = 0 pairs).",
    )
    mini_batch_size: PositiveInt = Field(1, description="Mini-batch size of the cached loss (reference recipe: 1).")
    collate_per_mini_batch: bool = Field(
        True, description="With the cached loss, preprocess pages one mini-batch at a time inside the loss, so memory "
        "does not grow with the batch; each page is then decoded and preprocessed in both of the loss's passes "
        "(on a GPU the next mini-batch's in a thread). False: the whole batch once, before the loss (faster on CPU)."
    )
    matryoshka_dims: list[PositiveInt] | None = Field(
        None, description="Wrap the loss in MatryoshkaLoss at these dims, largest first. None = no Matryoshka."
    )
    per_device_batch_size: PositiveInt = Field(64, description="Rows per optimizer step on each worker.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps for linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    epochs: float | None = Field(1.0, gt=0, description="Epochs over the training data; ignored if max_steps is set.")
    max_steps: PositiveInt | None = Field(
        None, description="Optimizer steps; overrides epochs. None = derived from rows, epochs and the global batch."
    )
    eval_every: float | None = Field(
        0.1, gt=0, le=1, description="Evaluate every this fraction of the run. None = never."
    )
    save_every: float | None = Field(
        0.1, gt=0, le=1, description="Checkpoint every this fraction of the run. None = end only."
    )
    log_every: float = Field(0.05, gt=0, le=1, description="Log metrics every this fraction of the run.")
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="Data-parallel strategy.")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage (strategy 'deepspeed' only).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision. 'auto' = bf16 on GPU, fp32 on CPU."
    )
    duplicate_free_batches: bool = Field(
        True, description="Never put the same query or page twice in one global batch (false in-batch negatives)."
    )
    shuffle_buffer: int = Field(
        1024,
        ge=0,
        description="Rows in the streaming shuffle buffer (reshuffled every epoch with seed+epoch). 0 = file order.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    seed: int = Field(12, description="Seed for weights that are initialised, shuffling and sampling.")
    dataloader_workers: int = Field(0, ge=0, description="torch DataLoader workers per train worker.")
    feeder_fetch_steps: PositiveInt | None = Field(
        None,
        description="Steps of its data a worker fetches from the feeder per call. Every call costs the one feeder "
        "actor ~0.5-0.9 ms whatever its size, so at a few rows per rank and step (many GPUs) one call per step bounds "
        "the job; more steps per call lift that bound (bench/feeder_scale.py). The feeder holds 2x this many global "
        "batches in memory. None (default): enough steps for 8 rows a call (8 at 1 row per device, 1 from 8 rows).",
    )

    @property
    def fetch_steps(self) -> int:
        """``feeder_fetch_steps``, or enough steps for 8 rows per call."""
        return self.feeder_fetch_steps or max(1, -(-8 // self.per_device_batch_size))

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set epochs or max_steps")
        dims = self.matryoshka_dims
        if dims is not None:
            if not dims:
                raise ValueError("matryoshka_dims must not be empty (use null to disable)")
            if sorted(set(dims), reverse=True) != dims:
                raise ValueError(f"matryoshka_dims must be unique and in descending order, got {dims}")
        if self.loss == "bce" and dims is not None:
            raise ValueError("matryoshka_dims apply to embedders; a reranker (loss 'bce') scores pairs")
        if self.loss == "cached_mnrl" and self.mini_batch_size > self.per_device_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) exceeds per_device_batch_size ({self.per_device_batch_size})"
            )
        if self.strategy == "ddp" and self.zero_stage not in (0, 1):
            raise ValueError(f"zero_stage {self.zero_stage} needs strategy 'deepspeed'")
        return self


class ScalingConfig(_Strict):
    num_workers: int = Field(1, ge=0, description="Ray Train workers (one per GPU). 0 runs in the driver process.")
    use_gpu: bool = Field(False, description="Give each worker a GPU.")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources per worker, e.g. {CPU: 8, GPU: 1}. None = Ray's default (1 CPU, +1 GPU)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ScalingConfig:
        res = self.resources_per_worker or {}
        if any(v < 0 for v in res.values()):
            raise ValueError("resources_per_worker values must be >= 0")
        if not self.use_gpu and res.get("GPU", 0) > 0:
            raise ValueError("resources_per_worker asks for GPUs but use_gpu is false")
        return self


class RunConfig(_Strict):
    name: str = Field("ray-vdr", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name; rerun to resume.")
    storage_path: str = Field(
        "./runs", description="Local folder or URI (s3://, gs://) for checkpoints, results and artifacts."
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts allowed (-1 = unlimited).")
    keep_checkpoints: PositiveInt | None = Field(2, description="Checkpoints kept (latest N). None keeps all.")

    def uri(self, *parts: str) -> str:
        """Path or URI under this run's folder (storage_path/name/...)."""
        return "/".join([self.storage_path.rstrip("/"), self.name, *parts])


class OutputConfig(_Strict):
    truncate_dim: PositiveInt | None = Field(
        1024, description="Embedding dimension saved with the model (Matryoshka truncation). None = full."
    )


class LateIndexConfig(_Strict):
    """A multi-vector (late-interaction) index: used when the embedder is a multi-vector model (model.kind
    multi_vector, or a saved MultiVectorEncoder as index.model). Pages keep their token vectors for exact MaxSim; a
    MUVERA fixed dimensional encoding per page is the vector of the usual FAISS index (the first stage), so shards,
    quantization, versions, deletes, filters and key scopes work as for one vector per page."""

    pooling: float = Field(1.0, ge=1.0, le=32.0, description="Hierarchical token pooling at index time (Sentence "
                           "Transformers' HierarchicalTokenPooling): keep about 1/pooling of a page's tokens. 1: none.")
    storage: Literal["fp16", "int8", "binary"] = Field(
        "fp16", description="Stored token vectors: fp16 (2 bytes a dimension), int8 (1, plus a scale per token) or "
        "binary (the signs: 1 bit; scored against the float query).")
    k_sim: int = Field(5, ge=1, le=10, description="FDE: SimHash hyperplanes per repetition (2^k_sim partitions).")
    d_proj: PositiveInt = Field(16, description="FDE: each partition projected to this many dimensions (at most the "
                                "token dimension).")
    reps: PositiveInt = Field(20, le=100, description="FDE: repetitions, concatenated: the FDE has "
                              "reps x 2^k_sim x d_proj dimensions (10,240 at the defaults).")
    seed: int = Field(0, description="FDE: seed of its random hyperplanes and projections.")
    candidates: PositiveInt = Field(200, le=10_000, description="Pages the first stage hands to exact MaxSim "
                                    "rescoring per query (at least top_k). The defaults reached recall@10 0.955 of "
                                    "exhaustive MaxSim (python -m bench.multivector_first_stage).")


class IndexConfig(_Strict):
    """The corpus embedding job (jobs/embed_corpus.py): pages → embeddings (Parquet) → FAISS index."""

    sources: list[str] = Field(
        default_factory=list,
        description="Folders, files or URIs of page images (.png .jpg .jpeg .webp .bmp .tif .tiff .gif), PDFs and "
        "Parquet files with image bytes. Folders are walked recursively; other files are rejected with a reason. A "
        "page's text is stored with it: a PDF's text layer, an image's sidecar <file>.txt, a Parquet text column.",
    )
    model: str | None = Field(
        None,
        description="The embedder: a Sentence Transformers folder, URI or hub id. None = the model this config's "
        "training run saved (run.storage_path/run.name/model).",
    )
    output: str = Field("./index", description="Folder or URI for page shards, rejects, the FAISS index and manifest.")
    mode: Literal["sync", "append"] = Field(
        "sync", description="'sync': the index mirrors its sources on every run: new and changed files are embedded, "
        "the pages of changed and deleted files are removed, unchanged files are skipped (by content hash). "
        "'append': pages are only ever added (a changed file's old pages stay searchable)."
    )
    rehash: bool = Field(
        False, description="Read and hash every source on a sync. By default a source whose size and modification "
        "time (on object stores: last-modified time) are those recorded at the last sync is not read: a sync costs "
        "what changed. Set it where a file can change without either changing."
    )
    metadata: str | None = Field(
        None, description="A metadata table (Parquet, or JSONL) with a 'source' or 'doc_id' column and one column per "
        "field (reserved: collection, tenant, title, url, lang; free: strings, numbers, dates). A sidecar "
        "<file>.json next to a source overrides its row. Stored with the pages, returned in results, filterable."
    )
    compact_removed_share: float = Field(
        0.2, ge=0, le=1, description="Compact (rebuild the index over live pages, drop removed ones from the shards) "
        "when removed pages pass this share of the index, after a sync or delete (on a sharded index: of a shard, and "
        "only that shard is rebuilt). `ray-vdr compact` forces it."
    )
    dim: PositiveInt | None = Field(
        None, description="Embedding dimension (Matryoshka truncation). None = output.truncate_dim, else the model's."
    )
    dpi: PositiveInt = Field(100, le=600, description="Resolution PDF pages are rasterised at.")
    parquet_image_column: str = Field("image", description="Column with image bytes (or {bytes, path}) in Parquet.")
    parquet_id_column: str | None = Field(
        "doc_id", description="Column with a document id in Parquet sources, when present; else file#row."
    )
    parquet_text_column: str | None = Field(
        "text", description="Column with a page's text in Parquet sources, when present (stored with the page)."
    )
    batch_size: PositiveInt = Field(16, description="Pages per embedding call.")
    actors: PositiveInt = Field(1, description="Embedding actors (one GPU each when scaling.use_gpu).")
    cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs reserved per embedding actor; on CPU its torch threads (rounded up)."
    )
    decode_cpus: float = Field(1.0, gt=0, description="CPUs reserved per read/decode/rasterise task.")
    files_per_task: PositiveInt = Field(
        8, description="Source files per read/decode task (at most 1,000 tasks a run): more spreads Ray's per-task "
        "cost over many small images, 1 spreads large PDFs over the most CPUs."
    )
    thumbnail_side: PositiveInt = Field(256, description="Longest side of the served thumbnails, in pixels (made "
                                        "from the page image when first asked for; recorded in the manifest).")
    index_type: Literal["auto", "flat", "hnsw", "ivf_sq8", "ivf_pq"] = Field(
        "auto",
        description="FAISS index. 'auto': exact inner product (flat) up to flat_max vectors, HNSW up to hnsw_max, "
        "IVF-SQ8 above; each at recall@10 ≥ 0.95 against exact search on page-like vectors (bench/ann_recall.py). "
        "'ivf_pq' takes the least memory, at a far lower recall@10 there (0.74 at 20k vectors, at any nprobe).",
    )
    flat_max: PositiveInt = Field(100_000, description="'auto' uses exact search up to this many vectors.")
    hnsw_max: PositiveInt = Field(
        500_000, description="'auto' uses HNSW up to this many vectors, IVF-SQ8 above: a quarter of HNSW's memory per "
        "page (1.1 against 4.4 KB at 1024-d) at a like p50, built on GPU where there is one; its 8-bit codes cap "
        "recall@10 (0.974 at 100k page-like vectors, lower as the corpus grows), which HNSW's stored vectors do not."
    )
    hnsw_m: PositiveInt = Field(32, description="HNSW links per node.")
    hnsw_ef_construction: PositiveInt = Field(200, description="HNSW build-time search depth.")
    hnsw_ef_search: PositiveInt = Field(
        256, description="HNSW query-time search depth (stored in the index). Recall falls as the index grows: 256 "
        "keeps the top of the HNSW tier above 0.95 recall@10 on page-like vectors (128 gave 0.97 at 100k)."
    )
    ivf_nlist: PositiveInt | None = Field(None, description="IVF lists. None = about 4·sqrt(n), at most n/39.")
    ivf_nprobe: PositiveInt = Field(
        32, description="IVF lists searched per query (IVF-SQ8 at 1M page-like vectors: 0.953 recall@10 at 16, 0.957 "
        "at 32, no higher beyond: 8-bit codes cap it)."
    )
    pq_bytes: PositiveInt | None = Field(None, description="IVF-PQ code size in bytes per vector. None = dim / 8.")
    quantization: Literal["none", "int8", "binary"] = Field(
        "none", description="Vectors in fewer bits: the index keeps 'int8' codes (8-bit scalar quantisation: flat or "
        "HNSW over codes, 4x smaller in memory; an IVF type's own codes) or 'binary' codes (a bit per dimension, 32x "
        "smaller; flat or HNSW, 'auto' never picks IVF) in memory, and rescores rescore x top_k candidates with the "
        "float32 vectors, kept in a memory-mapped file beside the index (on local disk, or copied once from object "
        "storage into the local cache: RAY_VDR_LOCAL_CACHE). Recall@10 against exact float search on page-like "
        "vectors, at the default rescore: int8 1.0; binary 0.97 at 1024-d, far lower at 128-d (docs/benchmarks.md)."
    )
    rescore: PositiveInt | None = Field(
        None, le=1000, description="Candidates per result taken from the codes and rescored with the float vectors "
        "(quantization only). None = 4 for int8, 20 for binary."
    )
    shards: PositiveInt | Literal["auto"] = Field(
        1, description="Index shards: a document's pages all go to one shard (by a hash of its doc_id), each shard "
        "is built by its own Ray task and served by its own Retriever deployment, so no process holds more than one "
        "shard's vectors and a sync, delete or compaction rebuilds only the shards it touched. 1: one index, as "
        "before. 'auto': pages / shard_target_pages, rounded up (kept while every shard stays under twice the target)."
    )
    late: LateIndexConfig = Field(default_factory=LateIndexConfig, description="Multi-vector indexes only: token "
                                  "pooling and storage, and the first stage (ray-vdr config --show index).")
    shard_target_pages: PositiveInt = Field(
        20_000_000, description="'shards: auto': pages per shard aimed at (20M at 1024-d is ~82 GB of float32 "
        "vectors in a flat or HNSW shard, ~22 GB as IVF-SQ8; see the README's 'Scaling the index')."
    )

    @model_validator(mode="after")
    def _quantization(self) -> IndexConfig:
        if self.quantization == "binary" and self.index_type in ("ivf_sq8", "ivf_pq"):
            raise ValueError(f"index.quantization 'binary' works with index_type flat, hnsw or auto (binary codes "
                             f"have no IVF form here), not {self.index_type!r}")
        if self.rescore is not None and self.quantization == "none":
            raise ValueError("index.rescore needs index.quantization int8 or binary (float vectors are exact already)")
        return self


class ServeDeploymentConfig(_Strict):
    """Replicas and limits of one Ray Serve deployment."""

    min_replicas: PositiveInt = Field(1, description="Autoscaling lower bound (replicas kept warm).")
    max_replicas: PositiveInt = Field(4, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Autoscaling target: requests in flight per replica before another is added."
    )
    max_ongoing_requests: PositiveInt = Field(
        64, description="Requests a replica takes at once. For batched deployments it caps the batch (Ray #43288)."
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests waiting per caller before it gets 503 + Retry-After (-1: unbounded)."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (on CPU: its torch threads, rounded up).")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica. None = 1 for model deployments when the cluster has GPUs, else 0."
    )
    max_batch_size: PositiveInt = Field(
        16, description="Most requests in one model call (queries, or query-page lists for the "
        "reranker). 1 turns dynamic batching off."
    )
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="Extra wait for a batch that is not full before the model call. 0 (default): none; "
        "batches fill while the model runs (serving/batching.py)."
    )
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="How long a stopping replica may finish its requests before it is killed (Ray Serve's "
        "default, 20 s). A replica that never started (e.g. its node is gone) also waits this long when the "
        "application is deleted."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeDeploymentConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                             f"({self.max_batch_size}): a replica would never see a full batch")
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(f"target_ongoing_requests ({self.target_ongoing_requests}) exceeds max_ongoing_requests "
                             f"({self.max_ongoing_requests}): the autoscaler would never add a replica")
        return self


class ServeLimits(_Strict):
    """What one search request may ask for; anything beyond gets a 4xx naming the limit."""

    max_query_chars: PositiveInt = Field(1000, description="Longest text query.")
    max_top_k: PositiveInt = Field(100, description="Most results per request.")
    default_top_k: PositiveInt = Field(10, description="Results when the request does not say.")
    max_rerank_depth: PositiveInt = Field(100, description="Most first-stage candidates the reranker scores.")
    default_rerank_depth: int = Field(20, ge=0, description="Candidates reranked when the request does not say.")
    max_body_bytes: PositiveInt = Field(8_000_000, description="Largest request body (413 above).")
    image: ImageLimits = Field(
        default_factory=lambda: ImageLimits(max_pixels=40_000_000, max_bytes=6_000_000, max_side=4096),
        description="Image queries: decompression-bomb guard, size bounds (same checks as training data).",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="A request still unanswered after this gets 504.")
    max_filter_clauses: PositiveInt = Field(16, description="Most clauses in a search filter.")
    max_filter_values: PositiveInt = Field(1000, description="Most values in one 'in' clause of a filter.")
    retry_after_s: PositiveInt = Field(2, description="Retry-After sent with every 503 (over capacity, loading).")

    @model_validator(mode="after")
    def _consistent(self) -> ServeLimits:
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k ({self.default_top_k}) exceeds max_top_k ({self.max_top_k})")
        if self.default_rerank_depth > self.max_rerank_depth:
            raise ValueError(f"default_rerank_depth ({self.default_rerank_depth}) exceeds max_rerank_depth "
                             f"({self.max_rerank_depth})")
        return self


# Per-deployment defaults, as classes so that a partial YAML section (`ingress: {max_queued_requests: 64}`) keeps the
# other defaults of its own deployment.
class EmbedderDeploymentConfig(ServeDeploymentConfig):
    num_cpus: float = Field(2.0, ge=0, description="CPUs per replica (on CPU: its torch threads, rounded up).")


class RetrieverDeploymentConfig(ServeDeploymentConfig):
    num_cpus: float = Field(2.0, ge=0, description="CPUs per replica (FAISS threads).")
    max_batch_size: PositiveInt = Field(32, description="Queries per FAISS search call.")
    max_ongoing_requests: PositiveInt = Field(128, description="Requests a replica takes at once (caps the batch).")
    target_ongoing_requests: float = Field(32, gt=0, description="Autoscaling target per replica.")
    shards: PositiveInt | None = Field(
        None, description="Retriever groups, one per index shard (each with these replicas). None: the shard count of "
        "the live index when the endpoint is deployed (1 for an unsharded index). An index with more shards than "
        "this is refused by the retrievers (health names it): redeploy."
    )
    shard_resources: list[dict[str, float]] = Field(
        default_factory=list, description="Ray custom resources per shard group, the i-th for shard i (cycled), to "
        "place each group on its own nodes: e.g. [{index_a: 1}, {index_b: 1}] with nodes started with "
        "--resources '{\"index_a\": 4}' and '{\"index_b\": 4}'. Empty: anywhere."
    )
    shard_timeout_s: float = Field(
        10.0, gt=0, description="A shard whose replicas do not answer within this is missing from the answer: 503 "
        "naming it, or a partial answer with allow_partial."
    )


class RerankDeploymentConfig(ServeDeploymentConfig):
    num_cpus: float = Field(2.0, ge=0, description="CPUs per replica (on CPU: its torch threads, rounded up).")
    max_batch_size: PositiveInt = Field(
        4, description="Requests per model call (each brings up to rerank_depth pairs)."
    )
    max_ongoing_requests: PositiveInt = Field(16, description="Requests a replica takes at once (caps the batch).")
    target_ongoing_requests: float = Field(4, gt=0, description="Autoscaling target per replica.")


class IngressDeploymentConfig(ServeDeploymentConfig):
    max_replicas: PositiveInt = Field(2, description="Autoscaling upper bound.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per replica.")
    max_batch_size: PositiveInt = Field(1, description="Not batched.")
    max_ongoing_requests: PositiveInt = Field(
        256, description="Requests in flight per replica: enough to fill every downstream batch."
    )
    max_queued_requests: int = Field(512, ge=-1, description="Requests waiting beyond these get 503 + Retry-After.")
    target_ongoing_requests: float = Field(64, gt=0, description="Autoscaling target per replica.")


class ServeAuthConfig(_Strict):
    """API keys of the endpoint (serving/auth.py): where they come from, never the keys themselves."""

    keys_file: str | None = Field(
        None, description="A JSON file (path or URI) listing the keys: [{name, key | sha256, scopes, tenants, "
        "collections}]. Scopes: search, embed, rerank, pages, admin."
    )
    keys_env: str | None = Field(
        None, description="An environment variable holding the same JSON (e.g. from a Kubernetes Secret)."
    )
    allow_anonymous: bool = Field(
        False, description="Serve without keys on a non-loopback host (refused otherwise); logs a warning."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ServeAuthConfig:
        if self.keys_file and self.keys_env:
            raise ValueError("give keys_file or keys_env, not both")
        return self

    @property
    def configured(self) -> bool:
        return bool(self.keys_file or self.keys_env)


class ServeConfig(_Strict):
    """The two-stage retrieval endpoint (serving/): query embedder → FAISS retriever → multimodal reranker.

    Also the ``args`` of ``serving.app:build_app`` in a Serve config (``serve run``, a RayService's serveConfigV2).
    """

    index: str | None = Field(
        None, description="The embedding job's output (folder or URI). None = index.output of this config."
    )
    model: str | None = Field(
        None, description="Query embedder. None = the model the index was built with (its manifest); another model "
        "is refused unless it is byte-identical (same fingerprint)."
    )
    dim: PositiveInt | None = Field(
        None, description="Embedding dimension; must equal the index's. None = the index's."
    )
    reranker: str | None = Field(
        None, description="A Sentence Transformers CrossEncoder (folder, URI or hub id) scoring (query, page image) "
        "pairs. None = first stage only (`ray-vdr serve`: the reranker this config trained, when there is one)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model weights and compute. 'auto' = bf16 on a CUDA GPU that supports it, else fp32."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="'auto' = flash_attention_2 on CUDA when flash_attn is installed, else sdpa."
    )
    rerank_batch_size: PositiveInt = Field(16, description="(query, page) pairs per reranker forward.")
    reranker_trust_remote_code: bool = Field(
        False, description="Allow the reranker's own modelling code (custom modules in its repository). The embedder "
        "needs no such switch: the index's binding records whether it does.")
    host: str = Field("127.0.0.1", description="HTTP host the Serve proxy binds (0.0.0.0 in a cluster).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    route_prefix: str = Field("/", description="Where the application is mounted.")
    app_name: str = Field("ray-vdr", description="Serve application name.")
    application: str = Field(
        "serving.app:build_app", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="`ray-vdr serve`: import path of the Serve application builder it deploys (module:function, as a "
        "Serve config's import_path).",
    )
    live: str | None = Field(
        None, description="The live manifest (a JSON file or URI) that `ray-vdr promote` writes: which model and index "
        "are live, and the previous ones. Set, the endpoint serves what it names (until it exists: ``index``) and "
        "follows it every ``index_poll_s``; None = ``index`` only, fixed."
    )
    index_poll_s: float = Field(
        10.0, gt=0, description="While the index does not exist yet, look for it this often (health stays 503); also "
        "how often the endpoint reads the live manifest."
    )
    embedding_dims: list[PositiveInt] | None = Field(
        None, description="The dims `POST /v1/embeddings` offers (`dimensions`): the embedder's Matryoshka dims, e.g. "
        "the training run's train.matryoshka_dims. None = the model's dimension, its halvings down to 64, and the "
        "index's."
    )
    auth: ServeAuthConfig = Field(default_factory=ServeAuthConfig, description="API keys, scopes and tenants.")
    metrics: bool = Field(
        True, description="Prometheus metrics of requests, stages, batches and the live generation "
        "(serving/metrics.py), exported by Ray's metrics agent next to Ray Serve's own. False only to measure them."
    )
    admin_deletes: bool = Field(
        False, description="Enable POST /admin/delete (remove documents by doc_id, source or filter; publishes a new "
        "index version the endpoint switches to). Off by default: until API keys exist, anyone who can reach the "
        "endpoint could delete."
    )
    keep_running: bool = Field(
        True, description="`ray-vdr serve` / `demo` only: after the sample query, keep the endpoint up until Ctrl-C."
    )
    limits: ServeLimits = Field(default_factory=ServeLimits, description="Request limits.")
    embedder: EmbedderDeploymentConfig = Field(
        default_factory=EmbedderDeploymentConfig, description="QueryEmbedder deployment."
    )
    retriever: RetrieverDeploymentConfig = Field(
        default_factory=RetrieverDeploymentConfig, description="Retriever deployment (FAISS search, page store)."
    )
    rerank: RerankDeploymentConfig = Field(
        default_factory=RerankDeploymentConfig,
        description="Reranker deployment; max_batch_size counts requests (each of up to rerank_depth pairs).",
    )
    ingress: IngressDeploymentConfig = Field(default_factory=IngressDeploymentConfig, description="HTTP ingress.")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        # The ingress must be able to hold enough requests in flight to fill every downstream batch.
        ingress_capacity = self.ingress.max_ongoing_requests * self.ingress.max_replicas
        for name in ("embedder", "retriever", "rerank"):
            sub: ServeDeploymentConfig = getattr(self, name)
            if ingress_capacity < sub.max_batch_size:
                raise ValueError(f"ingress.max_ongoing_requests x max_replicas ({ingress_capacity}) is below "
                                 f"{name}.max_batch_size ({sub.max_batch_size}): the ingress would cap its batches")
            if sub.batch_wait_timeout_s >= self.limits.request_timeout_s:
                raise ValueError(f"{name}.batch_wait_timeout_s must be far below limits.request_timeout_s")
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return self


class MineConfig(_Strict):
    """Hard-negative mining (jobs/mine_negatives.py): each training query searches the corpus index and keeps
    ``num_negatives`` pages from a rank window that are neither its positive nor too close to it."""

    index: str | None = Field(
        None, description="The corpus index to search (the embedding job's output). None = index.output."
    )
    model: str | None = Field(
        None, description="Query and page embedder. None = the model the index was built with (its manifest); another "
        "model is refused unless it is byte-identical."
    )
    queries: SourceConfig | None = Field(None, description="Triplets whose queries are mined. None = data.train.")
    output: str | None = Field(
        None, description="Folder or URI for the mined triplets (Parquet) and rejects. None = <run storage>/<run "
        "name>/mined."
    )
    num_negatives: PositiveInt = Field(3, description="Hard negatives kept per query.")
    rank_min: PositiveInt = Field(
        1, description="First rank (1-based) a negative may come from; skip the top ranks to avoid false negatives."
    )
    rank_max: PositiveInt = Field(30, description="Last rank a negative may come from.")
    margin: float | None = Field(
        0.05, description="Drop candidates whose score is within this of the positive's (score >= positive - "
        "margin): likely unlabeled positives. None keeps every candidate that is not the positive or a copy of it."
    )
    duplicate_similarity: float = Field(
        0.98, gt=0, le=1, description="Drop candidates at least this similar (cosine, page to page) to the positive: "
        "near-duplicates of it (the positive itself is recognised by its content key). A multi-vector index: the mean "
        "over the positive's token vectors of their best cosine with the candidate's."
    )
    sampling: Literal["top", "random"] = Field(
        "top", description="Which eligible pages of the window to keep: the best-ranked (hardest), or a random sample "
        "(a mix of hard and medium negatives; reproducible: seeded per row)."
    )
    seed: int = Field(0, description="Seed of the 'random' sampling.")
    batch_size: PositiveInt = Field(32, description="Queries per embedding and search call.")
    actors: PositiveInt = Field(1, description="Mining actors (one GPU each when scaling.use_gpu).")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per mining actor (its torch threads on CPU).")

    @model_validator(mode="after")
    def _window(self) -> MineConfig:
        if self.rank_min > self.rank_max:
            raise ValueError(f"rank_min ({self.rank_min}) exceeds rank_max ({self.rank_max})")
        if self.rank_max - self.rank_min + 1 < self.num_negatives:
            raise ValueError(f"the rank window {self.rank_min}..{self.rank_max} holds fewer pages than num_negatives "
                             f"({self.num_negatives})")
        return self


DEFAULT_QUESTION_PROMPT = (
    "You write the questions people type into a search box to find this document page. Write {n} different "
    "questions that only this page answers: name the specific company, product, person, place, period or figure "
    "it shows, and never ask what the page shows or contains. Write them in the page's language, one per line, "
    "with no numbering and nothing else."
)


class VLMGeneratorConfig(_Strict):
    """``queries.generator: vlm``: a generative vision-language model writes questions from each page image."""

    model: str = Field("Qwen/Qwen3-VL-8B-Instruct", description="The VLM: hub id, folder or URI (a chat model).")
    builder: Literal["load", "tiny-qwen3vl-generator"] = Field(
        "load", description="'load' reads model; 'tiny-qwen3vl-generator' builds a tiny random-weight Qwen3-VL chat "
        "model into model when it is missing (tests and the demo: its text is gibberish)."
    )
    prompt: str = Field(DEFAULT_QUESTION_PROMPT, description="The instruction; {n} becomes queries.per_page.")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="'vllm': Ray Data LLM batch inference (ray.data.llm, GPU); 'transformers': generate() in "
        "an actor pool (CPU or GPU). 'auto' = vllm when scaling.use_gpu and vllm imports, else transformers."
    )
    max_tokens: PositiveInt = Field(256, description="Most tokens generated per page.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    max_pixels: PositiveInt = Field(1280 * 28 * 28, description="Most pixels of a page image the VLM sees.")
    batch_size: PositiveInt = Field(16, description="Pages per generation call.")
    replicas: PositiveInt = Field(1, description="Model replicas (actors or vLLM engines), one GPU each on GPU.")
    tensor_parallel_size: PositiveInt = Field(1, description="vLLM: GPUs per engine.")
    max_model_len: PositiveInt = Field(8192, description="vLLM: context length per request.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weight dtype.")
    cpus_per_actor: float = Field(1.0, gt=0, description="transformers engine: CPUs per actor (its torch threads).")


class QueriesConfig(_Strict):
    """Training data from unlabeled documents (jobs/make_training_data.py): pages → generated queries → filters →
    hard negatives mined with the base embedder → train and eval splits by document, and a dataset card."""

    sources: list[str] = Field(
        default_factory=list, description="Folders, files or URIs of PDFs, page images (an optional <file>.txt "
        "sidecar holds an image's text) and Parquet with image bytes, as index.sources; turned into pages by the "
        "corpus job's code."
    )
    output: str = Field("./training-data", description="Folder or URI of the dataset: train/, eval/, rejects, card.")
    generator: Literal["text", "vlm", "callable"] = Field(
        "text", description="'text': spans of the page's own text layer (no model; the CPU default). 'vlm': a "
        "generative VLM (queries.vlm). 'callable': queries.callable."
    )
    callable: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="generator 'callable': module:function(page: dict) -> list[str]; the page has doc_id, page, "
        "source, text and image (PNG bytes).",
    )
    per_page: PositiveInt = Field(3, description="Queries generated per page (at most).")
    text_kinds: list[Literal["title_figures", "table_row", "sentence"]] = Field(
        default_factory=lambda: ["title_figures", "table_row", "sentence"],
        description="generator 'text': the spans to draw queries from (ray_vdr/queries/text.py).",
    )
    vlm: VLMGeneratorConfig = Field(default_factory=VLMGeneratorConfig, description="generator 'vlm'.")
    min_words: PositiveInt = Field(3, description="Queries with fewer words are rejected (query_too_short).")
    max_words: PositiveInt = Field(40, description="Queries with more words are rejected (query_too_long).")
    max_chars: PositiveInt = Field(300, description="Queries with more characters are rejected (query_too_long).")
    boilerplate_share: float = Field(
        0.2, gt=0, le=1, description="A line on at least this share of the pages (and on boilerplate_min_pages) is "
        "boilerplate (headers, footers): no query is made from it, and a query that is one is rejected."
    )
    boilerplate_min_pages: PositiveInt = Field(3, description="Fewest pages a boilerplate line is on.")
    dedupe: bool = Field(True, description="Reject queries generated for more than one page (they single none out).")
    base_model: str | None = Field(
        None, description="The base embedder, which indexes the pages, checks consistency and mines negatives: a "
        "Sentence Transformers folder, URI or hub id. None = this config's model (built first when model.builder "
        "asks for a random-weight one)."
    )
    consistency_k: PositiveInt | None = Field(
        10, description="Keep a query only if the base embedder ranks its own page within the top k of the corpus "
        "(the round-trip filter). None = off."
    )
    num_negatives: int = Field(1, ge=0, le=8, description="Mined hard negatives per training row (the recipe: 1).")
    eval_negatives: int = Field(4, ge=0, le=8, description="Mined hard negatives per eval row (the reference: 4).")
    exclude_same_document: bool = Field(
        True, description="Never take a page of the query's own document as its negative (it may answer it too)."
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Split by_document: the share of the documents whose queries form the eval "
        "split. Split page_range: the share of each large document's pages held out (a contiguous range) to start "
        "with. 0 = no eval split."
    )
    split: Literal["auto", "by_document", "page_range"] = Field(
        "auto", description="How the eval split is held out. 'by_document': eval_fraction of the documents; no "
        "document is in both splits. 'page_range': a contiguous range of pages inside each large document, page_gap "
        "pages apart from its training pages, grown until the ranges hold min_eval_rows candidate queries. 'auto': "
        "by document, unless that leaves fewer than min_eval_rows candidate queries (one document holds most pages): "
        "then page ranges."
    )
    min_eval_rows: int = Field(
        50, ge=0, description="Fewest eval rows worth evaluating on: a split with fewer is logged as a WARNING and "
        "noted in the card, and split 'auto' falls back to page ranges."
    )
    page_gap: int = Field(
        2, ge=0, description="Split page_range: pages on each side of a document's eval range that are in neither "
        "split (their queries are dropped as split_gap): neighbouring pages share text, and a query of one finds "
        "the other."
    )
    seed: int = Field(0, description="Seeds the span choice, the split and the negatives' sampling.")
    batch_size: PositiveInt = Field(32, description="Pages per generation batch, queries per mining batch.")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs per generation task (text, callable).")

    @model_validator(mode="after")
    def _consistent(self) -> QueriesConfig:
        if self.generator == "callable" and not self.callable:
            raise ValueError("generator 'callable' needs callable: module:function")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) exceeds max_words ({self.max_words})")
        return self


class RerankerTrainConfig(TrainConfig):
    loss: Literal["bce"] = Field("bce", description="BinaryCrossEntropyLoss over positive and negative pairs.")
    per_device_batch_size: PositiveInt = Field(
        16, description="Triplet rows per optimizer step on each worker; each brings 1 + num_negatives pairs."
    )
    duplicate_free_batches: bool = Field(
        False, description="Pairs are scored independently (no in-batch negatives), so batches may repeat a page."
    )


class RerankerConfig(_Strict):
    """The multimodal reranker (jobs/train_reranker.py): trained on mined triplets with the embedder's machinery."""

    model: RerankerModelConfig = Field(default_factory=RerankerModelConfig, description="The reranker to train.")
    train: RerankerTrainConfig = Field(default_factory=RerankerTrainConfig, description="The training recipe.")
    data: SourceConfig | None = Field(
        None, description="Training triplets (query, image, negative_0..k-1). None = mine.output's triplets/."
    )
    num_negatives: PositiveInt | None = Field(
        None, description="Negative columns per training row. None = mine.num_negatives."
    )
    run_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name under run.storage_path (rerun to resume). None = <run.name>-reranker.",
    )
    scaling: ScalingConfig | None = Field(None, description="Ray Train workers. None = the scaling section.")


class EvalConfig(_Strict):
    """Two-stage evaluation (jobs/evaluate.py) on the eval split: embed only, then embed + rerank."""

    model: str | None = Field(None, description="The embedder. None = the model this config's training run saved.")
    reranker: str | None = Field(
        None, description="The reranker. None = the model this config's reranker run saved (embed-only if none)."
    )
    dim: PositiveInt | None = Field(None, description="Embedding dimension. None = output.truncate_dim or the model's.")
    rerank_depths: list[PositiveInt] = Field(
        default_factory=lambda: [10, 20, 50], description="First-stage candidates the reranker reorders."
    )
    batch_size: PositiveInt = Field(16, description="Inputs per embedding and reranker forward.")
    output: str | None = Field(
        None, description="Folder or URI for eval.json, eval.md and eval.png. None = <run storage>/<run name>/eval."
    )

    @model_validator(mode="after")
    def _depths(self) -> EvalConfig:
        if sorted(set(self.rerank_depths)) != self.rerank_depths:
            raise ValueError(f"rerank_depths must be unique and ascending, got {self.rerank_depths}")
        return self


class PromoteConfig(_Strict):
    """Model promotion (jobs/promote.py): re-embed the corpus with a candidate embedder, evaluate it against the live
    one on the eval split, and switch the endpoint (``serve.live``) to it only if NDCG@10 is not worse."""

    model: str | None = Field(
        None, description="The candidate embedder. None = the model this config's training saved."
    )
    output: str | None = Field(
        None, description="Folder or URI under which each candidate's index is built (one folder per generation). "
        "None = <run storage>/<run name>/generations."
    )
    min_delta: float = Field(
        0.0, description="Promote only if candidate NDCG@10 >= live NDCG@10 + min_delta (0 = not worse)."
    )
    endpoint: str | None = Field(
        None, description="The endpoint's URL, to confirm it serves the new generation. None = serve.host:serve.port "
        "+ route_prefix; skipped (with a message) when nothing answers there."
    )
    switch_timeout_s: float = Field(600.0, gt=0, description="How long to wait for the endpoint to switch.")
    eval_cpus: float = Field(1.0, gt=0, description="CPUs of the evaluation task (on a GPU when scaling.use_gpu).")


class BenchmarkModel(_Strict):
    """One model row of a benchmark: an embedder, and the reranker of its second stage."""

    embedder: str = Field(description="A Sentence Transformers embedder: folder, URI or hub id (encoded under the "
                          "model section's prompts, pixel bounds and trust_remote_code).")
    reranker: str | None = Field(None, description="A CrossEncoder reranker of its top candidates. None = embed only.")
    name: str | None = Field(None, description="Its label in the tables. None = the embedder's folder name.")


class BenchmarkConfig(_Strict):
    """Public benchmarks (jobs/benchmark.py): ViDoRe / MTEB-layout retrieval tasks scored as their leaderboards
    score them (graded NDCG), for each model, Matryoshka dimension and rerank depth."""

    tasks: list[str] = Field(
        default_factory=list, description="Suites (vidore-v1, vidore-v2, vidore-v3), hub dataset ids (vidore/...) "
        "read from data_dir, or folders/URIs of datasets in the BEIR layout (corpus/, queries/, qrels/) or ViDoRe "
        "V1's single-table layout."
    )
    data_dir: str | None = Field(
        None, description="Folder or URI holding hub datasets downloaded ahead of time, one folder per hub id "
        "(<data_dir>/vidore/esg_reports_v2). Nothing is downloaded by the benchmark."
    )
    split: str = Field("test", description="The split scored.")
    models: list[BenchmarkModel] = Field(
        default_factory=list, description="The models compared side by side. Empty = the base model "
        "(model.name_or_path) and the embedder this config's training saved, with its trained reranker."
    )
    dims: list[PositiveInt] | None = Field(
        None, description="Matryoshka dimensions scored. None = train.matryoshka_dims up to each model's dimension."
    )
    rerank_depths: list[PositiveInt] = Field(
        default_factory=lambda: [10], description="First-stage candidates the reranker reorders (per dimension)."
    )
    max_queries: PositiveInt | None = Field(None, description="Score only each task's first N judged queries.")
    batch_size: PositiveInt = Field(16, description="Queries per embedding forward; pairs per reranker forward.")
    cache: str | None = Field(
        None, description="Folder or URI of the corpus embeddings, one index per dataset and model, reused by "
        "reruns and later benchmarks. None = <run storage>/benchmark-cache."
    )
    output: str | None = Field(
        None, description="Folder or URI for benchmark.md, benchmark.json, benchmark.png and per-task results "
        "(a rerun skips tasks already scored with the same settings). None = <run storage>/<run name>/benchmark."
    )
    references: bool = Field(True, description="Print the published reference rows (quoted) beside the results.")
    cpus: float = Field(1.0, gt=0, description="CPUs of each scoring task (on a GPU when scaling.use_gpu).")

    @model_validator(mode="after")
    def _unique(self) -> BenchmarkConfig:
        if sorted(set(self.rerank_depths)) != self.rerank_depths:
            raise ValueError(f"rerank_depths must be unique and ascending, got {self.rerank_depths}")
        names = [m.name for m in self.models if m.name]
        if len(names) != len(set(names)):
            raise ValueError(f"benchmark.models: names must be unique, got {names}")
        return self


class SyntheticConfig(_Strict):
    output_dir: str = Field("./data/synthetic", description="Folder for the generated train/eval Parquet and JSONL.")
    train_queries: PositiveInt = Field(200, description="Training rows (query, page, hard negative).")
    eval_queries: PositiveInt = Field(40, description="Eval queries; the eval corpus holds 5 pages per query.")
    num_negatives: int = Field(1, ge=0, le=8, description="Hard negatives per training row.")
    eval_negatives: int = Field(4, ge=0, le=8, description="Hard negatives per eval row.")
    page_width: PositiveInt = Field(448, description="Rendered page width in pixels.")
    page_height: PositiveInt = Field(576, description="Rendered page height in pixels.")
    seed: int = Field(0, description="Everything generated is a function of this seed.")
    jsonl: bool = Field(True, description="Also write the images-folder + JSONL variant.")
    kind: Literal["triplets", "documents"] = Field(
        "triplets", description="'triplets': the labelled train/eval splits above. 'documents': unlabeled company "
        "reports as vector PDFs with a text layer (documents/), plus a held-out eval split of other documents' "
        "pages with their template questions (heldout/eval/): the own-documents loop's input "
        "(ray_vdr/data/documents.py)."
    )
    documents: PositiveInt = Field(100, description="'documents': unlabeled documents (one company each).")
    pages_per_document: PositiveInt = Field(5, le=16, description="'documents': pages per document (a year each).")
    heldout_documents: PositiveInt = Field(40, description="'documents': documents of the held-out eval split.")
    dpi: PositiveInt = Field(100, description="'documents': resolution the held-out pages are rasterised at (as "
                             "index.dpi rasterises the documents).")

    @model_validator(mode="after")
    def _enough_heldout_pages(self) -> SyntheticConfig:
        others = (self.heldout_documents - 1) * self.pages_per_document
        if self.kind == "documents" and others < self.eval_negatives:
            raise ValueError(f"heldout_documents: each held-out question needs {self.eval_negatives} negatives "
                             f"from the other held-out documents, which hold {others} pages")
        return self


class VDRConfig(_Strict):
    """A whole ray-vdr run. Sections mirror the jobs that read them."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The embedding model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and evaluation data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training recipe.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers and resources.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity, storage and fault tolerance.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="The saved artifact.")
    synthetic: SyntheticConfig | None = Field(
        None, description="Generate a synthetic dataset first (demo and tests). None = use data sources as they are."
    )
    index: IndexConfig = Field(default_factory=IndexConfig, description="Corpus embedding and the FAISS index.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The two-stage retrieval endpoint.")
    mine: MineConfig = Field(default_factory=MineConfig, description="Hard-negative mining from the corpus index.")
    reranker: RerankerConfig = Field(default_factory=RerankerConfig, description="The multimodal reranker.")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="Two-stage evaluation.")
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description="Model promotion on the live endpoint.")
    benchmark: BenchmarkConfig = Field(
        default_factory=BenchmarkConfig, description="Public benchmarks (ViDoRe / MTEB layouts)."
    )
    queries: QueriesConfig = Field(
        default_factory=QueriesConfig, description="Training data made from unlabeled documents."
    )

    def reranker_run(self) -> RunConfig:
        """The reranker's run: its own name (default ``<run.name>-reranker``) under the same storage."""
        return self.run.model_copy(update={"name": self.reranker.run_name or f"{self.run.name}-reranker"})

    @model_validator(mode="after")
    def _consistent(self) -> VDRConfig:
        dims = self.train.matryoshka_dims
        td = self.output.truncate_dim
        if dims and td is not None and td > dims[0]:
            raise ValueError(f"output.truncate_dim ({td}) exceeds the largest Matryoshka dim ({dims[0]})")
        if dims and td is not None and td not in dims:
            raise ValueError(f"output.truncate_dim ({td}) is not one of train.matryoshka_dims {dims}: "
                             "it was never trained")
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("train.precision 'fp16' needs scaling.use_gpu (CPU trains in fp32 or bf16)")
        if self.train.strategy == "deepspeed" and self.scaling.num_workers == 0:
            raise ValueError("train.strategy 'deepspeed' needs scaling.num_workers >= 1")
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        where = ".".join(x for x in (prefix, loc) if x) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        lines.append(f"  {where}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _parse_scalar(text: str) -> Any:
    """Parse an override value as YAML, so `1e-4`, `true`, `[64, 32]` and `null` get their natural types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:  # pragma: no cover - yaml accepts almost anything
        raise ConfigError(f"cannot parse override value {text!r}: {e}") from e


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied (missing sections are created)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return out


def _is_local_path(value: str) -> bool:
    return "://" not in value and (value.startswith((".", "/", "~")) or Path(value).expanduser().exists())


def _absolute(value: str, base: Path) -> str:
    return str((base / Path(value).expanduser()).resolve())


def resolve_paths(cfg: VDRConfig, base: Path | None = None) -> VDRConfig:
    """Make local paths absolute against ``base`` (default: the working directory) so every Ray worker agrees.

    Hub ids (``Qwen/Qwen3-VL-Embedding-2B``) and URIs (``s3://…``) are left alone; a model or data path counts as
    local when it starts with ``.``, ``/`` or ``~``, exists here, or names a folder a builder will create.
    """
    base = (base or Path.cwd()).resolve()
    m = cfg.model
    if m.builder != "load" or _is_local_path(m.name_or_path):
        m.name_or_path = _absolute(m.name_or_path, base)
    for src in (cfg.data.train, cfg.data.eval):
        if src is not None and src.format != "hf_hub" and "://" not in src.uri:
            src.uri = _absolute(src.uri, base)
    if cfg.data.rejects_path and "://" not in cfg.data.rejects_path:
        cfg.data.rejects_path = _absolute(cfg.data.rejects_path, base)
    if "://" not in cfg.run.storage_path:
        cfg.run.storage_path = _absolute(cfg.run.storage_path, base)
    if cfg.synthetic is not None:
        cfg.synthetic.output_dir = _absolute(cfg.synthetic.output_dir, base)
    ix = cfg.index
    ix.sources = [s if "://" in s else _absolute(s, base) for s in ix.sources]
    if ix.model is not None and _is_local_path(ix.model):
        ix.model = _absolute(ix.model, base)
    if "://" not in ix.output:
        ix.output = _absolute(ix.output, base)
    for section, names in ((cfg.serve, ("index", "model", "reranker")), (cfg.mine, ("index", "model", "output")),
                           (cfg.evaluate, ("model", "reranker", "output"))):
        for name in names:
            value = getattr(section, name)
            if value is not None and _is_local_path(value):
                setattr(section, name, _absolute(value, base))
    rm = cfg.reranker.model
    if rm.builder != "load" or _is_local_path(rm.name_or_path):
        rm.name_or_path = _absolute(rm.name_or_path, base)
    if rm.base_model and _is_local_path(rm.base_model):
        rm.base_model = _absolute(rm.base_model, base)
    qs = cfg.queries
    qs.sources = [s if "://" in s else _absolute(s, base) for s in qs.sources]
    if "://" not in qs.output:
        qs.output = _absolute(qs.output, base)
    if qs.base_model is not None and _is_local_path(qs.base_model):
        qs.base_model = _absolute(qs.base_model, base)
    if qs.vlm.builder != "load" or _is_local_path(qs.vlm.model):
        qs.vlm.model = _absolute(qs.vlm.model, base)
    for src in (cfg.mine.queries, cfg.reranker.data):
        if src is not None and src.format != "hf_hub" and "://" not in src.uri:
            src.uri = _absolute(src.uri, base)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> VDRConfig:
    """Load a YAML config, apply dotted overrides, validate, and make local paths absolute.

    Raises ConfigError naming each bad field.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return resolve_paths(VDRConfig.model_validate(data))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def dump_config(cfg: VDRConfig) -> str:
    """The fully resolved config as YAML (written next to every run for provenance)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
