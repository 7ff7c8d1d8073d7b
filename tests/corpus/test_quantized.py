"""Quantized indexes without Ray (``index.quantization``): codes in memory, candidates rescored with the float32
vectors from a memory-mapped file beside them; one index and three shards; filters, key scope, extension, delete and
compaction as for float indexes; a remote index's vectors copied once into the local cache."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.fs as pafs
import pytest

from tests.corpus_helpers import page_rows, tiny_versioned_index, write_page_part

DIM = 64


def _exact(index, q: np.ndarray, k: int) -> list[list[str]]:
    from ray_vdr.corpus.store import PageStore

    store = PageStore.of(index) if not hasattr(index, "shards") else None
    vectors = np.array((store or PageStore(index.output, index.ids)).get(list(range(index.ids.num_rows)),
                                                                         "embedding"), np.float32)
    top = np.argsort(-(q @ vectors.T), axis=1, kind="stable")[:, :k]
    keys = index.ids.column("key").to_pylist()
    return [[keys[i] for i in row] for row in top]


def _queries(n: int = 20, seed: int = 3) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.mark.parametrize("quantization,shards", [("int8", 1), ("int8", 3), ("binary", 1), ("binary", 3)])
def test_quantized_codes_in_memory_rescored_from_float_vectors(tmp_path, quantization, shards):
    from ray_vdr.config import IndexConfig
    from ray_vdr.corpus.quantized import VECTORS_SUFFIX, QuantizedIndex
    from ray_vdr.corpus.shards import build_sharded
    from ray_vdr.corpus.store import open_index
    from ray_vdr.corpus.sync import compact_if_needed, delete
    from ray_vdr.corpus.versions import docs_table, live_ids, publish, read_docs

    settings = {"index_type": "flat", "quantization": quantization}
    out = tiny_versioned_index(tmp_path / "index", docs=40, pages_per_doc=5, dim=DIM, parts=4, shards=shards,
                               index=settings)
    index = open_index(str(out))
    m = index.manifest
    assert m.index.params["quantization"] == quantization
    parts = index.shards if shards > 1 else [index]
    files = [f"{out}/{r.index}" for r in m.index_shards] if shards > 1 else [f"{out}/{m.files.index}"]
    for part, f in zip(parts, files, strict=True):
        assert isinstance(part.index, QuantizedIndex)
        n = part.index.ntotal
        assert os.path.getsize(f + VECTORS_SUFFIX) == n * DIM * 4, "every float vector beside the codes"
        # what is resident: 1 byte (int8) or 1 bit (binary) per dimension, plus the codes index's header
        per = 1 if quantization == "int8" else 1 / 8
        assert os.path.getsize(f) <= n * DIM * per + 2 * DIM * 4 + 1024
        assert isinstance(part.index.vectors(), np.memmap)

    # the default rescore depth covers these 200 vectors: the rescored answer is exact search's, with exact scores
    q = _queries()
    hits = index.search(q, 10)
    assert [[h["key"] for h in row] for row in hits] == _exact(index, q, 10)
    vectors = np.concatenate([p.index.vectors() for p in parts])
    assert np.allclose([h["score"] for h in hits[0]], vectors[[h["position"] for h in hits[0]]] @ q[0], atol=1e-6)
    if quantization == "binary":  # without rescoring, 64 bits per vector lose most of the exact top 10
        for p in parts:
            p.index.rescore = 1
        codes_only = [[h["key"] for h in row] for row in index.search(q, 10)]
        for p in parts:
            p.index.rescore = m.index.params["rescore"]
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(codes_only, _exact(index, q, 10), strict=True)])
        assert overlap < 0.9, overlap

    # filters and a key's scope apply inside the codes search: top_k stays full and in scope
    docs = ["doc-1", "doc-7", "doc-22"]
    picked = index.search(q[:4], 10, clauses=[("doc_id", "in", docs)])
    assert all(len(r) == 10 and {h["doc_id"] for h in r} <= set(docs) for r in picked)
    one = index.search(q[:2], 3, clauses=[("doc_id", "eq", "doc-3")])  # 5 of 200: scored exactly, floats only
    for row, qv in zip(one, q[:2], strict=True):
        assert len(row) == 3 and {h["doc_id"] for h in row} == {"doc-3"}
        assert np.allclose([h["score"] for h in row], vectors[[h["position"] for h in row]] @ qv, atol=1e-6)
        assert [h["score"] for h in row] == sorted((h["score"] for h in row), reverse=True)
    scoped = index.search(q, 10, scope=[("collection", ["c1"])])
    assert all(len(r) == 10 and all(h["metadata"]["collection"] == "c1" for h in r) for r in scoped)

    # a new document extends the index (its codes and its vectors file); its page is found first for its vector
    current = m
    doc, rows = page_rows(out, 99, 3, DIM, np.random.default_rng(99))
    names = sorted([*current.shards, write_page_part(out, rows, DIM)])
    cfg = IndexConfig.model_validate({**settings, "shards": shards})
    if shards > 1:
        fields, ids = build_sharded(str(out), names, DIM, cfg, current, 2, shards)
    else:
        from ray_vdr.corpus.build import build_version

        fields, ids = build_version(str(out), names, DIM, cfg.model_dump(), current, 2)
    assert fields["extended"] and fields["added_vectors"] == 3
    from ray_vdr.corpus.manifest import IndexManifest

    new_files = fields.pop("files")
    docs_t = docs_table([*read_docs(str(out), current).to_pylist(), doc])
    publish(str(out), IndexManifest.model_validate({**current.model_dump(), **fields, "version": 2,
                                                    "files": {**current.files.model_dump(), **new_files}}),
            docs_t, live_ids(ids, docs_t), current)
    grown = open_index(str(out))
    assert grown.manifest.vectors == 203
    top = grown.search(np.array([rows[1]["embedding"]], np.float32), 1)[0][0]
    assert (top["doc_id"], top["page"]) == ("doc-99", 2) and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert os.path.getsize(files[0] + VECTORS_SUFFIX) == parts[0].index.ntotal * DIM * 4, "version 1 unchanged"

    # a deleted document is gone; compaction rebuilds over the live pages and answers as exact search
    delete(str(out), doc_ids=["doc-7"])
    assert "doc-7" not in {h["doc_id"] for r in open_index(str(out)).search(q, 50) for h in r}
    before = open_index(str(out)).manifest
    # compaction with a config that names no quantization (as `ray-vdr delete -c <another config>`) keeps the codes
    c = compact_if_needed(str(out), IndexConfig(shards=shards).model_dump(), share=0.01)
    assert c is not None
    compacted = open_index(str(out))
    assert compacted.manifest.vectors == 198 and compacted.manifest.index.params["quantization"] == quantization
    if shards > 1:
        assert len(c.shards_rebuilt) == 1, "only the shard that held doc-7"
        kept = [r for r in compacted.manifest.index_shards if r.action == "kept"]
        assert len(kept) == 2 and all(r.index == before.index_shards[r.shard].index for r in kept)
    assert [[h["key"] for h in r] for r in compacted.search(q, 10)] == _exact(compacted, q, 10)


def test_a_remote_quantized_index_maps_its_vectors_from_a_local_cache(tmp_path, monkeypatch):
    """Object storage stands in as a SubTreeFileSystem (no object store here): the vectors file is copied once into
    RAY_VDR_LOCAL_CACHE and memory-mapped there; a second load reuses the copy."""
    from ray_vdr.corpus import build
    from ray_vdr.corpus.store import open_index

    out = tiny_versioned_index(tmp_path / "index", docs=10, pages_per_doc=4, dim=DIM,
                               index={"quantization": "binary", "rescore": 10})
    local = open_index(str(out))
    real = build.fs_path

    def remote(uri: str):
        fs, path = real(uri)
        return pafs.SubTreeFileSystem("/", fs), path

    monkeypatch.setattr(build, "fs_path", remote)
    monkeypatch.setenv("RAY_VDR_LOCAL_CACHE", str(tmp_path / "cache"))
    first = open_index(str(out))
    cached = [f for f in (tmp_path / "cache").iterdir() if f.name.endswith(".f32")]
    assert len(cached) == 1 and cached[0].stat().st_size == 40 * DIM * 4
    assert os.path.samefile(first.index.vectors().filename, cached[0])
    stamp = cached[0].stat().st_mtime_ns
    q = _queries(5)
    assert [[h["key"] for h in r] for r in open_index(str(out)).search(q, 5)] == \
        [[h["key"] for h in r] for r in local.search(q, 5)]
    assert cached[0].stat().st_mtime_ns == stamp, "the cached copy is reused, not copied again"


def test_a_slim_replica_holds_few_bytes_per_page_and_reads_results_on_demand(tmp_path, monkeypatch):
    """A replica's ids are memory-mapped (nothing per page from Arrow's allocator), its filter columns are
    dictionary-encoded: live mask + filter columns ≤ 64 B/page; results still carry source, metadata and hashes."""
    import pyarrow as pa

    from ray_vdr.corpus.store import open_index

    monkeypatch.setenv("RAY_VDR_LOCAL_CACHE", str(tmp_path / "cache"))
    out = tiny_versioned_index(tmp_path / "index", docs=2000, pages_per_doc=10, dim=8, parts=4)
    pa.default_memory_pool().release_unused()
    before = pa.total_allocated_bytes()
    index = open_index(str(out))
    n = index.ids.num_rows
    assert n == 20_000 and index.ids.nbytes > 100 * n, "the ids table is wide (keys, sources, hashes, metadata)"
    hits = index.search(_queries(3)[:, :8].copy(), 5, clauses=[("collection", "eq", "c1")])
    live = index.allowed()
    held = pa.total_allocated_bytes() - before + index.fields.nbytes() + (live.nbytes if live is not None else 0)
    assert held <= 64 * n, f"{held / n:.1f} B/page resident"
    print(f"slim replica: {held / n:.1f} B/page held of the ids' {index.ids.nbytes / n:.0f} B/page")
    h = hits[0][0]
    assert h["metadata"]["collection"] == "c1" and h["source"].endswith(".pdf") and len(h["file_hash"]) == 64
    assert not [f for f in (tmp_path / "cache").iterdir() if f.name.startswith(".ids-")], "mapped files unlinked"
