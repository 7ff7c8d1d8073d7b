"""The corpus embedding job: page sources → Ray Data → embedding actors → Parquet shards → FAISS index.

Pipeline (streaming; the driver holds file names and per-batch counts, never pages)::

    list files ─► flat_map: read, hash, skip known, decode / rasterise PDF pages (CPU tasks)
               ─► map_batches(PageEmbedder): encode_document, truncate, normalise, write one shard (actor pool)
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

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_vdr.cluster import chaos_strike
from ray_vdr.config import ImageLimits, VDRConfig
from ray_vdr.corpus.pages import PAGE_SCHEMA, SourceFile, expand_file, list_sources
from ray_vdr.corpus.store import (
    EMBEDDING_FILE,
    IDS_FILE,
    MANIFEST,
    PAGES,
    REJECTS,
    IndexMismatch,
    check_manifest,
    known_keys,
    now_iso,
    read_ids,
    read_manifest,
    read_shard,
    shards,
)
from ray_vdr.storage import dedupe_parts, fs_path, is_file, part_name, read_bytes, write_bytes, write_table

logger = logging.getLogger(__name__)

__all__ = ["IndexResult", "PageEmbedder", "run"]

REJECT_COLUMNS = ["key", "doc_id", "source", "page", "reason", "detail"]


@dataclass
class IndexResult:
    output: str
    manifest: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# the Ray Data stages


def page_table(rows: pa.Table, embeddings, dim: int) -> pa.Table:
    import numpy as np

    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    emb = pa.FixedSizeListArray.from_arrays(flat, dim)
    cols = ["key", "doc_id", "source", "page", "width", "height", "image", "thumbnail", "text"]
    return rows.select(cols).append_column("embedding", emb)


def _expand(row: dict[str, Any], *, dpi: int, limits: dict, thumb_side: int, image_column: str,
            id_column: str | None, text_column: str | None, known_ref: list) -> Iterator[dict[str, Any]]:
    """flat_map stage: one source file → its pages and rejects (PAGE_SCHEMA rows), streamed (a 500-page PDF is
    never held whole)."""
    from ray_vdr.cluster import fetch_once

    known = fetch_once(known_ref[0], frozenset)
    f = SourceFile(row["uri"], row["doc_id"], row["kind"], row["sidecar"])
    yield from expand_file(f, dpi=dpi, limits=ImageLimits(**limits), thumb_side=thumb_side, image_column=image_column,
                           id_column=id_column, text_column=text_column, known=known.__contains__)


class PageEmbedder:
    """Actor-pool stage: embeds a batch of pages and publishes it as one shard, returning only counts.

    Writing here keeps page images out of the driver and makes the shard the unit of exactly-once: its name is the
    hash of its keys, so a batch retried after this actor died rewrites the same file.
    """

    def __init__(self, binding: dict, model_cfg: dict, dim: int, output: str, use_gpu: bool, cpus: float = 1.0,
                 chaos: dict | None = None):
        from ray_vdr.cluster import worker_device, worker_logging
        from ray_vdr.models.load import load_embedder

        worker_logging()
        device = worker_device(use_gpu, cpus)
        self.model = load_embedder(binding, dtype=model_cfg["dtype"], device=device,
                                   attn_implementation=model_cfg["attn_implementation"],
                                   trust_remote_code=model_cfg["trust_remote_code"])
        self.dim, self.output, self.chaos, self.batches = dim, output, chaos or {}, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        import io

        from PIL import Image

        start = time.perf_counter()
        # one schema for every shard, whatever Ray Data inferred for this block (an all-reject block has null columns)
        batch = batch.select(PAGE_SCHEMA.names).cast(PAGE_SCHEMA)
        ok = pc.is_null(batch.column("reason"))
        pages, rejects = batch.filter(ok), batch.filter(pc.invert(ok))
        rejected = [rejects.select(REJECT_COLUMNS)] if rejects.num_rows else []
        embedded = None
        if pages.num_rows:
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pages.column("image").to_pylist()]
            try:
                vectors = self._encode(images)
            except Exception as e:  # one bad page must not fail the batch: find it
                logger.warning("batch failed to embed (%s); embedding its %d pages one by one", e, len(images))
                pages, vectors, failed = self._one_by_one(pages, images)
                if failed is not None:
                    rejected.append(failed)
            if pages.num_rows:
                embedded = page_table(pages, vectors, self.dim)
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

    def _encode(self, images):
        return self.model.encode_document(images, batch_size=len(images), truncate_dim=self.dim,
                                          normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    def _one_by_one(self, pages: pa.Table, images):
        import numpy as np

        keep, vectors, failed = [], [], []
        for i, img in enumerate(images):
            try:
                vectors.append(self._encode([img])[0])
                keep.append(i)
            except Exception as e:
                row = pages.slice(i, 1).select(REJECT_COLUMNS[:4])
                failed.append(row.append_column("reason", pa.array(["embed_failed"]))
                              .append_column("detail", pa.array([f"{type(e).__name__}: {e}"[:500]])))
        out = pages.take(keep)
        return out, np.stack(vectors) if vectors else np.zeros((0, self.dim), np.float32), (
            pa.concat_tables(failed) if failed else None)


# ---------------------------------------------------------------------------------------------------------------------
# after the stream: duplicates, index


def _index_vectors(output: str, names: list[str]):
    import numpy as np

    tables = [read_shard(output, PAGES, n, ["key", "doc_id", "source", "page", "embedding"]) for n in names]
    ids, vecs = [], []
    for name, t in zip(names, tables, strict=True):
        if not t.num_rows:
            continue
        emb = t.column("embedding").combine_chunks()
        vecs.append(emb.values.to_numpy(zero_copy_only=False).reshape(t.num_rows, emb.type.list_size))
        ids.append(t.drop_columns(["embedding"]).append_column("shard", pa.array([name] * t.num_rows))
                   .append_column("row", pa.array(range(t.num_rows), pa.int32())))
    if not vecs:
        return None, np.zeros((0, 0), np.float32)
    return pa.concat_tables(ids), np.concatenate(vecs).astype(np.float32)


def build_or_extend_index(output: str, base_manifest: dict[str, Any], index_cfg: dict) -> dict[str, Any]:
    """Build the FAISS index over every page shard, or add the new shards to the existing index when its type still
    fits the corpus size; write index.faiss, ids.parquet and manifest.json. Runs as a Ray task (GPU if any)."""
    from ray_vdr.config import IndexConfig
    from ray_vdr.corpus.faiss_index import (
        INDEX_FILE,
        IndexSpec,
        add_to,
        build_index,
        choose_spec,
        read_index,
        write_index,
    )

    cfg = IndexConfig.model_validate(index_cfg)
    t0 = time.perf_counter()
    names = shards(output, PAGES)
    total = sum(pq.ParquetFile(fs_path(f"{output}/{PAGES}/{n}")[1],
                               filesystem=fs_path(output)[0]).metadata.num_rows for n in names)
    spec = choose_spec(total, base_manifest["dim"], cfg)
    old = read_manifest(output)
    # extend while the size still calls for the same type (an IVF quantiser stays valid as the corpus grows)
    extend = old is not None and old["index"]["type"] == spec.type and is_file(f"{output}/{INDEX_FILE}")
    if extend:
        spec = IndexSpec(old["index"]["type"], old["index"]["params"])
    with tempfile.TemporaryDirectory() as tmp:
        new = [n for n in names if n not in set(old["shards"])] if extend else names
        ids, vectors = _index_vectors(output, new)
        if extend:
            (Path(tmp) / INDEX_FILE).write_bytes(read_bytes(f"{output}/{INDEX_FILE}"))
            index = read_index(Path(tmp) / INDEX_FILE, old["index"])
            if len(vectors):
                add_to(index, vectors)
            old_ids = read_ids(output)
            ids = pa.concat_tables([old_ids, ids]) if ids is not None else old_ids
        else:
            index = build_index(vectors, spec) if len(vectors) else None
        if index is not None:
            write_index(index, Path(tmp) / INDEX_FILE)
            write_bytes((Path(tmp) / INDEX_FILE).read_bytes(), f"{output}/{INDEX_FILE}")
            write_table(ids, f"{output}/{IDS_FILE}")
        size = (Path(tmp) / INDEX_FILE).stat().st_size if index is not None else 0
    manifest = {**base_manifest, "index": spec.as_dict(), "vectors": int(index.ntotal) if index else 0,
                "index_bytes": size, "shards": names, "extended": extend, "added_vectors": int(len(vectors)),
                "build_seconds": round(time.perf_counter() - t0, 3)}
    manifest["created_at"] = old["created_at"] if old is not None else base_manifest["updated_at"]
    write_bytes(json.dumps(manifest, indent=2).encode(), f"{output}/{MANIFEST}")
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# driver


def resolve_model(cfg: VDRConfig) -> str:
    """The embedder the job uses: index.model, else the model this config's training run saved."""
    uri = cfg.index.model or cfg.run.uri("model")
    if cfg.index.model is None and not is_file(f"{uri}/modules.json"):
        raise FileNotFoundError(f"index.model is not set and the training run has no saved model at {uri}: train "
                                "first (jobs/train_embedder.py) or set index.model to a Sentence Transformers model")
    return uri


def index_binding(cfg: VDRConfig, uri: str) -> dict[str, Any]:
    """What the manifest records of the embedder: how it encodes pages (and, later, queries) under this config
    (:func:`ray_vdr.models.load.embedder_binding`) and its identity: the full fingerprint, computed once, here, and the
    cheap signature loaders compare."""
    from ray_vdr.models.load import embedder_binding, local_model, model_fingerprint, model_signature

    local = local_model(uri)
    return {**embedder_binding(cfg.model, uri), "fingerprint": model_fingerprint(local),
            "signature": model_signature(local)}


def run(cfg: VDRConfig, chaos: dict | None = None) -> IndexResult:
    """Embed ``cfg.index.sources`` into ``cfg.index.output`` and build or extend its FAISS index."""
    import ray

    from ray_vdr.cluster import init_ray
    from ray_vdr.models.load import embedding_dimension, local_model

    ix = cfg.index
    if not ix.sources:
        raise FileNotFoundError("index.sources is empty: give folders, files or URIs of page images, PDFs or Parquet")
    start = time.time()
    uri = resolve_model(cfg)
    files = list_sources(ix.sources)
    info = index_binding(cfg, uri)
    full_dim = embedding_dimension(local_model(uri))
    dim = ix.dim or cfg.output.truncate_dim or info["truncate_dim"] or full_dim
    dim = min(dim, full_dim)
    # Shards already under the output (an index, or an interrupted run) must come from the same model, dimension and
    # dpi, or the index would mix vector spaces: the first run records them, every later run is checked against them.
    binding = {"model": info, "dim": dim, "dpi": ix.dpi}
    if is_file(f"{ix.output}/{EMBEDDING_FILE}"):
        earlier = json.loads(read_bytes(f"{ix.output}/{EMBEDDING_FILE}"))
        check_manifest(earlier, fingerprint=info["fingerprint"], dim=dim, where=f"the corpus at {ix.output}")
        if earlier["dpi"] != ix.dpi:
            raise IndexMismatch(f"the corpus at {ix.output} was rasterised at {earlier['dpi']} dpi, not "
                                f"{ix.dpi}: keep index.dpi={earlier['dpi']} or embed into a new index.output")
    else:
        write_bytes(json.dumps(binding, indent=2).encode(), f"{ix.output}/{EMBEDDING_FILE}")
    init_ray()
    known = known_keys(ix.output)
    logger.info("embedding %d source files into %s with %s (dim %d); %d pages already done", len(files), ix.output,
                uri, dim, len(known))
    use_gpu = cfg.scaling.use_gpu
    tasks = max(1, min(math.ceil(len(files) / ix.files_per_task), 1000))
    ds = ray.data.from_items([asdict(f) for f in files], override_num_blocks=tasks)
    ds = ds.flat_map(_expand, fn_kwargs={
        "dpi": ix.dpi, "limits": cfg.data.image.model_dump(), "thumb_side": ix.thumbnail_side,
        "image_column": ix.parquet_image_column, "id_column": ix.parquet_id_column,
        "text_column": ix.parquet_text_column, "known_ref": [ray.put(known)]}, num_cpus=ix.decode_cpus)
    ds = ds.map_batches(PageEmbedder, batch_size=ix.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=ix.actors),
                        num_cpus=ix.cpus_per_actor, num_gpus=1 if use_gpu else 0,
                        fn_constructor_kwargs={"binding": info,
                                               "model_cfg": cfg.model.model_dump(), "dim": dim, "output": ix.output,
                                               "use_gpu": use_gpu, "cpus": ix.cpus_per_actor, "chaos": chaos})
    totals = {"pages": 0, "rejects": 0, "batches": 0, "embed_seconds": 0.0}
    t0 = time.perf_counter()
    first: tuple[float, int] | None = None  # after the first batch: start-up (model loading) excluded
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
    stream_seconds = time.perf_counter() - t0
    steady = (totals["pages"] - first[1]) / (now - first[0]) if first and now > first[0] else 0.0
    old_manifest = read_manifest(ix.output)
    # normally a no-op: two inputs with the same content, or a batch retried after a failure and cut differently
    removed = dedupe_parts([f"{ix.output}/{PAGES}", f"{ix.output}/{REJECTS}"], "key",
                           first=set(old_manifest["shards"]) if old_manifest else set())
    base = {**binding, "normalized": True, "metric": "inner_product", "updated_at": now_iso(), "sources": ix.sources}
    build = ray.remote(build_or_extend_index).options(num_gpus=1 if use_gpu else 0)  # FAISS uses it if it can
    manifest = ray.get(build.remote(ix.output, base, ix.model_dump()))
    summary = {
        "source_files": len(files), "pages_embedded": totals["pages"], "pages_rejected": totals["rejects"],
        "pages_done_before": len(known), "duplicates_removed": removed, "batches": totals["batches"],
        "stream_seconds": round(stream_seconds, 2), "embed_seconds": round(totals["embed_seconds"], 2),
        "pages_per_second": round(totals["pages"] / stream_seconds, 2) if stream_seconds else 0.0,
        "steady_pages_per_second": round(steady, 2),
        "index_vectors": manifest["vectors"], "index_type": manifest["index"]["type"],
        "index_bytes": manifest["index_bytes"], "seconds": round(time.time() - start, 2),
    }
    manifest = {**manifest, "last_run": summary}
    write_bytes(json.dumps(manifest, indent=2).encode(), f"{ix.output}/{MANIFEST}")
    logger.info("index summary: %s", summary)
    return IndexResult(ix.output, manifest, summary)
