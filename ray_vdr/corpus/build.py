"""Building a version's FAISS index from the page shards: build, extend, or compact (drop removed pages) (no Ray).

A version's index covers the rows of its shards; row i of its ids table is vector i. Building writes the index into
the new version's folder (:mod:`ray_vdr.corpus.versions`) and returns the manifest fields and the ids; nothing is
current until :func:`ray_vdr.corpus.versions.publish` commits it, so a build killed midway is rebuilt by the rerun.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_vdr.corpus.faiss_index import (
    INDEX_FILE,
    IndexSpec,
    add_to,
    build_index,
    choose_spec,
    read_index,
    same_codes,
    write_index,
)
from ray_vdr.corpus.manifest import IndexManifest
from ray_vdr.corpus.mapped import cached_copy
from ray_vdr.corpus.quantized import THRESHOLDS_SUFFIX, VECTORS_SUFFIX
from ray_vdr.corpus.versions import VERSIONS
from ray_vdr.storage import fs_path, part_name, read_file, read_table, write_file, write_table

__all__ = ["ID_COLUMNS", "build_version", "compact_version", "empty_ids", "read_all_ids", "read_index_file",
           "rewrite_parts", "write_index_file"]

ID_COLUMNS = ["key", "doc_id", "source", "page", "file_hash", "content", "row_metadata"]


def read_all_ids(output: str, manifest: IndexManifest) -> pa.Table:
    return read_table(f"{output}/{manifest.files.ids}")


def _vectors(output: str, names: list[str]) -> tuple[pa.Table | None, np.ndarray]:
    """The id rows (with shard and row) and the stored vectors of these page shards, in order."""
    ids, vecs = [], []
    for name in names:
        t = read_table(f"{output}/pages/{name}", [*ID_COLUMNS, "embedding"])
        if not t.num_rows:
            continue
        emb = t.column("embedding").combine_chunks()
        vecs.append(emb.values.to_numpy(zero_copy_only=False).reshape(t.num_rows, emb.type.list_size))
        ids.append(t.drop_columns(["embedding"]).append_column("shard", pa.array([name] * t.num_rows))
                   .append_column("row", pa.array(range(t.num_rows), pa.int32())))
    if not vecs:
        return None, np.zeros((0, 0), np.float32)
    return pa.concat_tables(ids), np.concatenate(vecs).astype(np.float32)


def write_index_file(index, output: str, rel: str) -> int:
    """Write a FAISS index to ``rel`` under the index folder (a quantized one: its codes there, its vectors and
    thresholds beside them); returns the size in bytes of what a reader holds in memory (the codes)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = write_index(index, Path(tmp) / INDEX_FILE)
        for f in files:  # streamed: no copy of the index in memory
            write_file(f, f"{output}/{rel}{f.name[len(INDEX_FILE):]}")
        return files[0].stat().st_size


def read_index_file(output: str, rel: str, spec: dict[str, Any] | None = None):
    """The FAISS index at ``rel`` under the index folder (read in place when local), with ``spec``'s search depth.
    From object storage, a quantized index's vectors file is copied once into the local cache
    (:func:`ray_vdr.corpus.mapped.cached_copy`) and memory-mapped from there."""
    fs, path = fs_path(f"{output}/{rel}")
    if isinstance(fs, pafs.LocalFileSystem):  # read in place: no second copy of the index in memory
        return read_index(path, spec)
    quant = (spec or {}).get("params", {}).get("quantization")
    vectors = cached_copy(f"{output}/{rel}{VECTORS_SUFFIX}", VECTORS_SUFFIX) if quant is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / INDEX_FILE
        read_file(f"{output}/{rel}", local)
        if quant == "binary":
            read_file(f"{output}/{rel}{THRESHOLDS_SUFFIX}", f"{local}{THRESHOLDS_SUFFIX}")
        return read_index(local, spec, vectors)


def empty_ids() -> pa.Table:
    """An ids table of no rows (ID_COLUMNS, shard, row)."""
    return pa.table({c: pa.array([], pa.int32() if c == "page" else pa.string()) for c in ID_COLUMNS}) \
        .append_column("shard", pa.array([], pa.string())).append_column("row", pa.array([], pa.int32()))


def _write(index, output: str, version: int) -> tuple[str, int]:
    rel = f"{VERSIONS}/v-{version:06d}/{INDEX_FILE}"
    return rel, write_index_file(index, output, rel)


def build_version(output: str, names: list[str], dim: int, index_cfg: dict, current: IndexManifest | None,
                  version: int) -> tuple[dict[str, Any], pa.Table]:
    """The index over the page shards ``names`` for ``version``: the current version's index extended with the new
    shards while the corpus size still calls for its type (an IVF quantiser stays valid as the corpus grows), else
    built anew. Returns the manifest fields and the ids of every position. Runs as a Ray task (GPU if any)."""
    from ray_vdr.config import IndexConfig

    cfg = IndexConfig.model_validate(index_cfg)
    t0 = time.perf_counter()
    fs, _ = fs_path(output)
    total = sum(pq.ParquetFile(fs_path(f"{output}/pages/{n}")[1], filesystem=fs).metadata.num_rows for n in names)
    spec = choose_spec(total, dim, cfg)
    extend = (current is not None and current.version is not None and current.files.index is not None
              and same_codes(current.index.model_dump(), spec) and set(current.shards) <= set(names))
    if extend:
        spec = IndexSpec(current.index.type, current.index.params)
        new = [n for n in names if n not in set(current.shards)]
        ids, vectors = _vectors(output, new)
        old_ids = read_all_ids(output, current).select([*ID_COLUMNS, "shard", "row"])
        ids = pa.concat_tables([old_ids, ids]) if ids is not None else old_ids
        if len(vectors):
            index = read_index_file(output, current.files.index, current.index.model_dump())
            add_to(index, vectors)
            rel, size = _write(index, output, version)
        else:  # nothing new: this version shares the current one's index file
            rel, size = current.files.index, current.index_bytes
        ntotal = ids.num_rows
    else:
        ids, vectors = _vectors(output, names)
        if ids is None:
            ids = empty_ids()
        index = build_index(vectors, spec) if len(vectors) else None
        rel, size = _write(index, output, version) if index is not None else (None, 0)
        ntotal = int(index.ntotal) if index is not None else 0
    fields = {"index": spec.as_dict(), "vectors": ntotal, "index_bytes": size, "shards": names, "extended": extend,
              "added_vectors": int(len(vectors)), "build_seconds": round(time.perf_counter() - t0, 3),
              "files": {"index": rel} if rel else {}}
    return fields, ids


def compact_version(output: str, current: IndexManifest, index_cfg: dict, version: int
                    ) -> tuple[dict[str, Any], pa.Table]:
    """Drop the removed pages for good: rewrite every page part holding one with its live rows only (a new part,
    named by its keys like any other), and build the index anew over the live rows. The old parts are *retired*: the
    previous version still uses them while the endpoint switches, and the version after this one deletes them.
    (A sharded index: :func:`ray_vdr.corpus.shards.compact_shards`.)"""
    ids = read_all_ids(output, current)
    live = ids.column("live").to_numpy(zero_copy_only=False).astype(bool) if "live" in ids.column_names else \
        np.ones(ids.num_rows, bool)
    dead = ids.filter(pa.array(~live))
    names, retired, _ = rewrite_parts(output, current.shards, set(dead.column("shard").to_pylist()),
                                       set(dead.column("key").to_pylist()))
    fields, new_ids = build_version(output, names, current.vector_dim, index_cfg, None, version)
    fields["retired_shards"] = sorted(retired)
    fields["compacted"] = True
    return fields, new_ids


def rewrite_parts(output: str, names: list[str], dirty: set[str], drop: set[str]
                   ) -> tuple[list[str], set[str], dict[str, tuple[str, int]]]:
    """Rewrite the parts ``dirty`` without the keys ``drop``: (the parts now, those retired, key → (part, row) of
    every row that moved)."""
    out, retired, moved = [], set(), {}
    for name in names:
        if name not in dirty:
            out.append(name)
            continue
        t = read_table(f"{output}/pages/{name}")
        keep = t.filter(pc.invert(pc.is_in(t.column("key"), pa.array(sorted(drop), pa.string()))))
        retired.add(name)
        if keep.num_rows:
            keys = keep.column("key").to_pylist()
            new = part_name(keys)
            write_table(keep, f"{output}/pages/{new}")
            out.append(new)
            moved.update({k: (new, i) for i, k in enumerate(keys)})
    return sorted(set(out)), retired, moved
