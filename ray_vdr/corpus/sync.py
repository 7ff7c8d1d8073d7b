"""Keeping an index in step with its sources: hashing them, planning what changed, deleting and compacting.

``ray-vdr embed`` with ``index.mode: sync`` (the default) makes the index mirror its sources: each file whose size
and modification time differ from those recorded at the last sync is hashed (a Ray Data pass that reads bytes, never
decodes; the others are not read at all, so a sync costs what changed), and compared by normalised URI with the
current version's documents: new and changed files are embedded, the pages of changed and deleted files are removed,
unchanged files are skipped, and a file whose metadata alone changed is updated without re-embedding.
``index.mode: append`` never removes anything. ``ray-vdr delete`` removes documents by doc_id, source or metadata
filter; ``ray-vdr compact`` drops removed pages for good (also run automatically when they pass
``index.compact_removed_share``). Every change is a new version, published atomically
(:mod:`ray_vdr.corpus.versions`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from ray_vdr.corpus.manifest import CompactSummary, DeleteSummary, IndexFiles, IndexManifest
from ray_vdr.corpus.metadata import MetadataError, PositionFields, parse_filter, read_sidecar, validate_metadata
from ray_vdr.corpus.pages import SourceFile
from ray_vdr.corpus.versions import docs_table, live_ids, next_version, publish, read_docs
from ray_vdr.storage import fs_path

logger = logging.getLogger(__name__)

__all__ = ["Plan", "compact", "compact_if_needed", "delete", "hash_file", "plan", "reuse_hashes"]

CHUNK = 8 << 20


def reuse_hashes(files: list[SourceFile], current_docs: pa.Table) -> list[SourceFile]:
    """``files`` with the content hash of each one whose stamp (size, modification time) equals the one its document
    was recorded with: those need not be read (pure)."""
    known = {(s, st): h for s, st, h in zip(current_docs.column("source").to_pylist(),
                                            current_docs.column("stamp").to_pylist(),
                                            current_docs.column("file_hash").to_pylist(), strict=True) if st and h}
    return [replace(f, file_hash=known[f.uri, f.stamp]) if f.stamp and (f.uri, f.stamp) in known else f
            for f in files]


def hash_file(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data stage: a source's content hash (equal to the page key of its bytes) and its sidecar metadata, read
    but not parsed for pages. A row that comes with its hash (:func:`reuse_hashes`) is not read (``hashed``
    False); ``bytes_read`` counts what was."""
    from ray_vdr.corpus.metadata import MAX_SIDECAR_BYTES

    sidecar = None
    if row.get("meta_sidecar"):  # small, and its own file: a metadata-only change is seen without the source
        mfs, mpath = fs_path(row["meta_sidecar"])
        with mfs.open_input_stream(mpath) as fh:
            data = fh.read(MAX_SIDECAR_BYTES + 1)
        sidecar = data.decode("latin-1")  # bytes, carried as text; decoded as UTF-8 by read_sidecar
    if row.get("file_hash"):
        return {**row, "read_error": None, "sidecar_raw": sidecar, "hashed": False, "bytes_read": 0}
    fs, path = fs_path(row["uri"])
    h, error, size = hashlib.sha256(), None, 0
    try:
        with fs.open_input_stream(path) as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    h.update(b"\0")
    return {**row, "file_hash": h.hexdigest() if error is None else None, "read_error": error, "sidecar_raw": sidecar,
            "hashed": True, "bytes_read": size}


@dataclass
class Plan:
    """What one sync does: the files to embed and the new version's documents, with counts for the summary."""

    embed: list[SourceFile]
    docs: list[dict[str, Any]]
    documents: dict[str, int]
    rejects: list[dict[str, Any]] = field(default_factory=list)


def plan(listed: list[dict[str, Any]], current_docs: pa.Table, mode: str,
         table: tuple[str, dict[str, dict]] | None = None) -> Plan:
    """Compare the hashed sources with the current documents (pure; ``table`` is the config's metadata table)."""
    current: dict[str, list[dict]] = {}
    for d in current_docs.to_pylist():
        current.setdefault(d["source"], []).append(d)
    counts = dict.fromkeys(("added", "updated", "removed", "unchanged", "metadata_updated", "rejected"), 0)
    embed, docs, rejects, seen = [], [], [], set()
    for f in listed:
        seen.add(f["uri"])
        try:
            meta = _metadata(f, table)
        except MetadataError as e:
            rejects.append({"source": f["uri"], "doc_id": f["doc_id"], "reason": e.reason, "detail": e.detail[:500]})
            counts["rejected"] += 1
            continue
        doc = {"source": f["uri"], "doc_id": f["doc_id"], "kind": f["kind"], "file_hash": f["file_hash"] or "",
               "metadata": json.dumps(meta, sort_keys=True, separators=(",", ":")), "stamp": f.get("stamp")}
        before = current.get(f["uri"], [])
        same = [d for d in before if d["file_hash"] == doc["file_hash"]]
        if f["file_hash"] is None:  # unreadable now: the embedding stage writes its reject
            pass
        elif same:
            counts["metadata_updated" if same[0]["metadata"] != doc["metadata"] else "unchanged"] += 1
            if mode == "append":
                docs += [d for d in before if d["file_hash"] != doc["file_hash"]]
            docs.append(doc)
            continue
        counts["updated" if before else "added"] += 1
        if mode == "append":
            docs += before
        docs.append(doc)
        embed.append(SourceFile(f["uri"], f["doc_id"], f["kind"], f.get("sidecar"), f.get("meta_sidecar"),
                                f["file_hash"], f.get("stamp")))
    if mode == "append":
        docs += [d for src, ds in current.items() if src not in seen for d in ds]
    else:
        counts["removed"] = len(set(current) - {d["source"] for d in docs})
    return Plan(embed, docs, counts, rejects)


def _metadata(f: dict[str, Any], table: tuple[str, dict[str, dict]] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if table is not None:
        key, rows = table
        meta.update(rows.get(f["uri"] if key == "source" else f["doc_id"], {}))
        meta = validate_metadata(meta, f"the metadata table's row for {f['doc_id']}")
    if f.get("sidecar_raw") is not None:
        meta.update(read_sidecar(f["sidecar_raw"].encode("latin-1"), f"{f['doc_id']}.json"))
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# deletes and compaction: new versions of the same shards


def delete(output: str, *, doc_ids: list[str] = (), sources: list[str] = (), filter: dict | None = None,
           compact_share: float | None = None, index_cfg: dict | None = None,
           scope: list | None = None) -> DeleteSummary:
    """Remove documents (and their pages) by doc_id, source (a file, or a folder: everything under it) or metadata
    filter, among those an API key's ``scope`` may see; publish the new version. LookupError when nothing matches.
    Returns a summary."""
    from ray_vdr.corpus.build import read_all_ids

    current = _versioned(output)
    docs = read_docs(output, current)
    if not (doc_ids or sources or filter):
        raise ValueError("say what to delete: --doc-id, --source or --filter")
    rows = docs.to_pylist()
    hit = [False] * len(rows)
    wanted_ids = set(doc_ids)
    roots = [_normalise(s) for s in sources]
    fields = PositionFields([r["doc_id"] for r in rows], [r["source"] for r in rows], [r["metadata"] for r in rows])
    mask = fields.mask(parse_filter(filter)) if filter else None
    visible = fields.scope_mask(scope) if scope else None
    for i, r in enumerate(rows):
        hit[i] = (r["doc_id"] in wanted_ids or any(r["source"] == s or r["source"].startswith(s.rstrip("/") + "/")
                                                    for s in roots) or (mask is not None and bool(mask[i])))
        hit[i] = hit[i] and (visible is None or bool(visible[i]))
    removed = [r for r, h in zip(rows, hit, strict=True) if h]
    what = ", ".join(x for x in (f"doc_id {sorted(wanted_ids)}" if wanted_ids else "",
                                 f"source {list(sources)}" if sources else "",
                                 f"filter {json.dumps(filter)}" if filter else "") if x)
    if not removed:
        raise LookupError(f"nothing to delete: no document of the index at {output} matches {what}")
    new_docs = docs_table([r for r, h in zip(rows, hit, strict=True) if not h])
    ids = live_ids(read_all_ids(output, current), new_docs)
    kept = [r.model_copy(update={"action": "kept", "build_seconds": 0.0}) for r in current.index_shards]
    manifest = publish(output, current.model_copy(update={"version": next_version(current), "operation": "delete",
                                                          "index_shards": kept}), new_docs, ids, current)
    changed = [r.shard for r, was in zip(manifest.index_shards, current.index_shards, strict=True)
               if r.live_pages != was.live_pages]
    summary = DeleteSummary(version=manifest.version, documents_removed=len(removed),
                            pages_removed=current.live - manifest.live, matched=what,
                            removed_doc_ids=sorted({r["doc_id"] for r in removed})[:100], shards_changed=changed)
    if compact_share is not None:
        summary.compaction = compact_if_needed(output, index_cfg or {}, compact_share)
    return summary


def _normalise(source: str) -> str:
    if "://" in source:
        return source.rstrip("/")
    return fs_path(source)[1].rstrip("/")


def _versioned(output: str) -> IndexManifest:
    from ray_vdr.corpus.store import read_manifest

    current = read_manifest(output)
    if current is None or current.version is None:
        raise FileNotFoundError(f"no versioned index at {output}: build it with `ray-vdr embed` first")
    return current


def compact_if_needed(output: str, index_cfg: dict, share: float) -> CompactSummary | None:
    """Compact when removed pages pass ``share`` of the index (of a sharded index: only the shards past it)."""
    current = _versioned(output)
    if current.index_shards:
        over = {r.shard for r in current.index_shards
                if r.vectors and (r.vectors - (r.live_pages if r.live_pages is not None else r.vectors)) / r.vectors
                > share}
        if not over:
            return None
        logger.info("removed pages pass %.0f%% of shards %s: rebuilding them", 100 * share, sorted(over))
        return compact(output, index_cfg, shards=over)
    if not current.removed_pages or current.removed_share <= share:
        return None
    logger.info("removed pages are %.0f%% of the index (> %.0f%%): compacting", 100 * current.removed_share,
                100 * share)
    return compact(output, index_cfg)


def compact(output: str, index_cfg: dict, shards: set[int] | None = None) -> CompactSummary:
    """Rebuild the index over the live pages only (removed ones are then gone from the page parts and the index too),
    with the index's own type and quantization (``index_cfg`` gives the rest); a sharded index rebuilds the
    ``shards`` given (default: every shard holding a removed page) and keeps the others' files."""
    from ray_vdr.corpus.build import compact_version
    from ray_vdr.corpus.shards import compact_shards

    current = _versioned(output)
    version = next_version(current)
    # compaction drops removed pages and changes nothing else: the index keeps its type and codes whatever the
    # caller's config says (a `ray-vdr delete` with a config that never named them would rebuild every shard)
    p = current.index.params
    index_cfg = {**index_cfg, "index_type": current.index.type, "quantization": p.get("quantization", "none"),
                 "rescore": p.get("rescore")}
    if current.index_shards:
        fields, ids = compact_shards(output, current, index_cfg, version, shards)
    else:
        fields, ids = compact_version(output, current, index_cfg, version)
    docs = read_docs(output, current)
    files = IndexFiles(ids=current.files.ids, docs=current.files.docs, **fields.pop("files"))
    manifest = publish(output, IndexManifest.model_validate({
        **current.model_dump(), **fields, "files": files.model_dump(), "version": version, "operation": "compact"}),
        docs, live_ids(ids, docs), current)
    rebuilt = [r.shard for r in manifest.index_shards if r.action == "rebuilt"]
    logger.info("compacted %s: %d removed pages dropped, %d vectors%s", output,
                current.removed_pages - manifest.removed_pages, manifest.vectors,
                f"; shards rebuilt: {rebuilt}" if manifest.index_shards else "")
    return CompactSummary(version=manifest.version, removed_pages_dropped=current.removed_pages
                          - manifest.removed_pages, vectors=manifest.vectors,
                          retired_shards=len(manifest.retired_shards), shards_rebuilt=rebuilt)
