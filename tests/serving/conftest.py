"""The serving package's shared endpoint: one private Ray cluster, one index of the 30 synthetic eval pages, the
in-process reference and the planted queries, and the endpoint over them, started once for every test module here.

The embedder has random weights, so no text query "means" any page. The planted pages are therefore chosen with the
same model in-process, without Ray or Serve: for each candidate query, the page its embedding is nearest to by a
clear margin (and, for the two-stage test, the page the reranker also puts first). The endpoint must reproduce
exactly that: same prompt, truncation, normalisation, batching, FAISS and merge, through HTTP.

test_promotion.py runs last (modules run in name order): it switches the endpoint to another model.

Also here: ``serve_cfg`` (the tests' applications, sized for 2 CPUs) and ``browser`` (headless chromium). The tests
talk to the endpoints with the library's client (ray_vdr.client), and with httpx where they need raw statuses and
headers or bodies the client never sends.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_vdr.config import ServeConfig, load_config
from tests.ray_cluster import local_ray

ROOT = Path(__file__).resolve().parents[2]
# logical CPUs of the package's Ray cluster: the promotion test runs the embedding job and the evaluation task next to
# the endpoint's replicas (0.6 CPU), and Ray Data's read tasks take a whole CPU each
RAY_CPUS = 3
# the deployments and limits of the tests' applications, sized for 2 CPUs
TINY = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.2}
DEPLOYMENTS = {
    "embedder": {**TINY, "max_batch_size": 8, "max_ongoing_requests": 16, "target_ongoing_requests": 4},
    "retriever": {**TINY, "num_cpus": 0.1, "max_batch_size": 8, "max_ongoing_requests": 16,
                  "target_ongoing_requests": 4},
    "rerank": {**TINY, "max_batch_size": 4, "max_ongoing_requests": 8, "target_ongoing_requests": 4},
    "ingress": {**TINY, "num_cpus": 0.1, "max_ongoing_requests": 64, "target_ongoing_requests": 16}}
LIMITS = {"max_top_k": 20, "max_rerank_depth": 10, "default_rerank_depth": 5, "max_query_chars": 200,
          "max_body_bytes": 3_000_000, "retry_after_s": 3,
          "image": {"max_pixels": 4_000_000, "max_bytes": 2_000_000, "max_side": 2048}}
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cfg(index, port: int, **over) -> ServeConfig:
    base = {"index": str(index), "port": port, "limits": LIMITS, "keep_running": False, **DEPLOYMENTS}
    return ServeConfig.model_validate({**base, **{k: {**DEPLOYMENTS[k], **v} if k in DEPLOYMENTS else v
                                                  for k, v in over.items()}})


@pytest.fixture(scope="package")
def serve_cfg():
    """``serve_cfg(index, port, **overrides)``: a ServeConfig sized for 2 CPUs; an override of a deployment section
    (``embedder={"max_batch_size": 2}``) changes those fields of the default section."""
    return _serve_cfg


@pytest.fixture
def browser():
    """Debian's chromium through Playwright (never a downloaded browser), with a fresh temporary profile; skips the
    test where there is none, unless RAY_VDR_REQUIRE_BROWSER=1 (CI), where it fails."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if os.environ.get("RAY_VDR_REQUIRE_BROWSER") != "1" and not os.path.exists(chromium):
        pytest.skip("no chromium here (CI installs it and sets RAY_VDR_REQUIRE_BROWSER=1)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="package")
def metrics_url() -> str:
    """Where the package's Ray cluster exports Prometheus metrics (its metrics agent)."""
    return f"http://127.0.0.1:{_free_port()}/metrics"


@pytest.fixture(scope="package")
def ray_local(tmp_path_factory, metrics_url):
    """One private Ray cluster for the whole serving package (the endpoint outlives a module)."""
    port = int(metrics_url.rsplit(":", 1)[1].split("/")[0])
    # index_a: where test_shards.py places an index shard (its other shards go to a worker node it starts)
    with local_ray(tmp_path_factory.mktemp("ray"), RAY_CPUS, metrics_export_port=port,
                   resources={"index_a": 10}) as ray:
        yield ray


@pytest.fixture(scope="package")
def corpus_index(ray_local, tiny_qwen, page_pngs, tmp_path_factory):
    """The 30 synthetic eval pages as PNG files, embedded by the real job into a flat index (dim 32)."""
    from ray_vdr.corpus.embed import run

    root = tmp_path_factory.mktemp("serving")
    corpus, out = root / "corpus", root / "index"
    corpus.mkdir()
    for i, png in enumerate(page_pngs):
        (corpus / f"page-{i:03d}.png").write_bytes(png)
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"index.model={tiny_qwen}", f"index.sources=[{corpus}]", f"index.output={out}", "index.batch_size=8",
        "index.dim=32", "synthetic=null", "index.cpus_per_actor=0.5", "index.decode_cpus=0.25"])
    run(cfg)
    return out


def tenant_index(root: Path, pngs: list[bytes], tiny_qwen, *overrides: str) -> Path:
    """``pngs`` as page files under ``root``/corpus, alternately of tenant team-a and team-b (sidecars), embedded by
    the real job into ``root``/index (dim 32; ``overrides``: more config overrides); returns the index folder. Called
    again with more pages, it syncs them in (a new version)."""
    from ray_vdr.corpus.embed import run

    corpus, out = root / "corpus", root / "index"
    corpus.mkdir(exist_ok=True)
    for i, png in enumerate(pngs):
        (corpus / f"{'ab'[i % 2]}-{i}.png").write_bytes(png)
        (corpus / f"{'ab'[i % 2]}-{i}.png.json").write_text(json.dumps({"tenant": f"team-{'ab'[i % 2]}"}))
    run(load_config(ROOT / "configs/demo.yaml", [
        f"index.model={tiny_qwen}", f"index.sources=[{corpus}]", f"index.output={out}", "index.batch_size=8",
        "index.dim=32", "synthetic=null", "index.cpus_per_actor=0.5", "index.decode_cpus=0.25", *overrides]))
    return out


@pytest.fixture(scope="package")
def inproc(corpus_index, tiny_qwen, tiny_reranker):
    """The reference, written without the endpoint's code: Sentence Transformers' own encode_query (query prompt,
    truncated to the index's 32 dims, normalised), brute force over the embeddings the job stored, and the
    CrossEncoder's own predict on the page files."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from ray_vdr.models.processor import install_image_only_processor

    install_image_only_processor()
    st = SentenceTransformer(str(tiny_qwen), device="cpu")
    # the job embedded pages at the config's pixel budget (demo.yaml: 16,384 px), not the model's saved one (4,096):
    # image queries must be encoded at the index's budget, which its manifest records
    bounds = json.loads((corpus_index / "manifest.json").read_text())["model"]["pixel_bounds"]
    assert bounds == {"min_pixels": 1024, "max_pixels": 16384}
    st[0].processor.image_processor.size = {"shortest_edge": bounds["min_pixels"],
                                            "longest_edge": bounds["max_pixels"]}
    ce = CrossEncoder(str(tiny_reranker), device="cpu")
    pages = pq.read_table(corpus_index / "pages", columns=["doc_id", "embedding"])
    emb = np.stack(pages.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    docs = pages.column("doc_id").to_pylist()
    corpus = corpus_index.parent / "corpus"

    def search(items, k):
        vectors = st.encode_query(items, truncate_dim=32, normalize_embeddings=True, convert_to_numpy=True)
        out = []
        for v in vectors:
            scores = emb @ v
            order = np.argsort(-scores)[:k]
            out.append([(docs[i], float(scores[i])) for i in order])
        return out

    def rerank(query, doc_ids):
        images = [Image.open(corpus / d).convert("RGB") for d in doc_ids]
        return ce.predict([(query, img) for img in images], convert_to_numpy=True).tolist()

    return {"search": search, "rerank": rerank, "st": st, "ce": ce}


@pytest.fixture(scope="package")
def planted(inproc, synthetic):
    """Queries whose right page is known: nearest by a clear margin, and for some also first after reranking."""
    syn, _ = synthetic
    queries = [q for split in ("train", "eval") for q in pq.read_table(f"{syn.output_dir}/{split}",
                                                                       columns=["query"]).column("query").to_pylist()]
    picks = []
    for q, hits in zip(queries, inproc["search"](queries, 5), strict=True):
        if hits[0][1] - hits[1][1] < 2e-3:
            continue
        first_stage = [d for d, _ in hits]
        rerank = inproc["rerank"](q, first_stage)
        picks.append({"query": q, "doc_id": first_stage[0], "first_stage": first_stage,
                      "scores": [sc for _, sc in hits], "rerank": rerank, "agree": int(np.argmax(rerank)) == 0})
    assert sum(p["agree"] for p in picks) >= 1 and len(picks) >= 4, f"too few plantable queries: {len(picks)}"
    return picks


@pytest.fixture(scope="package")
def endpoint(corpus_index, tiny_reranker, planted):
    from ray import serve

    from ray_vdr.endpoint import deploy

    # it follows a live manifest (none yet: it serves corpus_index), as `ray-vdr promote` needs (the last test)
    cfg = _serve_cfg(corpus_index, _free_port(), reranker=str(tiny_reranker), index_poll_s=0.5, admin_deletes=True,
                     live=str(corpus_index.parent / "live.json"))
    url = deploy(cfg, ready_timeout_s=240)
    yield url
    serve.shutdown()
