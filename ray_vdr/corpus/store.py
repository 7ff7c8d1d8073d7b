"""The index folder the embedding job writes and everything else reads: shards, ids, manifest, FAISS index, pages.

Layout under an index's ``output`` (a folder or URI)::

    pages/part-<hash>.parquet     key, content, file_hash, doc_id, source, page, width, height, image, thumbnail, text,
                                  embedding (a multi-vector index: the page's FDE, and its packed token vectors in
                                  tokens: :mod:`ray_vdr.corpus.late`)
    rejects/part-<hash>.parquet   key, file_hash, doc_id, source, page, reason, detail
    versions/v-<n>/               a published version: manifest, ids (row i = vector i, with ``live`` and metadata),
                                  documents, and its FAISS index (:mod:`ray_vdr.corpus.versions`)
    manifest.json                 the current version's manifest (the commit point)
    embedding.json                the model, dim, dpi and key scheme of the shards (every later run must match them)

The manifest (:class:`ray_vdr.corpus.manifest.IndexManifest`) binds the index to its embedder
(:class:`ray_vdr.models.binding.EmbedderBinding`, with the model's full fingerprint and cheap signature):
:func:`check_manifest` refuses to pair it with another model or dimension, which would return confident nonsense
rather than fail. Readers only: :mod:`ray_vdr.corpus.embed` writes.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_vdr.corpus.manifest import IDS_FILE, CorpusBinding, IndexManifest
from ray_vdr.corpus.mapped import mapped_ids
from ray_vdr.storage import list_parts, read_json, read_table

__all__ = ["EMBEDDING_FILE", "IDS_FILE", "MANIFEST", "PAGES", "REJECTS", "IndexMismatch", "PageIndex", "PageStore",
           "ShardedPageIndex", "check_manifest", "known_keys", "merge_hits", "open_index", "read_ids", "read_manifest",
           "read_shard", "shards"]

PAGES, REJECTS = "pages", "rejects"
MANIFEST = "manifest.json"
EMBEDDING_FILE = "embedding.json"


class IndexMismatch(ValueError):
    """An index used with a model or dimension other than the one it was built with."""


def shards(output: str, kind: str) -> list[str]:
    """Names of the published shards of ``kind`` (pages or rejects)."""
    return list_parts(f"{output}/{kind}")


def read_shard(output: str, kind: str, name: str, columns: list[str] | None = None) -> pa.Table:
    return read_table(f"{output}/{kind}/{name}", columns)


def known_keys(output: str, skip: set[str] = frozenset()) -> set[str]:
    """Keys already embedded or rejected under ``output`` (reads one column of every shard but the ``skip`` ones:
    shards a compaction retired)."""
    keys: set[str] = set()
    for kind in (PAGES, REJECTS):
        for name in shards(output, kind):
            if name in skip:
                continue
            keys.update(read_shard(output, kind, name, ["key"]).column("key").to_pylist())
    return keys


def read_ids(output: str, manifest: IndexManifest | None = None) -> pa.Table:
    """The ids of every vector position of the current version (or of ``manifest``'s), removed ones included
    (``live`` False)."""
    manifest = manifest or read_manifest(output)
    return read_table(f"{output}/{manifest.files.ids if manifest else IDS_FILE}")


def read_manifest(output: str) -> IndexManifest | None:
    """The index manifest, or None while the embedding job has not published one."""
    data = read_json(f"{output}/{MANIFEST}")
    return None if data is None else IndexManifest.model_validate(data)


def check_manifest(manifest: CorpusBinding, *, model_path: str | None = None, fingerprint: str | None = None,
                   dim: int | None = None, where: str = "the index") -> None:
    """Refuse an index built by another model or at another dimension, saying what differs and what to do.

    ``model_path`` is compared by the cheap signature the manifest stores (a few MiB read, not the weights, and a
    remote model is not copied);
    ``fingerprint`` (the full hash) when the caller already has it. Indexes from before signatures compare the
    model's full fingerprint.
    """
    from ray_vdr.models.load import local_model, model_fingerprint, model_signature

    if dim is not None and manifest.dim != dim:
        raise IndexMismatch(f"{where} holds {manifest.dim}-d embeddings but {dim}-d vectors were asked for: "
                            f"use the dimension it was built with (index.dim / output.truncate_dim) or rebuild it")
    m = manifest.model
    if model_path is not None:
        if m.signature:  # a folder or URI is read in place; a hub id from the local cache
            where = model_path if "://" in model_path or Path(model_path).is_dir() else local_model(model_path)
            same = model_signature(where) == m.signature
        else:
            same = model_fingerprint(local_model(model_path)) == m.fingerprint
    elif fingerprint is not None:
        same = fingerprint == m.fingerprint
    else:
        return
    if not same:
        raise IndexMismatch(f"{where} was built with the model at {m.path} "
                            f"(fingerprint {(m.fingerprint or '')[:12]}…), "
                            f"not with {model_path or 'this model'}: its files differ; embed the corpus again with "
                            "this model into a new index.output")


@dataclass
class PageIndex:
    """A loaded index version: FAISS index, its id table (row i = vector i, removed ones included; memory-mapped when
    opened by :func:`open_index`, so a result's fields are read on demand) and manifest. Searches skip removed pages
    and apply metadata filters inside FAISS (:func:`ray_vdr.corpus.faiss_index.search`); the filter columns are
    dictionary-encoded arrays (:class:`ray_vdr.corpus.metadata.PositionFields`), built on the first filter."""

    index: Any
    ids: pa.Table
    manifest: IndexManifest
    output: str
    offset: int = 0  # a shard of a sharded index: its first position (positions in and out are the version's)
    shard: int | None = None
    tokens: Any = None  # a multi-vector index: the pages' token vectors (ray_vdr.corpus.late.TokenStore)

    def __post_init__(self):
        from ray_vdr.corpus.versions import allowed_positions

        self._fde = None
        if self.manifest.late is not None:
            from ray_vdr.corpus.late import TokenStore, fde_of, read_tokens

            self._fde = fde_of(self.manifest.late)
        if self._fde is not None and self.tokens is None:
            self.tokens = TokenStore(read_tokens(self.output, self.ids), self.manifest.late)
        self.live = allowed_positions(self.ids)  # None: nothing removed
        self._fields = None
        self._scopes: dict[tuple, np.ndarray] = {}
        self._meta = self.ids.column("metadata") if "metadata" in self.ids.column_names else None

    @property
    def fields(self):
        """Metadata columns of every position, for filters (built on first use)."""
        from ray_vdr.corpus.metadata import PositionFields

        if self._fields is None:
            meta = self._meta if self._meta is not None else pa.nulls(self.ids.num_rows, pa.string())
            self._fields = PositionFields(self.ids.column("doc_id"), self.ids.column("source"), meta)
            pa.default_memory_pool().release_unused()  # the columns' transient copies
        return self._fields

    def allowed(self, clauses: list | None = None, scope: list | None = None) -> np.ndarray | None:
        """Live positions matching ``clauses`` (FilterError for an unknown field or a wrong type) and an API key's
        ``scope`` ([(field, values)]); None = all."""
        mask = self.fields.mask(clauses) if clauses else None
        if scope:
            allowed = self._scope_mask(scope)
            mask = allowed if mask is None else mask & allowed
        if mask is None:
            return self.live
        return mask if self.live is None else mask & self.live

    def _scope_mask(self, scope: list) -> np.ndarray:
        """An API key's scope as a mask, computed once per scope (a key's scope is fixed; there are few keys)."""
        key = tuple((f, tuple(v)) for f, v in scope)
        if key not in self._scopes:
            self._scopes[key] = self.fields.scope_mask(scope)
        return self._scopes[key]

    def visible(self, position: int, scope: list | None) -> bool:
        """Whether an API key with ``scope`` may see the page at ``position`` (live pages only)."""
        position -= self.offset
        if not 0 <= position < self.ids.num_rows:
            return False
        return (self.live is None or bool(self.live[position])) and (
            not scope or bool(self._scope_mask(scope)[position]))

    def search(self, queries, k: int, clauses: list | None = None, scope: list | None = None
               ) -> list[list[dict[str, Any]]]:
        """Top-``k`` live pages per query vector (matching ``clauses`` and ``scope``): key, doc_id, source, page,
        score, rank (1-based), position, file_hash, content, metadata. A multi-vector index takes each query's token
        vectors (a list of (tokens, dim) arrays): its FDE finds ``late.candidates`` pages, exact MaxSim ranks them."""

        from ray_vdr.corpus.faiss_index import search

        allowed = self.allowed(clauses, scope)
        if self.tokens is not None:
            from ray_vdr.corpus.late import rescored

            first = max(k, self.manifest.late.candidates)
            _, positions = search(self.index, self._fde.encode_each(queries, doc=False), first, allowed)
            pairs = rescored(queries, positions, self.tokens, k)
        else:
            scores, positions = search(self.index, np.stack(queries) if isinstance(queries, list) else queries, k,
                                       allowed)
            pairs = [[(s, p) for s, p in zip(row_scores, row_pos, strict=True) if p >= 0]
                     for row_scores, row_pos in zip(scores, positions, strict=True)]
        # every hit's fields in one take (a deep search reads thousands: one scalar at a time cost ~10 µs a hit)
        cols = [c for c in ("key", "doc_id", "source", "page", "file_hash", "content", "metadata")
                if c in self.ids.column_names]
        flat = [int(pos) for found in pairs for _, pos in found]
        rows = iter(self.ids.select(cols).take(pa.array(flat, pa.int64())).to_pylist() if flat else ())
        out = []
        for found in pairs:
            hits = []
            for rank, (score, pos) in enumerate(found, start=1):
                row = next(rows)
                meta = row.pop("metadata", None)
                hits.append({**row, "score": float(score), "rank": rank, "position": int(pos) + self.offset,
                             "metadata": json.loads(meta) if meta and meta != "{}" else {}})
            out.append(hits)
        return out


@dataclass
class ShardedPageIndex:
    """Every shard of a sharded index version in one process (evaluation, mining, benches; the endpoint gives each
    shard its own Retriever): a search asks each shard and merges by score (:func:`merge_hits`)."""

    shards: list[PageIndex]
    ids: pa.Table
    manifest: IndexManifest
    output: str
    offset: int = 0

    def search(self, queries, k: int, clauses: list | None = None, scope: list | None = None
               ) -> list[list[dict[str, Any]]]:
        per = [s.search(queries, k, clauses, scope) for s in self.shards]
        return [merge_hits([p[q] for p in per], k) for q in range(len(per[0]) if per else 0)]

    def visible(self, position: int, scope: list | None) -> bool:
        return any(s.visible(position, scope) for s in self.shards)


def merge_hits(per_shard: list[list[dict[str, Any]]], k: int) -> list[dict[str, Any]]:
    """One query's top ``k`` over its hits from each shard (each by score): by score, ties by shard then rank;
    ranks renumbered."""
    merged = sorted((h for hits in per_shard for h in hits), key=lambda h: -h["score"])[:k]
    return [{**h, "rank": r} for r, h in enumerate(merged, start=1)]


def _empty(manifest: IndexManifest, output: str, shard: int | None) -> PageIndex:
    import faiss

    from ray_vdr.corpus.build import empty_ids

    ids = empty_ids().append_column("live", pa.array([], pa.bool_()))
    return PageIndex(faiss.IndexFlatIP(manifest.vector_dim), ids, manifest, output, shard=shard)


def open_index(output: str, *, model_path: str | None = None, dim: int | None = None,
               version: int | None = None, shard: int | None = None) -> PageIndex | ShardedPageIndex:
    """Load the current version of the index under ``output`` (or ``version``); refuses it (IndexMismatch) when
    ``model_path`` is not the model it was built with or ``dim`` is not its dimension. ``shard``: that shard only
    (its positions keep their place in the version: a shard's first is its offset); shard 0 of an unsharded index is
    all of it, a shard the index does not have is empty. A sharded index opened whole holds every shard."""
    from ray_vdr.corpus.build import read_index_file
    from ray_vdr.corpus.shards import SHARD_COLUMN
    from ray_vdr.corpus.versions import read_version

    manifest = read_manifest(output) if version is None else read_version(output, version)
    if manifest is None:
        raise FileNotFoundError(f"no index at {output} "
                                f"({MANIFEST} missing{f' for version {version}' if version else ''}"
                                "): run jobs/embed_corpus.py first")
    check_manifest(manifest, model_path=model_path, dim=dim, where=f"the index at {output}")
    files, spec = manifest.files, manifest.index.model_dump()
    if shard is not None and shard >= manifest.shard_count:
        return _empty(manifest, output, shard)
    if manifest.index_shards:
        wanted = range(manifest.shard_count) if shard is None else [shard]
        loaded = []
        for s in wanted:
            rec = manifest.index_shards[s]
            ids = mapped_ids(f"{output}/{files.ids}", s, SHARD_COLUMN)
            if rec.index is None:
                loaded.append(PageIndex(_empty(manifest, output, s).index, ids, manifest, output, rec.offset, s))
            else:
                loaded.append(PageIndex(read_index_file(output, rec.index, spec), ids, manifest, output, rec.offset,
                                        s))
        pa.default_memory_pool().release_unused()
        if shard is not None:
            return loaded[0]
        return ShardedPageIndex(loaded, pa.concat_tables([s.ids for s in loaded]), manifest, output)  # in order
    ids = mapped_ids(f"{output}/{files.ids}")
    if files.index is None:  # every source rejected: an empty index
        import faiss

        return PageIndex(faiss.IndexFlatIP(manifest.vector_dim), ids, manifest, output, shard=shard)
    index = read_index_file(output, files.index, spec)
    return PageIndex(index, ids, manifest, output, shard=shard)


THUMBNAIL_SIDE = 256  # served thumbnails' longest side for manifests that do not record one (IndexConfig's default)


class PageStore:
    """Page images, thumbnails and stored embeddings of an index, read from its Parquet shards by vector position,
    with an LRU cache."""

    def __init__(self, output: str, ids: pa.Table, cache_bytes: int = 256 << 20,
                 thumbnail_side: int = THUMBNAIL_SIDE, offset: int = 0):
        self.output, self.ids, self.thumbnail_side = output, ids, thumbnail_side
        self.offset = offset  # a shard's pages: ``ids`` row i is position offset + i
        self._cache: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._cache_bytes, self._held = cache_bytes, 0
        self._lock = threading.Lock()

    @classmethod
    def of(cls, index: PageIndex, cache_bytes: int = 256 << 20) -> PageStore:
        """The pages of a loaded index version, thumbnails at the side its manifest records."""
        return cls(index.output, index.ids, cache_bytes, index.manifest.thumbnail_side, index.offset)

    @classmethod
    def open(cls, output: str, cache_bytes: int = 256 << 20, version: int | None = None) -> PageStore:
        from ray_vdr.corpus.versions import read_version

        manifest = read_version(output, version) if version else read_manifest(output)
        return cls(output, read_ids(output, manifest), cache_bytes,
                   manifest.thumbnail_side if manifest else THUMBNAIL_SIDE)

    def get(self, positions: list[int], column: str = "image") -> list[Any]:
        """The ``column`` (image, thumbnail or embedding) of each vector position; one read per shard for the
        misses. A thumbnail the shard does not hold (the job no longer makes them) is made from the image."""
        found: dict[int, Any] = {}
        with self._lock:
            for p in positions:
                if (p, column) in self._cache:
                    self._cache.move_to_end((p, column))
                    found[p] = self._cache[(p, column)]
        by_shard: dict[str, list[int]] = {}
        for p in positions:
            if p not in found:
                by_shard.setdefault(self.ids.column("shard")[p - self.offset].as_py(), []).append(p)
        for shard, wanted in by_shard.items():
            rows = [self.ids.column("row")[p - self.offset].as_py() for p in wanted]
            values = read_shard(self.output, PAGES, shard, [column]).column(column).take(pa.array(rows)).to_pylist()
            if column == "thumbnail" and None in values:
                values = self._thumbnails(shard, rows, values)
            for p, value in zip(wanted, values, strict=True):
                found[p] = value
                self._remember((p, column), value)
        return [found[p] for p in positions]

    def _thumbnails(self, shard: str, rows: list[int], values: list[bytes | None]) -> list[bytes]:
        from ray_vdr.corpus.pages import thumbnail

        missing = [i for i, v in enumerate(values) if v is None]
        images = read_shard(self.output, PAGES, shard, ["image"]).column("image").take(
            pa.array([rows[i] for i in missing])).to_pylist()
        for i, image in zip(missing, images, strict=True):
            values[i] = thumbnail(image, self.thumbnail_side)
        return values

    def _remember(self, key: tuple[int, str], value: Any) -> None:
        size = len(value) if isinstance(value, bytes) else 4 * len(value)
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = value
            self._held += size
            while self._held > self._cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._held -= len(old) if isinstance(old, bytes) else 4 * len(old)

    def position(self, doc_id: str, page: int | None) -> int | None:
        """The vector position of a document's live page (its first page when ``page`` is None)."""
        mask = pc.equal(self.ids.column("doc_id"), doc_id)
        if "live" in self.ids.column_names:  # a removed page is not served
            mask = pc.and_(mask, self.ids.column("live"))
        if page is not None:
            mask = pc.and_(mask, pc.equal(self.ids.column("page"), page))
        hits = np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False)).tolist()
        if not hits:
            return None
        if page is None:
            pages = self.ids.column("page").take(pa.array(hits)).to_pylist()
            return hits[int(np.argmin(pages))] + self.offset
        return hits[0] + self.offset
