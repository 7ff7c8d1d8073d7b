"""Local, memory-mapped copies of a version's files, so that a reader holds little of an index in its own memory
(no Ray).

- :func:`mapped_ids`: a version's ids table (or one shard's rows of it) rewritten as an Arrow IPC file on local disk
  and memory-mapped: what a result returns (source, metadata, content hash…) is read from the page cache on demand,
  not held per page in the process. The file is unlinked once mapped (the mapping keeps it alive until the table is
  dropped), so nothing is left behind.
- :func:`cached_copy`: a file of an index on object storage copied once to local disk (a quantized index's float
  vectors, memory-mapped for rescoring); a version's files never change, so a copy of the right size is reused.

Both write under ``RAY_VDR_LOCAL_CACHE`` (else the temporary folder): give it a local disk with room for a shard's
vectors and ids.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_vdr.storage import fs_path, read_file

__all__ = ["cache_dir", "cached_copy", "mapped_ids"]


def cache_dir() -> Path:
    folder = Path(os.environ.get("RAY_VDR_LOCAL_CACHE") or Path(tempfile.gettempdir()) / "ray-vdr-cache")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cached_copy(uri: str, suffix: str = "") -> Path:
    """A local copy of the file at ``uri`` (copied once, streamed; reused while its size matches)."""
    fs, path = fs_path(uri)
    local = cache_dir() / f"{hashlib.blake2b(uri.encode(), digest_size=12).hexdigest()}{suffix}"
    if not local.exists() or local.stat().st_size != fs.get_file_info(path).size:
        tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex}")
        try:
            read_file(uri, tmp)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
    return local


def mapped_ids(uri: str, shard: int | None = None, shard_column: str = "index_shard") -> pa.Table:
    """The ids table at ``uri`` (only the rows whose ``shard_column`` is ``shard``, when given: the row groups of
    other shards are skipped by their statistics), memory-mapped from a local Arrow IPC file; written one row group
    at a time, so loading holds one row group in memory at most."""
    fs, path = fs_path(uri)
    source = pq.ParquetFile(path, filesystem=fs)
    local = cache_dir() / f".ids-{uuid.uuid4().hex}.arrow"
    at = source.schema_arrow.get_field_index(shard_column) if shard is not None else -1
    try:
        with pa.OSFile(str(local), "wb") as sink, pa.ipc.new_file(sink, source.schema_arrow) as writer:
            for g in range(source.num_row_groups):
                if at >= 0:
                    stats = source.metadata.row_group(g).column(at).statistics
                    if stats is not None and stats.has_min_max and not stats.min <= shard <= stats.max:
                        continue
                t = source.read_row_group(g, use_threads=False)
                if at >= 0:
                    t = t.filter(pc.equal(t.column(shard_column), shard))
                writer.write_table(t)
                del t
                pa.default_memory_pool().release_unused()
        table = pa.ipc.open_file(pa.memory_map(str(local), "r")).read_all()
    finally:
        local.unlink(missing_ok=True)  # the mapping holds the file until the table is dropped
    return table
