"""A living index on a real local Ray cluster: a sync that adds, updates and removes documents, metadata-only
updates, rejected sidecars, filtered search, deletes, compaction and append mode; a writer killed before its commit
(no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_vdr.config import load_config
from tests.corpus_helpers import images_pdf

ROOT = Path(__file__).resolve().parents[2]


# a multi-vector index, as small as the tiny model's 32-d tokens make sense: pooled pages (half their tokens), int8
# token vectors, a 256-d FDE first stage handing every page to MaxSim (so a page's own tokens must find it first)
LATE = ["index.late.pooling=2", "index.late.storage=int8", "index.late.k_sim=3", "index.late.d_proj=8",
        "index.late.reps=4"]


def _cfg(tiny_qwen, corpus, out, *extra):
    return load_config(ROOT / "configs/demo.yaml", [
        f"index.model={tiny_qwen}", f"index.sources=[{corpus}]", f"index.output={out}", "index.batch_size=4",
        "index.dim=32", "synthetic=null", "index.compact_removed_share=1.0", *LATE, *extra])


def _stored(out: Path) -> dict[str, np.ndarray]:
    """Every stored page's vector by key (live or not: shards keep removed pages until compaction); a multi-vector
    index: its token vectors, as the index scores them."""
    from ray_vdr.corpus.late import unpack_tokens
    from ray_vdr.corpus.manifest import CorpusBinding
    from ray_vdr.corpus.store import EMBEDDING_FILE

    late = CorpusBinding.model_validate_json((out / EMBEDDING_FILE).read_text()).late
    t = pq.read_table(out / "pages", columns=["key", "embedding"] + (["tokens"] if late else []))
    vectors = t.column("embedding").to_numpy(zero_copy_only=False) if late is None else [
        unpack_tokens(b, late.token_dim, late.storage) for b in t.column("tokens").to_pylist()]
    return dict(zip(t.column("key").to_pylist(), vectors, strict=True))


def _q(*vectors) -> np.ndarray | list[np.ndarray]:
    """Queries for ``search``: vectors stacked, or (multi-vector) a list of token matrices."""
    return list(vectors) if vectors[0].ndim == 2 else np.stack(vectors)


def _pages_of(index, doc_id: str) -> list[str]:
    ids = index.ids.to_pylist()
    return [r["key"] for r in ids if r["doc_id"] == doc_id and r["live"]]


def test_a_sync_reads_only_sources_whose_size_or_time_changed(tmp_path, page_pngs, monkeypatch):
    """The hashing stage (no Ray), through a filesystem that counts what is opened: a resync of an unchanged corpus
    opens no source (the metadata sidecars alone), a touched file with the same bytes is read and keeps its hash, an
    edited one is read and gets a new hash; index.rehash reads them all."""
    import pyarrow.fs as pafs

    from ray_vdr.corpus import sync
    from ray_vdr.corpus.pages import list_sources
    from ray_vdr.corpus.versions import docs_table

    src = tmp_path / "docs"
    src.mkdir()
    for i in range(3):
        (src / f"p{i}.png").write_bytes(page_pngs[i])
    (src / "p0.png.json").write_text('{"collection": "a"}')
    opened: list[str] = []

    class Counting:
        def __init__(self):
            self.local = pafs.LocalFileSystem()

        def open_input_stream(self, path):
            opened.append(Path(path).name)
            return self.local.open_input_stream(path)

    monkeypatch.setattr(sync, "fs_path", lambda uri: (Counting(), str(Path(uri).resolve())))

    def synced(docs):
        files = list_sources([str(src)])
        listed = [sync.hash_file(asdict(f)) for f in sync.reuse_hashes(files, docs)]
        plan = sync.plan(listed, docs, "sync")
        return listed, plan, docs_table(plan.docs)

    first, _, docs = synced(docs_table([]))
    assert sorted(opened) == ["p0.png", "p0.png.json", "p1.png", "p2.png"] and all(r["hashed"] for r in first)
    opened.clear()
    again, plan, docs = synced(docs)
    assert opened == ["p0.png.json"] and not any(r["hashed"] for r in again), "no source read"
    assert [r["file_hash"] for r in again] == [r["file_hash"] for r in first] and plan.documents["unchanged"] == 3

    opened.clear()
    st = os.stat(src / "p1.png")
    os.utime(src / "p1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    (src / "p2.png").write_bytes(page_pngs[3])
    third, plan, docs = synced(docs)
    assert sorted(opened) == ["p0.png.json", "p1.png", "p2.png"]
    assert [r["file_hash"] == f["file_hash"] for r, f in zip(third, first, strict=True)] == [True, True, False]
    assert (plan.documents["unchanged"], plan.documents["updated"]) == (2, 1)
    assert [f.doc_id for f in plan.embed] == ["p2.png"]
    stamps = dict(zip(docs.column("doc_id").to_pylist(), docs.column("stamp").to_pylist(), strict=True))
    assert stamps["p1.png"] == f"{st.st_size}:{st.st_mtime_ns + 10**9}", "the touched file's new time is recorded"
    opened.clear()
    files = list_sources([str(src)])  # index.rehash: the run hashes the listed files as they are
    [sync.hash_file(asdict(f)) for f in files]
    assert sorted(opened) == ["p0.png", "p0.png.json", "p1.png", "p2.png"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_colqwen"], ids=["single_vector", "multi_vector"])
def test_sync_mirrors_changing_sources_and_deletes_stick(ray_local, model, page_pngs, tmp_path, capsys, request):
    """Parametrised over a single-vector and a multi-vector (token vectors, FDE first stage, MaxSim) index."""
    from ray_vdr.cli import cmd_delete
    from ray_vdr.corpus.embed import run
    from ray_vdr.corpus.store import PageStore, open_index
    from ray_vdr.corpus.sync import compact, delete

    tiny_qwen = request.getfixturevalue(model)
    docs, out = tmp_path / "docs", tmp_path / "index"
    docs.mkdir()
    p = page_pngs
    (docs / "a.pdf").write_bytes(images_pdf(p[0:2]))
    (docs / "a.pdf.json").write_text(json.dumps({"collection": "finance", "year": 2021}))
    (docs / "b.pdf").write_bytes(images_pdf(p[2:4]))
    (docs / "b.pdf.json").write_text(json.dumps({"collection": "legal", "published": "2022-03-01"}))
    (docs / "c.pdf").write_bytes(images_pdf(p[4:5]))
    (docs / "d.png").write_bytes(p[5])
    # a Parquet source: its other scalar columns are each row's metadata; a wrong type rejects that row
    pq.write_table(pa.table({"doc_id": ["scan-1", "scan-2", "scan-3"], "image": p[13:16],
                             "collection": ["scans", "scans", "scans"], "year": [2019, 2020, 2020],
                             "tenant": pa.array([None, None, 5], pa.int64())}), docs / "scans.parquet")
    table = tmp_path / "meta.jsonl"
    table.write_text(json.dumps({"doc_id": "c.pdf", "tenant": "t1", "collection": "hr"}) + "\n")
    v1 = run(_cfg(tiny_qwen, docs, out, f"index.metadata={table}"))
    assert v1.summary.documents["added"] == 5 and v1.summary.pages.added == 8
    assert v1.summary.sources_read == 5 and v1.summary.source_bytes_read == sum(
        (docs / n).stat().st_size for n in ("a.pdf", "b.pdf", "c.pdf", "d.png", "scans.parquet"))
    bad_row = pq.read_table(out / "rejects").to_pylist()
    assert [(r["doc_id"], r["reason"]) for r in bad_row] == [("scan-3", "bad_metadata_type")], bad_row
    first = open_index(str(out))
    if model == "tiny_colqwen":  # token vectors stored pooled and int8, an FDE per page in the FAISS index
        assert v1.manifest.late.pooling == 2 and v1.manifest.vector_dim == first.index.d == 256
        assert all(0 < len(t) <= 25 for t in _stored(out).values()), "48 tokens a page, pooled to about half"
    old_b, old_c = _pages_of(first, "b.pdf"), _pages_of(first, "c.pdf")
    assert len(old_b) == 2 and len(old_c) == 1
    assert first.search(_q(_stored(out)[old_c[0]]), 1)[0][0]["metadata"] == {"tenant": "t1", "collection": "hr"}

    # change b (3 new pages), delete c, add e, change a's metadata only, add two documents with bad sidecars; touch d
    # (a new modification time, the same bytes): it is read again, hashed and kept
    (docs / "b.pdf").write_bytes(images_pdf(p[6:9]))
    (docs / "c.pdf").unlink()
    (docs / "e.pdf").write_bytes(images_pdf(p[9:10]))
    (docs / "a.pdf.json").write_text(json.dumps({"collection": "finance-2", "year": 2021}))
    (docs / "f.pdf").write_bytes(images_pdf(p[10:11]))
    (docs / "f.pdf.json").write_text('{"collection": "x",')
    (docs / "g.pdf").write_bytes(images_pdf(p[11:12]))
    (docs / "g.pdf.json").write_text('{"tenant": 5}')
    os.utime(docs / "d.png", ns=(os.stat(docs / "d.png").st_atime_ns, os.stat(docs / "d.png").st_mtime_ns + 10**9))
    v2 = run(_cfg(tiny_qwen, docs, out, f"index.metadata={table}"))
    s = v2.summary
    assert s.sources_read == 5, "b, e, f, g and the touched d; not a (its metadata alone changed) nor scans.parquet"
    assert s.documents == {"added": 1, "updated": 1, "removed": 1, "unchanged": 2, "metadata_updated": 1,
                              "rejected": 2}
    assert s.pages.model_dump() == {"added": 4, "removed": 3, "unchanged": 5}
    assert s.pages_embedded == 4, "a metadata-only change is not re-embedded; unchanged files are skipped"
    assert {(r["doc_id"], r["reason"]) for r in s.documents_rejected} == {
        ("f.pdf", "invalid_metadata_json"), ("g.pdf", "bad_metadata_type")}
    index = open_index(str(out))
    stored = _stored(out)
    live = [r["key"] for r in index.ids.to_pylist() if r["live"]]
    assert len(live) == len(set(live)) == 9 and v2.manifest.version == 2
    assert not {r["doc_id"] for r in index.ids.to_pylist() if r["live"]} & {"c.pdf", "f.pdf", "g.pdf"}
    for gone in old_b + old_c:  # a removed page's own vector does not find it, at any depth
        hits = index.search(_q(stored[gone]), 50)[0]
        assert gone not in {h["key"] for h in hits} and len(hits) == 9
    for key in live:
        assert index.search(_q(stored[key]), 1)[0][0]["key"] == key
    assert PageStore(str(out), index.ids).position("c.pdf", None) is None, "/pages does not serve a removed page"

    # metadata is returned and filterable; the filter applies inside the search (top-k full)
    hits = index.search(_q(stored[live[0]]), 10, [("collection", "eq", "finance-2")])[0]
    assert len(hits) == 2 and {h["doc_id"] for h in hits} == {"a.pdf"}
    assert hits[0]["metadata"] == {"collection": "finance-2", "year": 2021}
    assert {h["doc_id"] for h in index.search(_q(stored[live[0]]), 10, [("year", "gte", 2021)])[0]} == {"a.pdf"}
    scoped = index.search(_q(stored[live[0]]), 10, scope=[("collection", ["finance-2", "scans"])])[0]
    assert {h["doc_id"] for h in scoped} == {"a.pdf", "scan-1", "scan-2"}, "an API key's scope"
    rows = index.search(_q(stored[live[0]]), 10, [("collection", "eq", "scans")])[0]
    assert sorted((h["doc_id"], h["metadata"]["year"]) for h in rows) == [("scan-1", 2019), ("scan-2", 2020)]

    # deletes: by doc_id, by filter; one that matches nothing says so
    assert delete(str(out), doc_ids=["e.pdf"]).pages_removed == 1
    assert delete(str(out), filter={"collection": "legal"}).documents_removed == 1
    assert cmd_delete(_cfg(tiny_qwen, docs, out), ["nope.pdf"], [], None) == 1
    assert "nothing to delete" in capsys.readouterr().err
    after = open_index(str(out))
    assert after.manifest.version == 4 and after.manifest.live_pages == 5
    assert {h["doc_id"] for row in after.search(_q(*stored.values()), 20) for h in row} == {
        "a.pdf", "d.png", "scan-1", "scan-2"}

    # compaction drops removed pages from the index and the shards, and the retired shards go with the next version
    c = compact(str(out), _cfg(tiny_qwen, docs, out).index.model_dump())
    compacted = open_index(str(out))
    assert compacted.index.ntotal == compacted.manifest.live_pages == 5 and compacted.live is None
    retired = compacted.manifest.retired_shards
    assert c.retired_shards == len(retired) > 0 and all((out / "pages" / n).exists() for n in retired)
    in_shards = [k for n in compacted.manifest.shards
                 for k in pq.read_table(out / "pages" / n, columns=["key"]).column("key").to_pylist()]
    assert sorted(in_shards) == sorted(compacted.ids.column("key").to_pylist())
    for key in [r["key"] for r in compacted.ids.to_pylist()]:
        assert compacted.search(_q(stored[key]), 1)[0][0]["key"] == key
    v6 = run(_cfg(tiny_qwen, docs, out, f"index.metadata={table}"))  # brings back b and e (still in the sources)
    assert v6.summary.documents["added"] == 2 and not any((out / "pages" / n).exists() for n in retired)
    assert v6.summary.sources_read == 4, "the deleted b and e, the rejected f and g: a, d and scans are not read"
    again = run(_cfg(tiny_qwen, docs, out, f"index.metadata={table}")).summary  # nothing changed
    assert again.documents["unchanged"] == 5 and again.pages_embedded == 0
    assert again.sources_read == 2, "only f and g, rejected for their metadata (no document remembers them)"
    assert not set(_stored(out)) & set(old_b + old_c), "removed pages are gone from storage"

    # append mode keeps a changed file's old pages
    (docs / "d.png").write_bytes(p[12])
    appended = run(_cfg(tiny_qwen, docs, out, "index.mode=append", f"index.metadata={table}"))
    assert appended.summary.pages.removed == 0 and appended.summary.pages.added == 1
    assert len(_pages_of(open_index(str(out)), "d.png")) == 2


def test_writer_killed_before_its_commit_leaves_the_previous_version(tmp_path):
    """A delete SIGKILLed after writing its version's files, before the commit: the index still serves the previous
    version; the rerun publishes the same version once."""
    from ray_vdr.corpus.store import open_index
    from ray_vdr.corpus.sync import delete
    from tests.corpus_helpers import tiny_versioned_index

    out = tiny_versioned_index(tmp_path / "index", docs=4, pages_per_doc=3)
    code = "import sys; from ray_vdr.corpus.sync import delete; delete(sys.argv[1], doc_ids=['doc-1'])"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RAY_VDR_CHAOS_PUBLISH": "before_commit"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "versions" / "v-000002" / "manifest.json").exists(), "killed after writing the version's files"
    index = open_index(str(out))
    assert index.manifest.version == 1 and index.manifest.live_pages == 12
    summary = delete(str(out), doc_ids=["doc-1"])
    index = open_index(str(out))
    assert summary.version == index.manifest.version == 2 and index.manifest.live_pages == 9
    keys = index.ids.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 12 and "doc-1" not in {r["doc_id"] for r in index.ids.to_pylist()
                                                                   if r["live"]}
