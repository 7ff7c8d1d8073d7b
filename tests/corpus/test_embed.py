"""The corpus embedding job on a real local Ray cluster: exactly-once output and index, reruns that skip what is
done, growth of the corpus, a killed embedding actor and an interrupted job; plus batch invariance (no Ray)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_vdr.config import load_config
from tests.corpus_helpers import write_corpus

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tiny_qwen, corpus, out, *extra):
    return load_config(ROOT / "configs/demo.yaml", [
        f"index.model={tiny_qwen}", f"index.sources=[{corpus}]", f"index.output={out}", "index.batch_size=4",
        "index.dim=32", "synthetic=null", *extra])


def _output_rows(out: Path) -> tuple[list[str], list[str], Counter]:
    pages = pq.read_table(out / "pages", columns=["key"]).column("key").to_pylist()
    rejects = pq.read_table(out / "rejects", columns=["key", "reason"])
    return pages, rejects.column("key").to_pylist(), Counter(rejects.column("reason").to_pylist())


def _assert_exactly_once(out: Path, expected: dict, index) -> None:
    pages, rejects, reasons = _output_rows(out)
    assert len(pages) == len(set(pages)) == expected["pages"], "every good page once in the output"
    assert len(rejects) == len(set(rejects)) and reasons == expected["rejects"]
    assert len(pages) + len(rejects) == expected["inputs"]
    ids = index.ids.column("key").to_pylist()
    assert sorted(ids) == sorted(pages) and index.index.ntotal == len(pages), "every page once in the index"


@pytest.mark.slow
def test_embed_corpus_exactly_once_rerun_and_growth(ray_local, tiny_qwen, page_pngs, tmp_path):
    from ray_vdr.corpus.embed import run
    from ray_vdr.corpus.store import IndexMismatch, PageStore, open_index

    corpus, out = tmp_path / "corpus", tmp_path / "index"
    corpus.mkdir()
    expected = write_corpus(corpus, page_pngs[:20])
    result = run(_cfg(tiny_qwen, corpus, out, "index.thumbnail_side=96"))
    s = result.summary
    assert (s.pages_embedded, s.pages_rejected) == (expected["pages"], sum(expected["rejects"].values()))
    m = result.manifest
    assert m.dim == 32 and m.index.type == "flat" and m.vectors == expected["pages"]
    assert m.model.document_prompt == "Represent the user's input." and m.model.fingerprint
    assert m.model.pixel_bounds.model_dump() == {"min_pixels": 1024, "max_pixels": 16384}  # demo config's bounds
    index = open_index(str(out), model_path=str(tiny_qwen), dim=32)
    _assert_exactly_once(out, expected, index)

    # each page's stored vector finds that page first; its stored image and thumbnail are served back
    table = pq.read_table(out / "pages", columns=["key", "embedding"])
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5), "normalised after truncation"
    hits = index.search(vectors[:5], k=3)
    assert [h[0]["key"] for h in hits] == table.column("key").to_pylist()[:5]
    for store in (PageStore.open(str(out)), PageStore.of(index)):  # as the serving and mining code open it
        thumb = store.get([hits[0][0]["position"]], "thumbnail")[0]
        assert thumb[:2] == b"\xff\xd8" and max(Image.open(io.BytesIO(thumb)).size) == 96, "a JPEG, at the side set"

    # a rerun over the same sources embeds nothing and leaves the index as it was
    again = run(_cfg(tiny_qwen, corpus, out))
    assert again.summary.pages_embedded == again.summary.pages_rejected == 0
    assert again.summary.pages_done_before == expected["inputs"] and again.manifest.vectors == expected["pages"]

    # new files: only they are embedded, and the index is extended, not rebuilt
    (corpus / "more").mkdir()
    for i, png in enumerate(page_pngs[20:26]):
        (corpus / "more" / f"new-{i}.png").write_bytes(png)
    grown = run(_cfg(tiny_qwen, corpus, out))
    assert grown.summary.pages_embedded == 6 and grown.manifest.extended
    assert grown.manifest.added_vectors == 6
    expected = {**expected, "pages": expected["pages"] + 6, "inputs": expected["inputs"] + 6}
    _assert_exactly_once(out, expected, open_index(str(out)))

    # the index refuses another dimension, and another model cannot add to it
    with pytest.raises(IndexMismatch, match="32-d embeddings"):
        open_index(str(out), dim=64)
    with pytest.raises(IndexMismatch, match="32-d embeddings"):
        run(_cfg(tiny_qwen, corpus, out, "index.dim=16"))


@pytest.mark.slow
def test_killed_embedding_actor_still_exactly_once(ray_local, tiny_qwen, page_pngs, tmp_path):
    from ray_vdr.corpus.embed import run
    from ray_vdr.corpus.store import open_index

    corpus, out = tmp_path / "corpus", tmp_path / "index"
    corpus.mkdir()
    expected = write_corpus(corpus, page_pngs[:24])
    marker = tmp_path / "killed"
    run(_cfg(tiny_qwen, corpus, out), chaos={"after_batches": 2, "marker": str(marker)})
    assert marker.exists(), "the actor was killed after publishing a shard"
    _assert_exactly_once(out, expected, open_index(str(out)))


@pytest.mark.slow
def test_interrupted_job_resumes_exactly_once(ray_local, tiny_qwen, page_pngs, tmp_path):
    """A sync (its own process and Ray cluster) is SIGKILLed mid-stream: the index still serves its previous version;
    the rerun embeds only what is missing and publishes every page once."""
    from ray_vdr.corpus.embed import run
    from ray_vdr.corpus.store import open_index

    corpus, out, held = tmp_path / "corpus", tmp_path / "index", tmp_path / "held"
    corpus.mkdir()
    expected = write_corpus(corpus, page_pngs[:24])
    shutil.move(corpus / "scans" / "2021", held)  # version 1 without them
    v1 = run(_cfg(tiny_qwen, corpus, out)).manifest
    shutil.move(held, corpus / "scans" / "2021")
    v1_shards = len(list((out / "pages").glob("part-*.parquet")))
    temp = Path(tempfile.mkdtemp(prefix="rvdr-", dir="/tmp"))  # Ray's socket paths must stay short
    code = ("import sys; from ray_vdr.cluster import init_ray; from ray_vdr.config import load_config; "
            "from ray_vdr.corpus.embed import run; init_ray(num_cpus=2, temp_dir=sys.argv[2]); "
            "run(load_config(sys.argv[3], sys.argv[4:]), chaos={'sleep': 1.0})")
    overrides = [f"index.model={tiny_qwen}", f"index.sources=[{corpus}]", f"index.output={out}", "index.batch_size=4",
                 "index.dim=32", "synthetic=null"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "job.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code, "x", str(temp), str(ROOT / "configs/demo.yaml"),
                                 *overrides], cwd=ROOT, env=env, start_new_session=True, stdout=fh, stderr=fh)
    try:
        deadline = time.time() + 240
        while len(list((out / "pages").glob("part-*.parquet"))) < v1_shards + 1:
            assert proc.poll() is None, f"the job ended before it could be interrupted:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no shard within 240 s"
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
    done = len(pq.read_table(out / "pages", columns=["key"]))
    assert v1.vectors < done < expected["pages"]
    still = open_index(str(out))
    assert still.manifest.version == 1 and still.index.ntotal == v1.vectors, "the previous version is served"
    result = run(_cfg(tiny_qwen, corpus, out))
    assert result.summary.pages_done_before >= done and result.manifest.version == 2
    assert result.summary.pages_embedded <= expected["pages"] - done
    _assert_exactly_once(out, expected, open_index(str(out)))


def _kill_cluster(temp: Path) -> None:
    """SIGKILL, by PID, the processes of the Ray cluster this test started under ``temp``, and no other."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(temp).encode() in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.mark.slow
def test_every_job_encodes_as_the_index_does(ray_local, tiny_remote_code, page_pngs, tmp_path):
    """One encoder for "the embedder this index was built with" (IndexEncoder), for a model that needs its own code
    (a custom module in its folder, loaded only with trust_remote_code): with the config's query and document prompts
    overridden, the embedding job stores page vectors, and mining, two-stage evaluation, promotion's comparison and
    the endpoint's query encoder all load it from the binding (which records trust_remote_code) and encode a query
    exactly as Sentence Transformers itself does with those prompts, the config's pixel bounds and the index's
    dimension (evaluation once used the model's saved prompts; mining and serving once could not load such a
    model)."""
    from sentence_transformers import SentenceTransformer

    from ray_vdr.config import ServeConfig
    from ray_vdr.corpus.embed import run
    from ray_vdr.corpus.live import generation
    from ray_vdr.corpus.store import read_manifest
    from ray_vdr.eval import two_stage
    from ray_vdr.eval.mine import NegativeMiner
    from ray_vdr.models.load import load_embedder
    from ray_vdr.models.processor import install_image_only_processor
    from ray_vdr.promote import generation_binding
    from serving.core import query_encoder

    corpus, out = tmp_path / "corpus", tmp_path / "index"
    corpus.mkdir()
    for i, png in enumerate(page_pngs[:4]):
        (corpus / f"page-{i}.png").write_bytes(png)
    prompts = {"query": "Find the report page that answers the question.", "document": "A page of an annual report."}
    cfg = _cfg(tiny_remote_code, corpus, out, f"model.query_prompt={prompts['query']}",
               f"model.document_prompt={prompts['document']}", "model.trust_remote_code=true")
    run(cfg)
    manifest = read_manifest(str(out))
    assert (manifest.model.query_prompt, manifest.model.document_prompt) == (prompts["query"], prompts["document"])
    assert manifest.model.trust_remote_code, "the binding records that the model needs its own code"
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_embedder(manifest.model.model_copy(update={"trust_remote_code": False}))

    # the reference: Sentence Transformers itself, with the overriding prompts and the config's pixel bounds
    install_image_only_processor()
    st = SentenceTransformer(str(tiny_remote_code), device="cpu", trust_remote_code=True)
    st[0].processor.image_processor.size = {"shortest_edge": cfg.model.min_pixels, "longest_edge": cfg.model.max_pixels}
    kwargs = {"truncate_dim": 32, "normalize_embeddings": True, "convert_to_numpy": True}
    query = ["What was Northwind Logistics' Q3 2021 revenue?"]
    want = st.encode(query, prompt=prompts["query"], **kwargs)
    assert not np.allclose(want, st.encode_query(query, **kwargs), atol=1e-4), "the override changes the vector"
    table = pq.read_table(out / "pages", columns=["doc_id", "embedding"]).sort_by("doc_id")
    stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    pages = [Image.open(corpus / d).convert("RGB") for d in table.column("doc_id").to_pylist()]
    assert np.abs(stored - st.encode(pages, prompt=prompts["document"], **kwargs)).max() < 1e-5, "the job's pages"

    miner = NegativeMiner(str(out), str(tiny_remote_code), {**cfg.mine.model_dump(), "output": str(tmp_path / "m")},
                          "auto", "auto", use_gpu=False, cpus=2)
    live = generation(str(out), str(tiny_remote_code), 32)
    encoders = {
        "mining": miner.miner.encoder,
        "two-stage evaluation": two_stage.evaluated_encoder(cfg, two_stage.config_binding(cfg, str(tiny_remote_code)),
                                                            "cpu", 32),
        "promotion": two_stage.evaluated_encoder(cfg, generation_binding(live, manifest), "cpu", 32),
        "endpoint": query_encoder(ServeConfig(index=str(out)), manifest, "cpu"),
    }
    for name, encoder in encoders.items():
        assert np.abs(encoder.encode_queries(query) - want).max() < 1e-5, name
    evaluated = encoders["two-stage evaluation"].encode_pages(pages)
    assert np.abs(evaluated - stored).max() < 1e-5, "evaluation encodes pages as the job did"


def test_page_embeddings_do_not_depend_on_the_batch(tiny_qwen, page_pngs):
    """A page's vector is the same alone, in a batch of 4 or of 16 with pages of other sizes (offline corpus vectors
    and online query-time vectors must agree). Tolerance: 1e-5 absolute per component (fp32, CPU)."""
    import io

    from PIL import Image

    from ray_vdr.config import ModelConfig
    from ray_vdr.models.load import build_model

    model = build_model(ModelConfig(name_or_path=str(tiny_qwen), min_pixels=1024, max_pixels=16384), device="cpu")
    pages = [Image.open(io.BytesIO(b)).convert("RGB") for b in page_pngs[:16]]
    pages = [p.resize((p.width // (1 + i % 3), p.height // (1 + i % 2))) for i, p in enumerate(pages)]  # mixed sizes

    def enc(images):
        return model.encode_document(images, batch_size=len(images), truncate_dim=32, normalize_embeddings=True,
                                     convert_to_numpy=True)

    alone = np.stack([enc([p])[0] for p in pages])
    for size in (4, 16):
        batched = np.concatenate([enc(pages[i:i + size]) for i in range(0, len(pages), size)])
        assert np.abs(batched - alone).max() < 1e-5, size
    reordered = enc(pages[::-1])[::-1]
    assert np.abs(reordered - alone).max() < 1e-5


@pytest.mark.slow
def test_sharded_embedding_job_rebuilds_only_the_shards_a_sync_touches(ray_local, tiny_qwen, page_pngs, tmp_path):
    """index.shards=3 on real files (images, a PDF, Parquet): a task per shard, documents whole in their shard, the
    planted page found; a sync that adds one file and deletes another changes only those documents' shards."""
    from ray_vdr.corpus.embed import run
    from ray_vdr.corpus.shards import SHARD_COLUMN, shard_of
    from ray_vdr.corpus.store import PageStore, open_index

    corpus, out = tmp_path / "corpus", tmp_path / "index"
    corpus.mkdir()
    expected = write_corpus(corpus, page_pngs[:16], bad=False)
    added = corpus / "scans" / "late.png"
    first = run(_cfg(tiny_qwen, corpus, out, "index.shards=3"))
    m = first.manifest
    assert len(m.index_shards) == 3 and m.vectors == expected["pages"] and first.summary.shards_changed == [0, 1, 2]
    assert all(r.peak_rss_bytes and r.start_rss_bytes for r in m.index_shards), "each task reports its memory"
    index = open_index(str(out))
    for r in index.ids.to_pylist():
        assert r[SHARD_COLUMN] == shard_of([r["doc_id"]], 3)[0]
    report = index.ids.filter(pc.equal(index.ids.column("doc_id"), "report.pdf")).to_pylist()
    assert len(report) == 4 and len({r[SHARD_COLUMN] for r in report}) == 1, "a PDF's pages stay together"
    store = PageStore.of(index)
    top = index.search(np.array(store.get([store.position("report.pdf", 3)], "embedding"), np.float32), 1)[0][0]
    assert (top["doc_id"], top["page"]) == ("report.pdf", 3)

    gone = sorted((corpus / "scans").glob("page-*.png"))[0]
    gone_id, added_id = gone.relative_to(corpus).as_posix(), "scans/late.png"
    gone.unlink()
    added.write_bytes(page_pngs[20])
    second = run(_cfg(tiny_qwen, corpus, out, "index.shards=3"))
    s = second.summary
    homes = {int(x) for x in shard_of([gone_id, added_id], 3)}
    assert s.pages.added == 1 and s.pages.removed == 1
    changed = set(s.shards_changed) | set(s.compaction.shards_rebuilt if s.compaction else [])
    assert changed == homes, (s.shards_changed, s.compaction, homes)
    kept = [r for r in second.manifest.index_shards if r.shard not in homes]
    assert all(r.action == "kept" and r.index == m.index_shards[r.shard].index for r in kept)
    doc_ids = set(open_index(str(out)).ids.filter(pc.field("live")).column("doc_id").to_pylist())
    assert added_id in doc_ids and gone_id not in doc_ids


@pytest.mark.slow
def test_no_process_holds_more_than_one_shard_of_vectors(ray_local, tmp_path):
    """8 shards of 32,000 page vectors at 1536-d (188 MiB), in parts of 6 MiB: each shard's task, in a process of its
    own, peaks at most its shard's vectors + 48 MiB above its baseline (libraries loaded, one part read; the rest is
    part reads and the allocator's cache), below half of all vectors; the driver (its own process) holds the ids and
    the tasks' answers only: below a sixth of all vectors."""
    import json

    import pyarrow as pa

    from ray_vdr.storage import part_name, write_table

    n, dim, per_part, shards = 32_000, 1536, 1_000, 8
    rng = np.random.default_rng(0)
    names = []
    for start in range(0, n, per_part):
        v = rng.standard_normal((per_part, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        keys = [f"k{start + i:08d}" for i in range(per_part)]
        docs = [f"doc-{(start + i) // 5}" for i in range(per_part)]
        t = pa.table({"key": keys, "content": keys, "file_hash": docs, "doc_id": docs,
                      "source": [f"{d}.pdf" for d in docs], "page": pa.array([i % 5 + 1 for i in range(per_part)],
                                                                             pa.int32()),
                      "row_metadata": pa.nulls(per_part, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim)})
        names.append(part_name(keys))
        write_table(t, f"{tmp_path}/pages/{names[-1]}")
    code = f"""
import json, sys, ray, pyarrow.parquet as pq
from ray_vdr.config import IndexConfig
from ray_vdr.cluster import process_memory
from ray_vdr.corpus.shards import build_sharded
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
import faiss, pyarrow as pa  # what the build loads, and a table back from a task: the baseline, as the tasks'
pq.read_table(sys.argv[2] + "/pages/" + {sorted(names)[0]!r})
ray.get(ray.remote(lambda: pa.table({{"x": list(range(100_000))}})).remote())
start = process_memory()[0]
fields, ids = build_sharded(sys.argv[2], {sorted(names)!r}, {dim}, IndexConfig(index_type="flat"), None, 1, {shards})
print(json.dumps({{"driver": process_memory()[1] - start, "rows": ids.num_rows,
                  "shards": [r.model_dump() for r in fields["index_shards"]]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code, ray_local.get_runtime_context().gcs_address, str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    total = n * dim * 4
    assert got["rows"] == n and sum(r["vectors"] for r in got["shards"]) == n
    for r in got["shards"]:
        grew, own = r["peak_rss_bytes"] - r["start_rss_bytes"], r["vectors"] * dim * 4
        print(f"shard {r['shard']}: {r['vectors']} vectors ({own / 2**20:.1f} MiB), task peak +{grew / 2**20:.1f} MiB")
        assert grew <= own + (48 << 20) and grew < total / 2
    print(f"driver peak +{got['driver'] / 2**20:.1f} MiB; all vectors {total / 2**20:.1f} MiB")
    assert got["driver"] < total / 6
