"""Sharded indexes (``index.shards``): building one FAISS index per shard, each by its own task (no Ray here: the
build runs its shard tasks on Ray when Ray is up, else one after another in this process).

A document's pages all go to one shard, by a hash of its doc_id. A shard's task streams its pages' vectors from the
page parts one part at a time, so no process holds more than one shard's vectors (the driver holds none: it reads
the doc_id column of new parts, and the ids). IVF types train one coarse quantiser on a sample of the parts first
and every shard starts from a copy of it, so scores and ``nprobe`` mean the same in every shard (quantized indexes
likewise share their 8-bit ranges or binary thresholds).

A version of a sharded index keeps one ids table (row i = position i; the shards in order, ``index_shard`` naming
each row's shard, written in row groups per shard so a shard's replica reads its own rows only) and per shard a FAISS
file and an :class:`~ray_vdr.corpus.manifest.IndexShard` record (its offset is its first position). What a change
rebuilds:

- a sync that adds pages extends the shards they hash to; the others keep their files;
- a delete rewrites the ids only (the removed pages' positions turn dead); its summary names the shards holding them;
- a compaction (automatic when a shard's removed share passes ``index.compact_removed_share``) rebuilds those shards
  over their live pages and drops their removed pages from the page parts; the other shards keep their files;
- a new shard count or index type rebuilds every shard.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_vdr.cluster import process_memory
from ray_vdr.corpus.build import ID_COLUMNS, empty_ids, read_all_ids, read_index_file, rewrite_parts, write_index_file
from ray_vdr.corpus.faiss_index import (
    IndexSpec,
    add_to,
    choose_spec,
    factory,
    same_codes,
    set_search_params,
    trained_empty,
)
from ray_vdr.corpus.manifest import IndexManifest, IndexShard
from ray_vdr.corpus.versions import VERSIONS
from ray_vdr.storage import fs_path

logger = logging.getLogger(__name__)

__all__ = ["SHARD_COLUMN", "build_shard", "build_sharded", "compact_shards", "planned_shards", "shard_of",
           "train_quantizer"]

SHARD_COLUMN = "index_shard"
TRAIN_SIZE = 262_144  # vectors an IVF quantiser is trained on (as an unsharded build)


def shard_of(doc_ids: list[str], n: int) -> np.ndarray:
    """The shard of each document among ``n`` (a stable hash of its doc_id: the same on every machine and run)."""
    if n == 1:
        return np.zeros(len(doc_ids), np.int64)
    return np.fromiter((int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little") % n
                        for d in doc_ids), np.int64, len(doc_ids))


def _rows(output: str, names: list[str]) -> int:
    fs = fs_path(output)[0]
    return sum(pq.ParquetFile(fs_path(f"{output}/pages/{n}")[1], filesystem=fs).metadata.num_rows for n in names)


def planned_shards(cfg, output: str, names: list[str], current: IndexManifest | None) -> int:
    """How many shards the index over the page parts ``names`` gets (an IndexConfig's ``shards``; ``auto``: pages /
    ``shard_target_pages`` rounded up, keeping the current count while every shard stays under twice the target)."""
    if cfg.shards != "auto":
        return int(cfg.shards)
    pages = _rows(output, names)
    now = current.shard_count if current is not None and current.version is not None else 0
    if now and pages <= 2 * cfg.shard_target_pages * now:
        return now
    return max(1, math.ceil(pages / cfg.shard_target_pages))


def _read_part(output: str, name: str, columns: list[str]) -> pa.Table:
    """Columns of one page part, read on this thread (no read-ahead buffers beyond the part)."""
    fs, path = fs_path(f"{output}/pages/{name}")
    return pq.ParquetFile(path, filesystem=fs).read(columns=columns, use_threads=False)


def _select(output: str, parts: list[str], n: int, s: int, keys: set[str] | None) -> list[tuple[str, np.ndarray]]:
    """(part, rows) of shard ``s``'s rows (among ``keys``) in each part: two small columns read per part."""
    out = []
    for name in parts:
        head = _read_part(output, name, ["doc_id", "key"])
        mask = shard_of(head.column("doc_id").to_pylist(), n) == s
        if keys is not None:
            mask &= np.fromiter((k in keys for k in head.column("key").to_pylist()), bool, head.num_rows)
        if mask.any():
            out.append((name, np.flatnonzero(mask)))
    return out


def _scan(output: str, selected: list[tuple[str, np.ndarray]]):
    """(ids, vectors) of the selected rows, one part at a time."""
    for name, rows in selected:
        t = _read_part(output, name, [*ID_COLUMNS, "embedding"]).take(pa.array(rows))
        emb = t.column("embedding").combine_chunks()
        vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), emb.type.list_size)
        ids = (t.drop_columns(["embedding"]).append_column("shard", pa.array([name] * len(rows)))
               .append_column("row", pa.array(rows, pa.int32())))
        yield ids, vectors.astype(np.float32, copy=False)
        del t, emb, vectors
        pa.default_memory_pool().release_unused()  # the part's read buffers: the allocator would keep them cached


def _reserve(index, adding: int) -> None:
    """Size a flat store (flat, HNSW's vectors) for ``adding`` more vectors at once: growing it add by add doubles
    its buffer, holding up to 3x the shard while it copies."""
    import faiss

    flat = index.storage if isinstance(index, faiss.IndexHNSW) else index
    if isinstance(flat, faiss.IndexFlatCodes) and adding:
        codes, size = flat.codes, flat.codes.size()
        codes.resize(size + adding * flat.code_size)  # std::vector keeps the capacity when it shrinks back
        codes.resize(size)


def _warm(output: str, parts: list[str]) -> int:
    """Load what a scan uses (FAISS, Parquet, compute kernels: tens of MiB of libraries) on one row of a part; the
    resident memory after it is the baseline a task's peak is measured from."""
    import faiss  # noqa: F401

    first = _read_part(output, parts[0], [*ID_COLUMNS, "embedding"]) if parts else None
    if first is not None and first.num_rows:
        first.take(pa.array([0]))
    del first
    return process_memory()[0]


def build_shard(output: str, parts: list[str], n: int, s: int, spec: dict[str, Any], dim: int, version: int, *,
                base: str | None = None, quantizer: str | None = None, keys: list[str] | None = None
                ) -> tuple[dict[str, Any], pa.Table]:
    """Shard ``s`` of ``n``: its rows in ``parts`` (among ``keys``, when given) added to the index file ``base`` (an
    extension), or to a copy of the trained ``quantizer`` (IVF), or to an empty index. Writes the shard's FAISS file
    into version ``version``'s folder; returns its record's fields (with this process's peak memory) and the ids of
    the rows it added, in position order. Runs as a Ray task, one process per task."""
    t0 = time.perf_counter()
    start_rss = _warm(output, parts)
    kind = IndexSpec(spec["type"], spec["params"])
    if base is not None:
        index = read_index_file(output, base, spec)
    elif quantizer is not None:
        index = read_index_file(output, quantizer, spec)
    else:
        index = factory(kind, dim)
        set_search_params(index, kind)
    added = []
    selected = _select(output, parts, n, s, set(keys) if keys is not None else None)
    _reserve(index, sum(len(rows) for _, rows in selected))
    for ids, vectors in _scan(output, selected):
        add_to(index, vectors)
        added.append(ids)
    rel, size = None, 0
    if index.ntotal:
        rel = f"{VERSIONS}/v-{version:06d}/shard-{s:04d}.faiss"
        size = write_index_file(index, output, rel)
    ids = pa.concat_tables(added) if added else empty_ids()
    record = {"shard": s, "index": rel, "vectors": int(index.ntotal), "index_bytes": size,
              "build_seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": process_memory()[1],
              "start_rss_bytes": start_rss}
    return record, ids


def train_quantizer(output: str, parts: list[str], spec: dict[str, Any], version: int, seed: int = 0,
                    train_size: int = TRAIN_SIZE) -> str:
    """Train an IVF index's coarse quantiser (and codes) on a sample of whole page parts, chosen at random until
    ``train_size`` vectors, and write it (empty) into version ``version``'s folder; returns its path there. Runs as
    a Ray task (on a GPU when there is one)."""
    rng = np.random.default_rng(seed)
    sample, held = [], 0
    for i in rng.permutation(len(parts)):
        t = _read_part(output, parts[i], ["embedding"])
        if not t.num_rows:
            continue
        emb = t.column("embedding").combine_chunks()
        sample.append(emb.flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, emb.type.list_size))
        held += t.num_rows
        if held >= train_size:
            break
    index = trained_empty(IndexSpec(spec["type"], spec["params"]), np.concatenate(sample)[:train_size])
    rel = f"{VERSIONS}/v-{version:06d}/quantizer.faiss"
    write_index_file(index, output, rel)
    return rel


def _run(fn, calls: list[tuple[tuple, dict]], num_gpus: float) -> list:
    """``fn`` over ``calls``: as Ray tasks, one process each (its peak memory is its own), when Ray is up; else in
    this process, one after another."""
    try:
        import ray
    except ImportError:  # the core without Ray
        ray = None
    if ray is None or not ray.is_initialized():
        return [fn(*a, **kw) for a, kw in calls]
    task = ray.remote(max_calls=1)(fn).options(num_gpus=num_gpus)
    return ray.get([task.remote(*a, **kw) for a, kw in calls])


def _shard_ids(ids: pa.Table, s: int) -> pa.Table:
    base = ids.select([*ID_COLUMNS, "shard", "row"])
    return base.append_column(SHARD_COLUMN, pa.array(np.full(base.num_rows, s, np.int32)))


def build_sharded(output: str, names: list[str], dim: int, cfg, current: IndexManifest | None, version: int,
                  n: int, *, num_gpus: float = 0, added: list[str] | None = None, rebuild: set[int] = frozenset(),
                  moved: dict[str, tuple[str, int]] | None = None) -> tuple[dict[str, Any], pa.Table]:
    """The ``n``-shard index over the page parts ``names`` for ``version``: the manifest fields and the ids of every
    position (the shards in order). When ``current`` has the same shard count and index type, shards that
    ``added`` parts (default: those ``current`` does not cover) hash pages to are extended, ``rebuild`` ones are built
    anew over their live pages, and the others keep their files (``moved``: key → (part, row) of their rows that a
    compaction moved to another part); else every shard is built anew."""
    t0 = time.perf_counter()
    total = _rows(output, names)
    spec = choose_spec(total, dim, cfg)
    old = current if (current is not None and current.version is not None and len(current.index_shards) == n
                      and same_codes(current.index.model_dump(), spec)) else None
    quantizer = None
    jobs: dict[int, tuple[list[str], dict[str, Any]]] = {}
    old_ids: dict[int, pa.Table] = {}
    if old is not None:
        spec = IndexSpec(old.index.type, old.index.params)
        quantizer = old.files.quantizer
        new_parts = [p for p in names if p not in set(old.shards)] if added is None else added
        every = read_all_ids(output, old)
        shard_col = every.column(SHARD_COLUMN)
        for s in range(n):
            old_ids[s] = every.filter(pc.equal(shard_col, s))
        touched = {int(x) for p in new_parts for x in shard_of(_read_part(output, p, ["doc_id"])
                                                               .column("doc_id").to_pylist(), n)}
        for s in range(n):
            rec = old.index_shards[s]
            if s in rebuild:
                live = old_ids[s].filter(pc.field("live")) if "live" in old_ids[s].column_names else old_ids[s]
                jobs[s] = (names, {"quantizer": quantizer, "keys": live.column("key").to_pylist(),
                                   "action": "rebuilt"})
            elif s in touched:
                jobs[s] = (new_parts, {"base": rec.index, "quantizer": quantizer, "action": "extended"})
    else:
        if (spec.type.startswith("ivf") or "quantization" in spec.params) and total:  # a shared trained start
            quantizer = _run(train_quantizer, [((output, names, spec.as_dict(), version), {})], num_gpus)[0]
        jobs = {s: (names, {"quantizer": quantizer, "action": "built"}) for s in range(n)}
    calls = [((output, parts, n, s, spec.as_dict(), dim, version),
              {k: v for k, v in kw.items() if k != "action"}) for s, (parts, kw) in jobs.items()]
    logger.info("index of %d shards over %d pages (%s): %d shard tasks (%s)", n, total, spec.type, len(calls),
                ", ".join(f"{s}: {kw['action']}" for s, (_, kw) in jobs.items()) or "none")
    results = dict(zip(jobs, _run(build_shard, calls, num_gpus), strict=True))
    tables, records, offset = [], [], 0
    for s in range(n):
        if s in results:
            fields, ids = results[s]
            action = jobs[s][1]["action"]
            if action == "extended":
                ids = pa.concat_tables([old_ids[s].select([*ID_COLUMNS, "shard", "row"]), ids])
                fields["vectors"] = ids.num_rows
            record = IndexShard(**fields, action=action, offset=offset)
        else:
            ids = old_ids[s]
            if moved:
                ids = _move(ids, moved)
            record = old.index_shards[s].model_copy(update={"action": "kept", "offset": offset,
                                                            "build_seconds": 0.0})
        tables.append(_shard_ids(ids, s))
        records.append(record)
        offset += record.vectors
    fields = {"index": spec.as_dict(), "vectors": offset, "index_bytes": sum(r.index_bytes for r in records),
              "shards": names, "extended": old is not None,
              "added_vectors": sum(r.vectors - (old.index_shards[r.shard].vectors if r.action == "extended" else 0)
                                   for r in records if r.action != "kept"),
              "build_seconds": round(time.perf_counter() - t0, 3), "index_shards": records,
              "files": {"index": None, "quantizer": quantizer}}
    return fields, pa.concat_tables(tables)


def _move(ids: pa.Table, moved: dict[str, tuple[str, int]]) -> pa.Table:
    """``ids`` with the part and row of each key that a compaction moved."""
    keys = ids.column("key").to_pylist()
    parts, rows = ids.column("shard").to_pylist(), ids.column("row").to_pylist()
    for i, k in enumerate(keys):
        if k in moved:
            parts[i], rows[i] = moved[k]
    at = ids.column_names.index("shard")
    ids = ids.set_column(at, "shard", pa.array(parts, pa.string()))
    return ids.set_column(ids.column_names.index("row"), "row", pa.array(rows, pa.int32()))


def compact_shards(output: str, current: IndexManifest, index_cfg: dict, version: int,
                   shards: set[int] | None = None) -> tuple[dict[str, Any], pa.Table]:
    """Compaction of a sharded index: the removed pages of ``shards`` (default: every shard holding one) leave the
    page parts and those shards are rebuilt over their live pages; the others keep their files (their rows that moved
    to a rewritten part are pointed there). Returns the manifest fields and the ids, as a build does."""
    from ray_vdr.config import IndexConfig

    ids = read_all_ids(output, current)
    live = ids.column("live").to_numpy(zero_copy_only=False).astype(bool)
    shard = ids.column(SHARD_COLUMN).to_numpy(zero_copy_only=False)
    chosen = {int(s) for s in np.unique(shard[~live])} if shards is None else set(shards)
    dropped = ids.filter(pa.array(~live & np.isin(shard, sorted(chosen))))
    names, retired, moved = rewrite_parts(output, current.shards, set(dropped.column("shard").to_pylist()),
                                          set(dropped.column("key").to_pylist()))
    fields, new_ids = build_sharded(output, names, current.vector_dim, IndexConfig.model_validate(index_cfg), current,
                                    version, current.shard_count, added=[], rebuild=chosen, moved=moved)
    fields["retired_shards"] = sorted(retired)
    fields["compacted"] = True
    return fields, new_ids
