"""Sharded indexes without Ray: documents kept whole in one shard, searches over the shards equal to one index's,
filters and key scopes inside each shard, and changes that rebuild only the shards they touch."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest

from tests.corpus_helpers import page_rows, tiny_versioned_index, write_page_part

DIM = 16


def _queries(n: int = 20, seed: int = 7) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _keys(hits: list[list[dict]]) -> list[list[tuple[str, int]]]:
    return [[(h["doc_id"], h["page"]) for h in row] for row in hits]


def _shard_files(manifest) -> dict[int, str | None]:
    return {r.shard: r.index for r in manifest.index_shards}


def test_a_sharded_flat_index_answers_as_one_index_and_changes_rebuild_only_their_shards(tmp_path):
    from ray_vdr.config import IndexConfig
    from ray_vdr.corpus.manifest import IndexManifest
    from ray_vdr.corpus.shards import SHARD_COLUMN, build_sharded, shard_of
    from ray_vdr.corpus.store import PageStore, open_index
    from ray_vdr.corpus.sync import compact_if_needed, delete
    from ray_vdr.corpus.versions import docs_table, live_ids, publish, read_docs

    one = tiny_versioned_index(tmp_path / "one" / "index", docs=30, pages_per_doc=4, parts=5)
    out = tiny_versioned_index(tmp_path / "three" / "index", docs=30, pages_per_doc=4, parts=5, shards=3)
    whole, sharded = open_index(str(one)), open_index(str(out))
    m = sharded.manifest
    assert len(m.index_shards) == 3 and m.vectors == 120 and m.files.index is None
    assert all(r.vectors > 0 and r.action == "built" for r in m.index_shards)
    assert [r.offset for r in m.index_shards] == [0, m.index_shards[0].vectors,
                                                  m.index_shards[0].vectors + m.index_shards[1].vectors]
    ids = sharded.ids.to_pylist()
    home = {}
    for r in ids:  # every page of a document in its document's shard
        assert home.setdefault(r["doc_id"], r[SHARD_COLUMN]) == r[SHARD_COLUMN]
        assert r[SHARD_COLUMN] == shard_of([r["doc_id"]], 3)[0]

    # exact search over three shards = exact search over one index (same pages, scores)
    q = _queries()
    a, b = whole.search(q, 10), sharded.search(q, 10)
    assert _keys(a) == _keys(b)
    assert np.allclose([[h["score"] for h in r] for r in a], [[h["score"] for h in r] for r in b], atol=1e-6)

    # a shard opened alone (one Retriever's share) returns the version's positions of its own pages
    s1 = open_index(str(out), shard=1)
    assert s1.ids.num_rows == m.index_shards[1].vectors and s1.offset == m.index_shards[1].offset
    for row in s1.search(q, 5):
        for h in row:
            assert ids[h["position"]]["key"] == h["key"] and ids[h["position"]][SHARD_COLUMN] == 1
    store = PageStore.of(s1)
    doc1 = next(d for d, s in home.items() if s == 1)
    pos = store.position(doc1, 2)
    assert ids[pos]["doc_id"] == doc1 and ids[pos]["page"] == 2 and s1.visible(pos, None)
    assert store.get([pos], "embedding")[0] == pytest.approx(sharded.shards[1].index.reconstruct(pos - s1.offset))
    assert not s1.visible(m.index_shards[2].offset, None), "another shard's position is not this shard's"
    assert open_index(str(out), shard=5).ids.num_rows == 0, "a shard the index does not have is empty"
    assert open_index(str(one), shard=0).ids.num_rows == 120, "shard 0 of an unsharded index is all of it"

    # a selective filter matching pages of one shard only still fills top_k; a key's scope holds in every shard
    docs_in_0 = sorted(d for d, s in home.items() if s == 0)[:3]
    hits = sharded.search(q[:3], 10, clauses=[("doc_id", "in", docs_in_0)])
    assert all(len(r) == 10 and {h["doc_id"] for h in r} <= set(docs_in_0) for r in hits)
    scoped = sharded.search(q, 10, scope=[("collection", ["c0"])])
    assert all(len(r) == 10 and all(h["metadata"]["collection"] == "c0" for h in r) for r in scoped)
    assert _keys(scoped) == _keys(whole.search(q, 10, scope=[("collection", ["c0"])]))

    # a delete rewrites the ids only, and names the shard holding the document
    victim = docs_in_0[0]
    d = delete(str(out), doc_ids=[victim])
    assert d.shards_changed == [0] and d.pages_removed == 4
    after = open_index(str(out))
    assert _shard_files(after.manifest) == _shard_files(m), "no FAISS file rewritten by a delete"
    assert victim not in {h["doc_id"] for r in after.search(q, 120) for h in r}
    delete(str(one), doc_ids=[victim])

    # compaction past the share rebuilds only shard 0 (the others keep their files), and still answers as one index
    c = compact_if_needed(str(out), IndexConfig().model_dump(), share=0.01)
    assert c is not None and c.shards_rebuilt == [0] and c.removed_pages_dropped == 4
    compacted = open_index(str(out))
    files = _shard_files(compacted.manifest)
    assert files[1] == _shard_files(m)[1] and files[2] == _shard_files(m)[2] and files[0] != _shard_files(m)[0]
    assert compacted.manifest.vectors == 116 and compacted.manifest.removed_pages == 0
    assert _keys(compacted.search(q, 10)) == _keys(open_index(str(one)).search(q, 10))
    store = PageStore.of(compacted)  # every position's page is where its ids say (moved rows re-pointed)
    emb = np.array(store.get(list(range(116)), "embedding"), np.float32)
    recon = np.concatenate([s.index.reconstruct_n(0, s.index.ntotal) for s in compacted.shards])
    assert np.allclose(emb, recon, atol=1e-6), "every position's stored vector is its index vector"

    # pages added to the corpus extend only the shard their document hashes to
    current = compacted.manifest
    doc, rows = page_rows(out, 99, 3, DIM, np.random.default_rng(99))
    new_part = write_page_part(out, rows, DIM)
    target = int(shard_of([doc["doc_id"]], 3)[0])
    fields, new_ids = build_sharded(str(out), sorted([*current.shards, new_part]), DIM, IndexConfig(), current,
                                    current.version + 1, 3)
    assert {r.shard: r.action for r in fields["index_shards"]} == {s: "extended" if s == target else "kept"
                                                                   for s in range(3)}
    docs = docs_table([*read_docs(str(out), current).to_pylist(), doc])
    files = fields.pop("files")
    grown = publish(str(out), IndexManifest.model_validate({
        **current.model_dump(), **fields, "version": current.version + 1,
        "files": {**current.files.model_dump(), **files}}), docs, live_ids(new_ids, docs), current)
    index = open_index(str(out))
    assert grown.vectors == 119 and json.loads(index.ids.filter(
        pc.equal(index.ids.column("doc_id"), doc["doc_id"])).column("metadata")[0].as_py())["collection"] == "c1"
    top = index.search(np.array([rows[0]["embedding"]], np.float32), 1)[0][0]
    assert top["doc_id"] == "doc-99" and top["page"] == 1


def test_sharded_ivf_shares_one_coarse_quantizer(tmp_path):
    """IVF shards start from one trained quantiser: the same centroids in every shard, so a score and nprobe mean the
    same everywhere; with every list probed the shards answer as exact search does."""
    import faiss

    from ray_vdr.corpus.build import read_index_file

    out = tiny_versioned_index(tmp_path / "index", docs=40, pages_per_doc=10, parts=8, shards=3,
                               index={"index_type": "ivf_sq8", "ivf_nlist": 4, "ivf_nprobe": 4})
    exact = tiny_versioned_index(tmp_path / "flat" / "index", docs=40, pages_per_doc=10, parts=8)
    from ray_vdr.corpus.store import open_index

    index = open_index(str(out))
    m = index.manifest
    assert m.index.type == "ivf_sq8" and m.files.quantizer and len(m.index_shards) == 3
    held = [read_index_file(str(out), m.files.quantizer), *(s.index for s in index.shards)]  # alive while read
    centroids = [faiss.extract_index_ivf(x).quantizer.reconstruct_n(0, 4) for x in held]
    assert all(np.array_equal(centroids[0], c) for c in centroids[1:])
    q = _queries(30)
    got, want = _keys(index.search(q, 10)), _keys(open_index(str(exact)).search(q, 10))
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= 0.95, recall
