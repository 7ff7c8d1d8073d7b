"""Published versions of an index: each sync, delete or compaction publishes a new one atomically (no Ray).

Under an index's ``output``::

    versions/v-000007/manifest.json   this version: embedder binding, dim, index type, counts, its files
    versions/v-000007/ids.parquet     every vector position of its FAISS index: key, doc_id, source, page, shard, row,
                                      file_hash, content, live (False = removed: a tombstone), metadata (JSON)
    versions/v-000007/docs.parquet    its documents: source, doc_id, kind, file_hash, metadata (JSON)
    versions/v-000007/index.faiss     when this version built or extended the index (else it names an earlier one)
    manifest.json                     a copy of the current version's manifest: writing it is the commit

A writer killed before the commit leaves the previous version current (readers and the endpoint never see the half
written one, and a rerun rewrites it); after the commit, the version before the previous one is collected: its
files, and the page shards a compaction retired. The endpoint keeps the current and previous versions loaded while
it switches (:mod:`ray_vdr.corpus.live`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import signal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_vdr.corpus.manifest import IndexManifest
from ray_vdr.storage import (
    fs_path,
    list_dirs,
    now_iso,
    read_json,
    read_table,
    remove_tree,
    write_bytes,
    write_table,
    write_tables,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DOCS_SCHEMA",
    "ConcurrentUpdate",
    "allowed_positions",
    "docs_table",
    "live_ids",
    "next_version",
    "publish",
    "read_docs",
    "read_version",
    "retired_shards",
    "version_dir",
]

VERSIONS = "versions"
# stamp: the source's size and modification time when it was hashed (null in versions written before stamps)
DOCS_SCHEMA = pa.schema([("source", pa.string()), ("doc_id", pa.string()), ("kind", pa.string()),
                         ("file_hash", pa.string()), ("metadata", pa.string()), ("stamp", pa.string())])
CHAOS_ENV = "RAY_VDR_CHAOS_PUBLISH"  # tests: SIGKILL the writer after the version's files, before the commit


class ConcurrentUpdate(RuntimeError):
    """Another writer published a version of this index meanwhile: rerun (the rerun picks up its changes)."""


def version_dir(output: str, n: int) -> str:
    return f"{output}/{VERSIONS}/v-{n:06d}"


def next_version(current: IndexManifest | None) -> int:
    return (current.version or 0) + 1 if current else 1


def read_version(output: str, n: int) -> IndexManifest | None:
    data = read_json(f"{version_dir(output, n)}/manifest.json")
    return None if data is None else IndexManifest.model_validate(data)


def read_docs(output: str, manifest: IndexManifest | None) -> pa.Table:
    """The documents of a version (empty for none, or an index from before versions)."""
    if manifest is None or manifest.files.docs is None:
        return DOCS_SCHEMA.empty_table()
    docs = read_table(f"{output}/{manifest.files.docs}")
    if "stamp" not in docs.column_names:  # written before stamps: every source is read once at the next sync
        docs = docs.append_column("stamp", pa.nulls(docs.num_rows, pa.string()))
    return docs


def docs_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(sorted(rows, key=lambda r: (r["source"], r["file_hash"])), schema=DOCS_SCHEMA)


def live_ids(ids: pa.Table, docs: pa.Table) -> pa.Table:
    """``ids`` (every position) with ``live`` and ``metadata`` from ``docs``: a position is live when its document,
    at that content (source, file_hash), is one of the version's documents."""
    meta = {(s, h): m for s, h, m in zip(docs.column("source").to_pylist(), docs.column("file_hash").to_pylist(),
                                         docs.column("metadata").to_pylist(), strict=True)}
    pairs = zip(ids.column("source").to_pylist(), ids.column("file_hash").to_pylist(), strict=True)
    found = [meta.get(p, False) for p in pairs]
    rows = ids.column("row_metadata").to_pylist() if "row_metadata" in ids.column_names else [None] * ids.num_rows
    merged = [None if m is False else _merge(m, r) for m, r in zip(found, rows, strict=True)]
    base = ids.drop_columns([c for c in ("live", "metadata") if c in ids.column_names])
    return (base.append_column("live", pa.array([m is not False for m in found], pa.bool_()))
            .append_column("metadata", pa.array(merged, pa.string())))


def _merge(doc: str | None, row: str | None) -> str | None:
    """A page's metadata: its document's, and a Parquet row's own columns over it."""
    if not row:
        return doc
    return json.dumps({**(json.loads(doc) if doc else {}), **json.loads(row)}, sort_keys=True, separators=(",", ":"))


def retired_shards(manifest: IndexManifest | None) -> set[str]:
    return set(manifest.retired_shards) if manifest else set()


def publish(output: str, manifest: IndexManifest, docs: pa.Table, ids: pa.Table,
            base: IndexManifest | None) -> IndexManifest:
    """Write version ``manifest.version`` (its docs and ids; its index file is already there) and commit it, unless
    another writer published since ``base`` (the version this one was made from). Returns the committed manifest."""
    n = manifest.version
    folder = version_dir(output, n)
    rel = f"{VERSIONS}/v-{n:06d}"
    write_table(docs, f"{folder}/docs.parquet")
    update: dict[str, Any] = {}
    if manifest.index_shards:  # row groups per shard: a shard's replica reads its own rows only
        parts = [ids.slice(r.offset, r.vectors) for r in manifest.index_shards]
        update["index_shards"] = [r.model_copy(update={"live_pages": _live(t)})
                                  for r, t in zip(manifest.index_shards, parts, strict=True)]
        write_tables(parts, f"{folder}/ids.parquet")
    else:  # in row groups: a replica maps it one group at a time (ray_vdr.corpus.mapped)
        write_tables([ids], f"{folder}/ids.parquet")
    live = _live(ids)
    files = manifest.files.model_copy(update={"ids": f"{rel}/ids.parquet", "docs": f"{rel}/docs.parquet"})
    manifest = manifest.model_copy(update={
        "updated_at": now_iso(), "previous_version": base.version if base else None, "files": files,
        "documents": docs.num_rows, "live_pages": live, "removed_pages": ids.num_rows - live, **update})
    data = manifest.model_dump_json(indent=2).encode()
    write_bytes(data, f"{folder}/manifest.json")
    if os.environ.get(CHAOS_ENV) == "before_commit":
        logger.warning("chaos: killing the writer before it commits version %d", n)
        os.kill(os.getpid(), signal.SIGKILL)
    now = (read_json(f"{output}/manifest.json") or {}).get("version")
    if now != (base.version if base else None):
        raise ConcurrentUpdate(f"the index at {output} moved from version {base.version if base else None} to "
                               f"{now} while this change was prepared: rerun it")
    write_bytes(data, f"{output}/manifest.json")
    logger.info("published version %d of %s: %d documents, %d live pages, %d removed", n, output,
                docs.num_rows, live, ids.num_rows - live)
    _collect(output, manifest, base)
    return manifest


def _live(ids: pa.Table) -> int:
    return int(pc.sum(ids.column("live")).as_py() or 0) if ids.num_rows else 0


def _collect(output: str, new: IndexManifest, previous: IndexManifest | None) -> None:
    """Delete what neither the new version nor the previous one (still served during the switch) uses: older
    version folders, and the shards the previous version retired (its predecessor was their last user)."""
    used = [f for m in (new, previous) if m for f in [*m.files.model_dump().values(), *(r.index for r in
                                                                                   m.index_shards)] if f]
    keep = {posixpath.dirname(f) for f in used}  # a shard kept since an older version keeps that version's folder
    oldest = (previous.version if previous else None) or new.version
    for name in list_dirs(f"{output}/{VERSIONS}"):
        if name.startswith("v-") and int(name[2:]) < oldest and f"{VERSIONS}/{name}" not in keep:
            remove_tree(f"{output}/{VERSIONS}/{name}")
    for name in retired_shards(previous) - set(new.shards):
        fs, path = fs_path(f"{output}/pages/{name}")
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)


def allowed_positions(ids: pa.Table) -> np.ndarray | None:
    """The live mask of an ids table (None when every position is live: no selector needed)."""
    if "live" not in ids.column_names:
        return None
    live = ids.column("live").to_numpy(zero_copy_only=False).astype(bool)
    return None if live.all() else live
