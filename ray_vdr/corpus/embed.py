"""The corpus embedding job: page sources → Ray Data → embedding actors → Parquet shards → FAISS index.

Pipeline (streaming; the driver holds file names and per-batch counts, never pages)::

    list files ─► flat_map: read, hash, skip known, decode / rasterise PDF pages (CPU tasks)
               ─► map_batches(PageEmbedder): encode_document of the decoded pixels, truncate, normalise, write
                  one shard (actor pool)
               ─► driver: per-batch counts → progress and summary
    then: drop duplicate keys across shards, build or extend the FAISS index (a Ray task, on a GPU when there is one)

Output under ``index.output``: the index folder of :mod:`ray_vdr.corpus.store` (page and reject shards, the FAISS
index and its ids, the manifest with the embedder's binding).

Exactly-once: every page has a content key (:mod:`ray_vdr.corpus.pages`); a shard is named by the hash of its keys and
published atomically, so a batch retried after an actor died rewrites the same shard; keys already in pages/ or
rejects/ are skipped on a rerun; and a final pass keeps the first shard holding any key. Adding files to the
sources and rerunning embeds only the new pages and adds them to the index.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ray_vdr.cluster import chaos_strike
from ray_vdr.config import ImageLimits, VDRConfig
from ray_vdr.corpus.manifest import CorpusBinding, EmbedSummary, IndexManifest, LateIndexSpec, PageCounts
from ray_vdr.corpus.pages import PAGE_SCHEMA, SourceFile, expand_file, list_sources
from ray_vdr.corpus.store import (
    EMBEDDING_FILE,
    PAGES,
    REJECTS,
    IndexMismatch,
    check_manifest,
    known_keys,
    read_manifest,
    shards,
)
from ray_vdr.corpus.sync import hash_file
from ray_vdr.corpus.versions import docs_table
from ray_vdr.models.binding import EmbedderBinding
from ray_vdr.storage import dedupe_parts, is_file, now_iso, part_name, read_json, write_bytes, write_table

logger = logging.getLogger(__name__)

__all__ = ["IndexResult", "PageEmbedder", "run"]

KEY_SCHEME = "source-scoped-v2"  # page keys scoped to their source, versions (recorded in embedding.json)
REJECT_COLUMNS = ["key", "file_hash", "doc_id", "source", "page", "reason", "detail"]


@dataclass
class IndexResult:
    output: str
    manifest: IndexManifest
    summary: EmbedSummary


# ---------------------------------------------------------------------------------------------------------------------
# the Ray Data stages


def page_table(rows: pa.Table, embeddings, dim: int, tokens: list[bytes] | None = None) -> pa.Table:
    """A page shard: the pages' rows and their ``embedding`` (a multi-vector index: the FDE, and the packed token
    vectors in ``tokens``)."""
    import numpy as np

    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    emb = pa.FixedSizeListArray.from_arrays(flat, dim)
    cols = ["key", "content", "file_hash", "doc_id", "source", "page", "width", "height", "image", "thumbnail", "text",
            "row_metadata"]
    table = rows.select(cols).append_column("embedding", emb)
    return table if tokens is None else table.append_column("tokens", pa.array(tokens, pa.large_binary()))


def _expand(row: dict[str, Any], *, dpi: int, limits: dict, image_column: str,
            id_column: str | None, text_column: str | None, known_ref: list) -> Iterator[dict[str, Any]]:
    """flat_map stage: one source file → its pages and rejects (PAGE_SCHEMA rows), streamed (a 500-page PDF is
    never held whole)."""
    from ray_vdr.cluster import fetch_once

    known = fetch_once(known_ref[0], frozenset)
    f = SourceFile(row["uri"], row["doc_id"], row["kind"], row["sidecar"], row["meta_sidecar"], row["file_hash"])
    yield from expand_file(f, dpi=dpi, limits=ImageLimits(**limits), image_column=image_column,
                           id_column=id_column, text_column=text_column, known=known.__contains__)


def decoded_pages(pages: pa.Table) -> list:
    """The pages the expansion stage decoded (its ``pixels``, RGB), as images, read from the block without a copy into
    Python bytes: the embedder does not decode them again."""
    import numpy as np
    from PIL import Image

    pixels = pages.column("pixels").combine_chunks()  # large_binary: 64-bit offsets into one data buffer
    _, offsets, data = pixels.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[pixels.offset:pixels.offset + len(pixels) + 1]
    data = memoryview(data)
    return [Image.frombuffer("RGB", (w, h), data[offsets[i]:offsets[i + 1]], "raw", "RGB", 0, 1)
            for i, (w, h) in enumerate(zip(pages.column("width").to_pylist(), pages.column("height").to_pylist(),
                                           strict=True))]


class PageEmbedder:
    """Actor-pool stage: embeds a batch of pages and publishes it as one shard, returning only counts.

    Writing here keeps page images out of the driver and makes the shard the unit of exactly-once: its name is the
    hash of its keys, so a batch retried after this actor died rewrites the same file.
    """

    def __init__(self, binding: dict, model_cfg: dict, dim: int, output: str, use_gpu: bool, cpus: float = 1.0,
                 chaos: dict | None = None, late: dict | None = None):
        from ray_vdr.cluster import worker_device, worker_logging
        from ray_vdr.models.encoder import IndexEncoder
        from ray_vdr.models.load import Runtime

        worker_logging()
        runtime = Runtime(model_cfg["dtype"], model_cfg["attn_implementation"], worker_device(use_gpu, cpus))
        from ray_vdr.corpus.late import fde_of

        self.encoder = IndexEncoder(EmbedderBinding.model_validate(binding), runtime, dim)
        self.late = LateIndexSpec.model_validate(late) if late else None
        self.fde = fde_of(self.late) if self.late else None
        self.dim = self.late.fde_dim if self.late else dim  # the stored vectors' (FAISS's) dimension
        self.output, self.chaos, self.batches = output, chaos or {}, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        # one schema for every shard, whatever Ray Data inferred for this block (an all-reject block has null columns)
        batch = batch.select(PAGE_SCHEMA.names).cast(PAGE_SCHEMA)
        ok = pc.is_null(batch.column("reason"))
        pages, rejects = batch.filter(ok), batch.filter(pc.invert(ok))
        rejected = [rejects.select(REJECT_COLUMNS)] if rejects.num_rows else []
        embedded = None
        if pages.num_rows:
            images = decoded_pages(pages)
            try:
                vectors, tokens = self._encode(images)
            except Exception as e:  # one bad page must not fail the batch: find it
                logger.warning("batch failed to embed (%s); embedding its %d pages one by one", e, len(images))
                pages, vectors, tokens, failed = self._one_by_one(pages, images)
                if failed is not None:
                    rejected.append(failed)
            if pages.num_rows:
                embedded = page_table(pages, vectors, self.dim, tokens)
        name = part_name(batch.column("key").to_pylist())
        if embedded is not None:
            write_table(embedded, f"{self.output}/{PAGES}/{name}")
        if rejected:
            write_table(pa.concat_tables(rejected), f"{self.output}/{REJECTS}/{name}")
        self.batches += 1
        chaos_strike(self.chaos, self.batches, "embedding")
        return pa.table({"shard": [name], "pages": [embedded.num_rows if embedded is not None else 0],
                         "rejects": [sum(t.num_rows for t in rejected)],
                         "seconds": [time.perf_counter() - start]})

    def _encode(self, images) -> tuple[Any, list[bytes] | None]:
        """The pages' vectors and, for a multi-vector index, their packed token vectors (the vectors: their FDEs)."""
        if self.late is None:
            return self.encoder.encode_pages(images), None
        from ray_vdr.corpus.late import pack_tokens

        tokens = self.encoder.encode_pages(images, pooling=self.late.pooling)
        return self.fde.encode_each(tokens, doc=True), [pack_tokens(t, self.late.storage) for t in tokens]

    def _one_by_one(self, pages: pa.Table, images):
        import numpy as np

        keep, vectors, tokens, failed = [], [], [], []
        for i, img in enumerate(images):
            try:
                vector, token = self._encode([img])
                vectors.append(vector[0])
                tokens.extend(token or [])
                keep.append(i)
            except Exception as e:
                row = pages.slice(i, 1).select(REJECT_COLUMNS[:5])
                failed.append(row.append_column("reason", pa.array(["embed_failed"]))
                              .append_column("detail", pa.array([f"{type(e).__name__}: {e}"[:500]])))
        out = pages.take(keep)
        return out, np.stack(vectors) if vectors else np.zeros((0, self.dim), np.float32), (
            tokens if self.late else None), (pa.concat_tables(failed) if failed else None)


# ---------------------------------------------------------------------------------------------------------------------
# driver


def resolve_model(cfg: VDRConfig) -> str:
    """The embedder the job uses: index.model, else the model this config's training run saved."""
    uri = cfg.index.model or cfg.run.uri("model")
    if cfg.index.model is None and not is_file(f"{uri}/modules.json"):
        raise FileNotFoundError(f"index.model is not set and the training run has no saved model at {uri}: train "
                                "first (jobs/train_embedder.py) or set index.model to a Sentence Transformers model")
    return uri


def index_binding(cfg: VDRConfig, uri: str) -> EmbedderBinding:
    """What the manifest records of the embedder: how it encodes pages (and, later, queries) under this config
    (:func:`ray_vdr.models.load.embedder_binding`) and its identity: the full fingerprint, computed once, here, and the
    cheap signature loaders compare."""
    from ray_vdr.models.load import embedder_binding, local_model, model_fingerprint, model_signature

    local = local_model(uri)
    return embedder_binding(cfg.model, uri).model_copy(
        update={"fingerprint": model_fingerprint(local), "signature": model_signature(local)})


def _check_output(ix, binding: CorpusBinding) -> None:
    """Shards already under the output (an index, or an interrupted run) must come from the same model, dimension,
    dpi and key scheme, or the index would mix vector spaces: the first run records them, every later run is checked
    against them."""
    data = read_json(f"{ix.output}/{EMBEDDING_FILE}")
    if data is None:
        write_bytes(binding.model_dump_json(indent=2).encode(), f"{ix.output}/{EMBEDDING_FILE}")
        return
    earlier = CorpusBinding.model_validate(data)
    check_manifest(earlier, fingerprint=binding.model.fingerprint, dim=binding.dim,
                   where=f"the corpus at {ix.output}")
    if earlier.late != binding.late:
        raise IndexMismatch(f"the corpus at {ix.output} stores {_late_text(earlier.late)}, but this run would "
                            f"store {_late_text(binding.late)}: keep its index.late settings or embed into a new "
                            "index.output")
    if earlier.dpi != ix.dpi:
        raise IndexMismatch(f"the corpus at {ix.output} was rasterised at {earlier.dpi} dpi, not "
                            f"{ix.dpi}: keep index.dpi={earlier.dpi} or embed into a new index.output")
    if earlier.keys != KEY_SCHEME:
        raise IndexMismatch(f"the corpus at {ix.output} was built by an older ray-vdr (page keys not scoped to "
                            "their source, no versions): embed into a new index.output")


def _late_text(late: LateIndexSpec | None) -> str:
    return "one vector per page" if late is None else \
        f"token vectors ({late.model_dump_json(exclude={'candidates'})})"


def _hash_sources(files: list[SourceFile], ix) -> list[dict[str, Any]]:
    """Every source's content hash and sidecar, from a Ray Data pass (bytes read, nothing decoded); one small record
    per file comes back to the driver."""
    import ray

    if not files:
        return []
    tasks = max(1, min(math.ceil(len(files) / (4 * ix.files_per_task)), 1000))
    ds = ray.data.from_items([asdict(f) for f in files], override_num_blocks=tasks)
    return sorted(ds.map(hash_file, num_cpus=ix.decode_cpus).iter_rows(), key=lambda r: r["uri"])


def _embed_stream(cfg: VDRConfig, files: list[SourceFile], binding: CorpusBinding, known: set[str],
                  chaos: dict | None) -> dict[str, Any]:
    import ray

    ix = cfg.index
    use_gpu = cfg.scaling.use_gpu
    totals = {"pages": 0, "rejects": 0, "batches": 0, "embed_seconds": 0.0, "stream_seconds": 0.0, "steady": 0.0}
    if not files:
        return totals
    tasks = max(1, min(math.ceil(len(files) / ix.files_per_task), 1000))
    ds = ray.data.from_items([asdict(f) for f in files], override_num_blocks=tasks)
    ds = ds.flat_map(_expand, fn_kwargs={
        "dpi": ix.dpi, "limits": cfg.data.image.model_dump(),
        "image_column": ix.parquet_image_column, "id_column": ix.parquet_id_column,
        "text_column": ix.parquet_text_column, "known_ref": [ray.put(known)]}, num_cpus=ix.decode_cpus)
    ds = ds.map_batches(PageEmbedder, batch_size=ix.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=ix.actors),
                        num_cpus=ix.cpus_per_actor, num_gpus=1 if use_gpu else 0,
                        fn_constructor_kwargs={"binding": binding.model.model_dump(),
                                               "model_cfg": cfg.model.model_dump(), "dim": binding.dim,
                                               "output": ix.output, "use_gpu": use_gpu, "cpus": ix.cpus_per_actor,
                                               "chaos": chaos,
                                               "late": binding.late.model_dump() if binding.late else None})
    t0 = time.perf_counter()
    first: tuple[float, int] | None = None  # after the first batch: start-up (model loading) excluded
    now = t0
    for row in ds.iter_rows():
        totals["pages"] += row["pages"]
        totals["rejects"] += row["rejects"]
        totals["batches"] += 1
        totals["embed_seconds"] += row["seconds"]
        now = time.perf_counter()
        first = first or (now, totals["pages"])
        if totals["batches"] % 50 == 0:
            logger.info("%d batches: %d pages embedded, %d rejected (%.1f pages/s)", totals["batches"],
                        totals["pages"], totals["rejects"], totals["pages"] / (now - t0))
    totals["stream_seconds"] = time.perf_counter() - t0
    totals["steady"] = (totals["pages"] - first[1]) / (now - first[0]) if first and now > first[0] else 0.0
    return totals


def _shards_changed(new: IndexManifest, old: IndexManifest | None) -> list[int]:
    """The shards a version built, extended or rebuilt, or whose live pages changed (a removed document's)."""
    before = {r.shard: r.live_pages for r in old.index_shards} if old is not None and \
        len(old.index_shards) == len(new.index_shards) else {}
    return [r.shard for r in new.index_shards if r.action != "kept" or before.get(r.shard) != r.live_pages]


def run(cfg: VDRConfig, chaos: dict | None = None) -> IndexResult:
    """Sync (or append) ``cfg.index.sources`` into ``cfg.index.output``: embed new and changed files, remove the pages
    of changed and deleted ones (sync), build or extend the FAISS index, and publish a new version."""
    import ray

    from ray_vdr.cluster import init_ray
    from ray_vdr.corpus.build import build_version, read_all_ids
    from ray_vdr.corpus.metadata import read_metadata_table
    from ray_vdr.corpus.shards import build_sharded, planned_shards
    from ray_vdr.corpus.sync import compact_if_needed, plan, reuse_hashes
    from ray_vdr.corpus.versions import live_ids, next_version, publish, read_docs, retired_shards
    from ray_vdr.models.load import embedding_dimension, local_model

    ix = cfg.index
    if not ix.sources:
        raise FileNotFoundError("index.sources is empty: give folders, files or URIs of page images, PDFs or Parquet")
    start = time.time()
    uri = resolve_model(cfg)
    files = list_sources(ix.sources)
    table = read_metadata_table(ix.metadata) if ix.metadata else None
    info = index_binding(cfg, uri)
    full_dim = embedding_dimension(local_model(uri))
    dim = min(ix.dim or cfg.output.truncate_dim or info.truncate_dim or full_dim, full_dim)
    late = LateIndexSpec(token_dim=dim, **ix.late.model_dump()) if info.multi_vector else None
    binding = CorpusBinding(model=info, dim=dim, dpi=ix.dpi, keys=KEY_SCHEME, late=late)
    _check_output(ix, binding)
    init_ray()
    current = read_manifest(ix.output)
    current_docs = read_docs(ix.output, current)
    listed = _hash_sources(files if ix.rehash else reuse_hashes(files, current_docs), ix)
    read = [r for r in listed if r["hashed"]]
    logger.info("%d of %d source files read and hashed (%s bytes); the others' size and modification time are "
                "unchanged since the last sync", len(read), len(files), f"{sum(r['bytes_read'] for r in read):,}")
    the_plan = plan(listed, current_docs, ix.mode, table)
    for r in the_plan.rejects:
        logger.warning("rejected %s: %s (%s)", r["source"], r["reason"], r["detail"])
    retired = retired_shards(current)
    known = known_keys(ix.output, skip=retired)
    logger.info("%s %d source files into %s with %s (dim %d): %s; embedding %d files", ix.mode, len(files),
                ix.output, uri, dim, the_plan.documents, len(the_plan.embed))
    totals = _embed_stream(cfg, the_plan.embed, binding, known, chaos)
    # normally a no-op: a batch retried after a failure and cut differently
    removed = dedupe_parts([f"{ix.output}/{PAGES}", f"{ix.output}/{REJECTS}"], "key",
                           first=set(current.shards) if current else set())
    names = [n for n in shards(ix.output, PAGES) if n not in retired]
    version = next_version(current)
    gpus = 1 if cfg.scaling.use_gpu else 0  # FAISS uses it if it can
    n_shards = planned_shards(ix, ix.output, names, current)
    if n_shards > 1:  # a task per shard, each streaming its own pages' vectors
        fields, ids = build_sharded(ix.output, names, binding.vector_dim, ix, current, version, n_shards,
                                    num_gpus=gpus)
    else:
        build = ray.remote(build_version).options(num_gpus=gpus)
        fields, ids = ray.get(build.remote(ix.output, names, binding.vector_dim, ix.model_dump(), current, version))
    docs = docs_table(the_plan.docs)
    ids = live_ids(ids, docs)
    before = set(read_all_ids(ix.output, current).filter(pc.field("live")).column("key").to_pylist()) \
        if current and current.version is not None else set()
    after = set(ids.filter(pc.field("live")).column("key").to_pylist())
    summary = EmbedSummary(
        mode=ix.mode, source_files=len(files), sources_read=len(read),
        source_bytes_read=sum(r["bytes_read"] for r in read), documents=the_plan.documents,
        pages=PageCounts(added=len(after - before), removed=len(before - after), unchanged=len(after & before)),
        pages_embedded=totals["pages"], pages_rejected=totals["rejects"], pages_done_before=len(known),
        documents_rejected=the_plan.rejects[:100], duplicates_removed=removed, batches=totals["batches"],
        stream_seconds=round(totals["stream_seconds"], 2), embed_seconds=round(totals["embed_seconds"], 2),
        pages_per_second=round(totals["pages"] / totals["stream_seconds"], 2) if totals["stream_seconds"] else 0.0,
        steady_pages_per_second=round(totals["steady"], 2),
    )
    built = fields.pop("files")  # the version's index file (None: no vectors at all)
    manifest = IndexManifest(**binding.model_dump(), **fields, version=version, operation=ix.mode,
                             files={"index": built.get("index"), "quantizer": built.get("quantizer")},
                             thumbnail_side=ix.thumbnail_side, updated_at=now_iso(), sources=ix.sources,
                             created_at=current.created_at if current else now_iso(), last_run=summary)
    manifest = publish(ix.output, manifest, docs, ids, current)
    summary.shards_changed = _shards_changed(manifest, current)
    summary.compaction = compact_if_needed(ix.output, ix.model_dump(), ix.compact_removed_share)
    if summary.compaction is not None:
        manifest = read_manifest(ix.output)
    summary = summary.model_copy(update={
        "version": manifest.version, "index_vectors": manifest.vectors, "live_pages": manifest.live,
        "index_type": manifest.index.type, "index_bytes": manifest.index_bytes,
        "seconds": round(time.time() - start, 2)})
    logger.info("index summary: %s", summary.model_dump_json(include={"documents", "pages", "version", "live_pages"}))
    return IndexResult(ix.output, manifest, summary)
