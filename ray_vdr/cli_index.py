"""The index commands of the ``ray-vdr`` command line: embed (sync), delete, compact; what each prints."""

from __future__ import annotations

import json
import sys

from ray_vdr.config import VDRConfig


def cmd_embed(cfg: VDRConfig) -> int:
    from ray_vdr.corpus.embed import run

    result = run(cfg)
    s, m = result.summary, result.manifest
    d, p = s.documents, s.pages
    q = m.index.params.get("quantization")
    codes = f" with {q} codes, rescore {m.index.params['rescore']}x" if q else ""
    print(f"index: {result.output} version {s.version} ({s.index_type}{codes}, {s.live_pages} live pages of "
          f"{s.index_vectors} vectors, {s.index_bytes} bytes, dim {m.dim}, model {m.model.path})")
    print(f"{s.mode}: documents {d['added']} added, {d['updated']} updated, {d['removed']} removed, "
          f"{d['unchanged']} unchanged, {d['metadata_updated']} metadata-only updates, {d['rejected']} rejected; "
          f"pages {p.added} added, {p.removed} removed, {p.unchanged} unchanged")
    for r in s.documents_rejected:
        print(f"  rejected {r['source']}: {r['reason']}: {r['detail']}")
    print(f"sources: {s.sources_read} of {s.source_files} read and hashed ({s.source_bytes_read:,} bytes), the others "
          "unchanged in size and modification time")
    print(f"this run: {s.pages_embedded} pages embedded, {s.pages_rejected} rejected "
          f"(reasons in {result.output}/rejects), {s.pages_done_before} done by earlier runs, "
          f"{s.duplicates_removed} duplicates removed; {s.pages_per_second} pages/s over {s.stream_seconds}s")
    if m.index_shards:
        each = ", ".join(f"{r.shard}: {r.live_pages} live, {r.action}" for r in m.index_shards)
        print(f"shards: {len(m.index_shards)} ({each}); changed by this run: {s.shards_changed or 'none'}")
    if s.compaction is not None:
        print(f"compacted: {s.compaction.model_dump_json()}")
    print(f"summary: {s.model_dump_json(exclude_none=True)}")
    return 0


def cmd_delete(cfg: VDRConfig, doc_ids: list[str], sources: list[str], filter_json: str | None) -> int:
    from ray_vdr.corpus.metadata import FilterError
    from ray_vdr.corpus.sync import delete

    try:
        flt = json.loads(filter_json) if filter_json else None
    except json.JSONDecodeError as e:
        print(f"error: --filter is not JSON: {e}", file=sys.stderr)
        return 2
    try:
        s = delete(cfg.index.output, doc_ids=doc_ids, sources=sources, filter=flt,
                   compact_share=cfg.index.compact_removed_share, index_cfg=cfg.index.model_dump())
    except (LookupError, FilterError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"deleted {s.documents_removed} documents ({s.pages_removed} pages) matching {s.matched}: "
          f"index {cfg.index.output} is now version {s.version}")
    if s.shards_changed:
        rebuilt = s.compaction.shards_rebuilt if s.compaction else []
        print(f"shards changed: {s.shards_changed}; rebuilt (removed pages dropped): {rebuilt or 'none'}; the other "
              "shards keep their files")
    if cfg.index.mode == "sync":
        print("note: with index.mode sync, the next `ray-vdr embed` adds them back if their files are still in "
              "index.sources")
    print(f"summary: {s.model_dump_json(exclude_none=True)}")
    return 0


def cmd_compact(cfg: VDRConfig) -> int:
    from ray_vdr.corpus.sync import compact

    s = compact(cfg.index.output, cfg.index.model_dump())
    print(f"compacted {cfg.index.output}: {s.removed_pages_dropped} removed pages dropped, {s.vectors} vectors, "
          f"version {s.version}" + (f"; shards rebuilt: {s.shards_rebuilt}" if s.shards_rebuilt else ""))
    return 0
