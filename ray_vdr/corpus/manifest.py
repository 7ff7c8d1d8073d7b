"""The typed records of an index folder: its shards' binding (``embedding.json``), each version's manifest, and the
summaries of the jobs that change it (embed / sync, delete, compact). Pydantic only: no Ray, no FAISS.

Every stage that reads an index (mining, evaluation, promotion, the endpoint) reads these models, not dicts; the
JSON on disk is their ``model_dump``. Manifests written before a field existed still load: every field added since
the first versioned index has a default (tests/corpus/fixtures holds one written by the code of 2026-12-03).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_vdr.config import LateIndexConfig
from ray_vdr.models.binding import EmbedderBinding

__all__ = ["CompactSummary", "CorpusBinding", "DeleteSummary", "EmbedSummary", "IndexFiles", "IndexKind",
           "IndexManifest", "IndexShard", "LateIndexSpec", "PageCounts"]

INDEX_FILE, IDS_FILE = "index.faiss", "ids.parquet"


class LateIndexSpec(LateIndexConfig):
    """How a multi-vector index stores and finds pages (recorded in its binding: every run and reader must agree):
    ``index.late`` and the stored token vectors' dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_dim: int = Field(description="Dimension of the stored token vectors (the model's, or its truncation).")

    @model_validator(mode="after")
    def _binary_bytes(self) -> LateIndexSpec:
        if self.storage == "binary" and self.token_dim % 8:
            raise ValueError(f"index.late.storage 'binary' packs 8 dimensions a byte: the token vectors are "
                             f"{self.token_dim}-d; use fp16 or int8, or an index.dim divisible by 8")
        return self

    @property
    def fde_dim(self) -> int:
        return self.reps * 2 ** self.k_sim * min(self.d_proj, self.token_dim)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorpusBinding(_Record):
    """What every shard of an index folder shares (``embedding.json``, written by the first run): the embedder, the
    dimension, the rasterisation dpi and the page key scheme. A later run with other values would mix vector spaces."""

    model: EmbedderBinding
    dim: int = Field(description="Embedding dimension of the stored vectors.")
    dpi: int = Field(200, description="PDF pages are rasterised at this dpi.")
    keys: str | None = Field(None, description="The page key scheme (None: an index from before versions).")
    late: LateIndexSpec | None = Field(None, description="A multi-vector index: its token storage and first stage "
                                       "(None: one vector per page). ``dim`` is then its token vectors' dimension.")

    @property
    def vector_dim(self) -> int:
        """Dimension of the FAISS index's vectors: ``dim``, or a multi-vector index's FDE dimension."""
        return self.late.fde_dim if self.late else self.dim


class IndexKind(_Record):
    """The FAISS index type and its parameters (:class:`ray_vdr.corpus.faiss_index.IndexSpec`)."""

    type: str
    params: dict[str, Any] = Field(default_factory=dict)


class IndexFiles(_Record):
    """A version's files, relative to the index folder (an index from before versions: the top-level ones)."""

    index: str | None = Field(None, description="The FAISS index (None: every source rejected, no vectors).")
    ids: str = Field(IDS_FILE, description="Row i = vector i: key, doc_id, source, page, shard, row, live, metadata.")
    docs: str | None = Field(None, description="The version's documents.")
    quantizer: str | None = Field(None, description="A sharded IVF index: the coarse quantizer its shards share.")


class IndexShard(_Record):
    """One shard of a sharded index: its own FAISS index over the pages of the documents hashed to it; its positions
    are ``offset`` … ``offset + vectors - 1`` of the version's ids (which hold the shards in order)."""

    shard: int
    index: str | None = Field(None, description="Its FAISS index, relative to the index folder (None: no vectors).")
    vectors: int = 0
    offset: int = 0
    live_pages: int | None = None
    index_bytes: int = 0
    action: str = Field("built", description="What this version did to it: built, extended, rebuilt (its removed "
                        "pages dropped), kept (its files are the previous version's).")
    build_seconds: float = 0.0
    peak_rss_bytes: int | None = Field(None, description="Peak resident memory of the task that built it.")
    start_rss_bytes: int | None = Field(None, description="Resident memory of that task before it read a vector.")


class PageCounts(_Record):
    added: int = 0
    removed: int = 0
    unchanged: int = 0


class CompactSummary(_Record):
    """``ray-vdr compact`` (or an automatic compaction): removed pages dropped for good."""

    version: int
    removed_pages_dropped: int
    vectors: int
    retired_shards: int
    shards_rebuilt: list[int] = Field(default_factory=list, description="A sharded index: the shards rebuilt.")


class EmbedSummary(_Record):
    """One run of the embedding job (``ray-vdr embed``): what changed, what it embedded, how fast."""

    mode: str
    source_files: int
    sources_read: int = Field(0, description="Source files read and hashed: new ones, and those whose size or "
                              "modification time changed (all of them with index.rehash).")
    source_bytes_read: int = 0
    documents: dict[str, int] = Field(description="added, updated, removed, unchanged, metadata_updated, rejected.")
    pages: PageCounts
    pages_embedded: int
    pages_rejected: int
    pages_done_before: int
    documents_rejected: list[dict[str, Any]] = Field(default_factory=list, description="The first 100, with reasons.")
    duplicates_removed: int = 0
    batches: int = 0
    stream_seconds: float = 0.0
    embed_seconds: float = 0.0
    pages_per_second: float = 0.0
    steady_pages_per_second: float = 0.0
    compaction: CompactSummary | None = None
    shards_changed: list[int] = Field(default_factory=list, description="A sharded index: the shards this run built, "
                                      "extended or rebuilt.")
    version: int | None = None
    index_vectors: int | None = None
    live_pages: int | None = None
    index_type: str | None = None
    index_bytes: int | None = None
    seconds: float | None = None


class DeleteSummary(_Record):
    """``ray-vdr delete`` / ``POST /admin/delete``: the documents removed and the version that no longer has them."""

    version: int
    documents_removed: int
    pages_removed: int
    matched: str = Field(description="What was asked for: doc_ids, sources, filter.")
    removed_doc_ids: list[str] = Field(default_factory=list, description="The first 100 removed documents.")
    shards_changed: list[int] = Field(default_factory=list, description="A sharded index: the shards holding a "
                                      "removed page (the others' files are the previous version's).")
    compaction: CompactSummary | None = None


class IndexManifest(CorpusBinding):
    """One published version of an index (``versions/v-<n>/manifest.json``; ``manifest.json`` is the current one)."""

    index: IndexKind
    vectors: int = Field(description="Positions in the FAISS index, removed ones included.")
    index_bytes: int = 0
    shards: list[str] = Field(default_factory=list, description="The page shards the index covers, in order.")
    files: IndexFiles = Field(default_factory=lambda: IndexFiles(index=INDEX_FILE),
                              description="This version's files (an index from before versions: the top-level ones).")
    version: int | None = Field(None, description="None: an index from before versions.")
    previous_version: int | None = None
    operation: str | None = Field(None, description="sync, append, delete or compact.")
    extended: bool = False
    added_vectors: int = 0
    build_seconds: float = 0.0
    compacted: bool = False
    retired_shards: list[str] = Field(default_factory=list, description="Shards the next version deletes.")
    index_shards: list[IndexShard] = Field(default_factory=list, description="A sharded index: its shards, in "
                                           "position order (empty: one FAISS index, files.index).")
    thumbnail_side: int = Field(256, description="Served thumbnails' longest side.")
    normalized: bool = True
    metric: str = "inner_product"
    created_at: str | None = None
    updated_at: str | None = None
    sources: list[str] = Field(default_factory=list, description="The index's sources (what a promotion re-embeds).")
    documents: int | None = None
    live_pages: int | None = Field(None, description="Positions of live pages (None: every vector).")
    removed_pages: int = 0
    last_run: EmbedSummary | None = None

    @property
    def live(self) -> int:
        return self.vectors if self.live_pages is None else self.live_pages

    @property
    def removed_share(self) -> float:
        total = self.live + self.removed_pages
        return self.removed_pages / total if total else 0.0

    @property
    def shard_count(self) -> int:
        """Shards of this version (1: an unsharded index)."""
        return len(self.index_shards) or 1

    def binding(self) -> CorpusBinding:
        return CorpusBinding(model=self.model, dim=self.dim, dpi=self.dpi, keys=self.keys, late=self.late)
