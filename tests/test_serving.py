"""The two-stage endpoint on a real local Ray cluster and Ray Serve over HTTP (loopback), with the tiny models.

The embedder has random weights, so no text query "means" any page. The planted pages are therefore chosen with the
same model in-process, without Ray or Serve: for each candidate query, the page its embedding is nearest to by a
clear margin (and, for the two-stage test, the page the reranker also puts first). The endpoint must reproduce
exactly that: same prompt, truncation, normalisation, batching, FAISS and merge, through HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_vdr.config import ServeConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# logical CPUs of the module's Ray cluster: the promotion test runs the embedding job and the evaluation task next to
# the endpoint's replicas (0.6 CPU), and Ray Data's read tasks take a whole CPU each
RAY_CPUS = 3
TINY = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.2}
LIMITS = {"max_top_k": 20, "max_rerank_depth": 10, "default_rerank_depth": 5, "max_query_chars": 200,
          "max_body_bytes": 3_000_000, "retry_after_s": 3,
          "image": {"max_pixels": 4_000_000, "max_bytes": 2_000_000, "max_side": 2048}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cfg(index, port, **over) -> ServeConfig:
    base = {"index": str(index), "port": port, "limits": LIMITS, "keep_running": False,
            "embedder": {**TINY, "max_batch_size": 8, "max_ongoing_requests": 16, "target_ongoing_requests": 4},
            "retriever": {**TINY, "num_cpus": 0.1, "max_batch_size": 8, "max_ongoing_requests": 16,
                          "target_ongoing_requests": 4},
            "rerank": {**TINY, "max_batch_size": 4, "max_ongoing_requests": 8, "target_ongoing_requests": 4},
            "ingress": {**TINY, "num_cpus": 0.1, "max_ongoing_requests": 64, "target_ongoing_requests": 16}}
    return ServeConfig.model_validate({**base, **over})


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _post_raw(url: str, data: bytes, content_type="application/json") -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + "search", data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, dict(e.headers), json.loads(body)
        except ValueError:
            return e.code, dict(e.headers), {"detail": body.decode(errors="replace")}


def _post(url: str, body: dict) -> tuple[int, dict, dict]:
    return _post_raw(url, json.dumps(body).encode())


@pytest.fixture(scope="module")
def corpus_index(ray_local, tiny_qwen, page_pngs, tmp_path_factory):
    """The 30 synthetic eval pages as PNG files, embedded by the real job into a flat index (dim 32)."""
    from ray_vdr.index import run

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


@pytest.fixture(scope="module")
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

    return {"search": search, "rerank": rerank}


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def endpoint(corpus_index, tiny_reranker, planted):
    from ray import serve

    from serving.app import run

    # it follows a live manifest (none yet: it serves corpus_index), as `ray-vdr promote` needs (the last test)
    cfg = _serve_cfg(corpus_index, _free_port(), reranker=str(tiny_reranker), index_poll_s=0.5,
                     live=str(corpus_index.parent / "live.json"))
    url = run(cfg, ready_timeout_s=240)
    yield url
    serve.shutdown()


def test_planted_page_ranks_first(endpoint, planted):
    for p in planted[:4]:
        status, _, answer = _post(endpoint, {"query": p["query"], "top_k": 5, "rerank_depth": 0})
        assert status == 200, answer
        got = answer["results"]
        assert got[0]["doc_id"] == p["doc_id"], f"{p['query']!r}: planted page first"
        assert [r["doc_id"] for r in got] == p["first_stage"]
        assert np.allclose([r["score"] for r in got], p["scores"], atol=1e-4), "same scores as in-process"
        assert answer["timings"]["embed_ms"] > 0 and answer["timings"]["rerank_ms"] < 1


def test_image_query_is_searched_like_in_process(endpoint, corpus_index, inproc):
    """A page image as the query (base64): encoded with the query prompt, as in-process; not reranked."""
    png = (corpus_index.parent / "corpus" / "page-007.png").read_bytes()
    status, _, answer = _post(endpoint, {"image": base64.b64encode(png).decode(), "top_k": 3})
    assert status == 200, answer
    expected = inproc["search"]([Image.open(io.BytesIO(png)).convert("RGB")], 3)[0]
    assert [r["doc_id"] for r in answer["results"]] == [d for d, _ in expected]
    assert np.allclose([r["score"] for r in answer["results"]], [sc for _, sc in expected], atol=1e-4)
    assert answer["image_query"] is True and answer["rerank_depth"] == 0


def test_reranker_reorders_the_candidates(endpoint, planted):
    """With rerank_depth 5, the top 5 are the first stage's 5, ordered by the reranker's scores, which equal the
    CrossEncoder's in-process scores; across the planted queries the reranker moves pages."""
    moved = 0
    for p in planted[:4]:
        status, _, answer = _post(endpoint, {"query": p["query"], "top_k": 5, "rerank_depth": 5})
        assert status == 200, answer
        got = answer["results"]
        assert sorted(r["doc_id"] for r in got) == sorted(p["first_stage"])
        by_doc = dict(zip(p["first_stage"], p["rerank"], strict=True))
        assert np.allclose([r["rerank_score"] for r in got], [by_doc[r["doc_id"]] for r in got], atol=1e-4)
        assert [r["rerank_score"] for r in got] == sorted((r["rerank_score"] for r in got), reverse=True)
        assert [r["rerank_rank"] for r in got] == [1, 2, 3, 4, 5]
        moved += sum(r["rank"] != r["first_stage_rank"] for r in got)
        assert answer["timings"]["rerank_ms"] > 0 and answer["rerank_depth"] == 5
    assert moved > 0, "the reranker changed the order"
    both = next(p for p in planted if p["agree"])
    status, _, answer = _post(endpoint, {"query": both["query"], "top_k": 3})  # default depth: two stages
    assert status == 200 and answer["results"][0]["doc_id"] == both["doc_id"]


def _bomb_b64() -> str:
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000), 1).save(buf, "PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def test_every_bad_input_gets_its_4xx(endpoint):
    cases = [
        ({"query": ""}, 422, "non-empty"),
        ({"query": "x" * 201}, 422, "201 characters"),
        ({"query": "x", "top_k": 0}, 422, "top_k must be between 1 and 20"),
        ({"query": "x", "top_k": 21}, 422, "top_k must be between 1 and 20"),
        ({"query": "x", "rerank_depth": 11}, 422, "rerank_depth must be between 0 and 10"),
        ({"query": "x", "top_k": "many"}, 422, "top_k"),
        ({"query": "x", "unknown": 1}, 422, "unknown"),
        ({"image": "https://example.com/a.png"}, 422, "never fetches URLs"),
        ({"image": "@@@@"}, 422, "not valid base64"),
        ({"image": base64.b64encode(b"GIF89a garbage").decode()}, 422, "corrupt_image"),
        ({"image": _bomb_b64()}, 422, "decompression_bomb"),
    ]
    for body, status, says in cases:
        got, _, answer = _post(endpoint, body)
        assert got == status and says in json.dumps(answer), (body if len(str(body)) < 300 else "image", got, answer)
    got, _, answer = _post_raw(endpoint, b"{not json")
    assert got == 422, answer
    got, _, answer = _post_raw(endpoint, json.dumps({"query": "x", "pad": "y" * 3_100_000}).encode())
    assert got == 413 and "exceeds the limit" in answer["detail"]
    got, _, body = _get(endpoint + "pages/no-such-doc.png")
    assert got == 404 and b"no-such-doc.png" in body
    got, _, body = _get(endpoint + "pages/page-001.png?size=huge")
    assert got == 422


def test_pages_serves_thumbnails_and_full_pages(endpoint, planted, corpus_index):
    status, _, answer = _post(endpoint, {"query": planted[0]["query"], "top_k": 1, "rerank_depth": 0})
    url = endpoint.rstrip("/") + answer["results"][0]["thumbnail_url"]
    status, headers, data = _get(url)
    assert status == 200 and headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(data))
    assert max(thumb.size) <= 256
    status, _, full = _get(url + "&size=full")
    doc = answer["results"][0]["doc_id"]
    assert status == 200 and full == (corpus_index.parent / "corpus" / doc).read_bytes(), "the page as indexed"
    status, _, html = _get(endpoint)
    assert status == 200 and b"<form" in html
    status, _, spec = _get(endpoint + "openapi.json")
    assert status == 200 and "/search" in json.loads(spec)["paths"]


def test_health_is_unready_until_the_index_exists_and_overload_gets_503(endpoint, corpus_index, tmp_path):
    """A second application whose index is published after it started: health 503 (waiting), then 200. Then more
    concurrent requests than it may hold: only 200s and 503s with Retry-After, and no request hangs."""
    from ray import serve

    from serving.app import build_app

    late = tmp_path / "late-index"
    cfg = _serve_cfg(late, 8000, app_name="late", route_prefix="/late", index_poll_s=1.0,
                     retriever={**TINY, "num_cpus": 0.1, "max_batch_size": 2, "max_ongoing_requests": 2,
                                "target_ongoing_requests": 1},
                     rerank={**TINY, "max_batch_size": 2, "max_ongoing_requests": 2, "target_ongoing_requests": 1},
                     embedder={**TINY, "num_cpus": 0.1, "max_batch_size": 2, "max_ongoing_requests": 2,
                               "target_ongoing_requests": 1, "max_queued_requests": 2},
                     ingress={**TINY, "num_cpus": 0.1, "max_ongoing_requests": 2, "target_ongoing_requests": 1,
                              "max_queued_requests": 2})
    serve.run(build_app(cfg), name="late", route_prefix="/late", blocking=False)
    base = endpoint.rstrip("/") + "/late/"
    deadline = time.time() + 120
    while (status := _get(base + "healthz"))[0] != 503 and time.time() < deadline:
        time.sleep(0.5)  # 404 until the proxy knows the route
    status, headers, body = _get(base + "healthz")
    assert status == 503 and headers.get("retry-after") == "3"
    assert "waiting for the index" in body.decode()
    status, headers, answer = _post(base, {"query": "revenue"})
    assert status == 503 and headers.get("retry-after") == "3" and "not ready" in answer["detail"]
    shutil.copytree(corpus_index, late)
    deadline = time.time() + 120
    while _get(base + "healthz")[0] != 200:
        assert time.time() < deadline, _get(base + "healthz")
        time.sleep(0.5)
    statuses: list[int] = []
    retry_afters: list[str | None] = []

    def client():
        s, h, _ = _post(base, {"query": "What was the revenue in 2021?", "top_k": 3})
        statuses.append(s)
        retry_afters.append(h.get("retry-after") or h.get("Retry-After"))

    threads = [threading.Thread(target=client) for _ in range(40)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and time.time() - start < 120, "no request hangs"
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert all(r == "3" for s, r in zip(statuses, retry_afters, strict=True) if s == 503)
    serve.delete("late")


def test_mismatched_model_or_dimension_is_refused(corpus_index, tiny_clip):
    from ray_vdr.vector_index import IndexMismatch
    from serving.app import build_app

    with pytest.raises(IndexMismatch, match="32-d embeddings but 16-d"):
        build_app(_serve_cfg(corpus_index, 8000, dim=16))
    with pytest.raises(IndexMismatch, match="not with this model"):
        build_app(_serve_cfg(corpus_index, 8000, model=str(tiny_clip)))


BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def test_search_page_in_headless_chromium(endpoint, planted):
    """Type a planted query into the search page and see its page first, with both stages' ranks shown."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if os.environ.get("RAY_VDR_REQUIRE_BROWSER") != "1" and not Path(chromium).exists():
        pytest.skip("no chromium here (CI installs it and sets RAY_VDR_REQUIRE_BROWSER=1)")
    from playwright.sync_api import sync_playwright

    both = next(p for p in planted if p["agree"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)  # a fresh temporary profile
        try:
            page = browser.new_page()
            page.goto(endpoint)
            page.fill("#query", both["query"])
            page.click("#go")
            page.wait_for_selector("#results .result", timeout=60_000)
            first = page.locator("#results .result").first
            assert first.get_attribute("data-doc-id") == both["doc_id"]
            text = first.inner_text()
            assert "first stage: #1" in text and "rerank: #1" in text
            assert page.locator("#results .result").count() == 10
            page.wait_for_function("document.querySelector('#results img').naturalWidth > 0", timeout=30_000)
            assert "results in" in page.inner_text("#status")
            page.fill("#query", "")
            page.click("#go")
            page.wait_for_selector("#status.error", timeout=30_000)
            assert "422" in page.inner_text("#status")
        finally:
            browser.close()


def test_decide_promotes_only_when_not_worse():
    from ray_vdr.promote import decide

    assert decide(0.50, 0.50)[0] and decide(0.50, 0.51)[0] and not decide(0.50, 0.4999)[0]
    assert not decide(0.50, 0.52, min_delta=0.05)[0] and decide(0.50, 0.40, min_delta=-0.2)[0]
    assert decide(0.5, 0.4)[1] == "candidate NDCG@10 0.4000 < live 0.5000"


def test_promotion_switches_the_endpoint_under_load(endpoint, corpus_index, tiny_qwen, synthetic, tmp_path):
    """`ray-vdr promote` on the running endpoint while clients keep searching: a candidate embedder (other random
    weights) re-embeds the corpus into a new index, both are evaluated on the eval split, it goes live (the test
    lowers the bar with min_delta=-1: both models are random, so neither is better), and the endpoint switches with
    no failed request; afterwards it answers from the new index, as brute force over that index says. A candidate
    below the bar is then rejected and recorded, and the endpoint keeps serving the live generation."""
    from sentence_transformers import SentenceTransformer

    from ray_vdr.models.builders import build_qwen3vl_embedder
    from ray_vdr.models.processor import install_image_only_processor
    from ray_vdr.promote import run
    from ray_vdr.search import generation

    syn, _ = synthetic
    candidate = build_qwen3vl_embedder(tmp_path / "candidate", max_pixels=64 * 64, seed=1)
    live_json = corpus_index.parent / "live.json"
    base = ["index.batch_size=8", "index.dim=32", "index.cpus_per_actor=0.5", "index.decode_cpus=0.25",
            "synthetic=null",
            f"data.eval.uri={syn.output_dir}/eval", f"serve.index={corpus_index}", f"serve.live={live_json}",
            f"promote.output={tmp_path}/generations", f"promote.endpoint={endpoint}", "promote.eval_cpus=0.5",
            "promote.switch_timeout_s=120", f"run.storage_path={tmp_path}/runs"]
    queries = ["What was the revenue in 2021?", "operating margin by quarter", "headcount 2019"]
    answers: list[tuple[int, str | None, str]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = n
        while not stop.is_set():
            status, _, answer = _post(endpoint, {"query": queries[i % len(queries)], "top_k": 3, "rerank_depth": 2})
            answers.append((status, answer.get("generation"), answer.get("detail", "")))
            i += 1

    clients = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    for t in clients:
        t.start()
    try:
        result = run(load_config(ROOT / "configs/demo.yaml", [*base, f"promote.model={candidate}",
                                                              "promote.min_delta=-1.0"]))
        time.sleep(3)  # and a little more load on the new generation
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=120)
    old, new = generation(str(corpus_index))["id"], result.candidate["id"]
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the switch: {failed[:5]}"
    seen = [g for _, g, _ in answers]
    print(f"promotion under load: {len(answers)} requests, {seen.count(old)} from {old}, {seen.count(new)} from {new}")
    assert result.promoted and result.switched and old in seen and new in seen, (result, seen)
    assert seen[-4:] == [new] * 4, seen[-10:]

    # the live manifest says what is live, and what was
    doc = json.loads(live_json.read_text())
    assert doc["live"]["id"] == new and doc["live"]["model"] == str(candidate)
    assert doc["live"]["index"] == result.candidate["index"] and doc["previous"]["id"] == old
    assert doc["history"][-1]["decision"] == "promoted" and "ndcg@10" in doc["history"][-1]["candidate"]["metrics"]
    assert _get(endpoint + "healthz")[0] == 200 and json.loads(_get(endpoint + "healthz")[2])["generation"] == new

    # answers come from the new index: the candidate's brute-force top 3 over the vectors its index stored
    install_image_only_processor()
    st = SentenceTransformer(str(candidate), device="cpu")
    pages = pq.read_table(Path(result.candidate["index"]) / "pages", columns=["doc_id", "embedding"])
    emb = np.stack(pages.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    v = st.encode_query([queries[0]], truncate_dim=32, normalize_embeddings=True, convert_to_numpy=True)[0]
    top = np.argsort(-(emb @ v))[:3]
    status, _, answer = _post(endpoint, {"query": queries[0], "top_k": 3, "rerank_depth": 0})
    assert status == 200 and answer["generation"] == new
    assert [r["doc_id"] for r in answer["results"]] == [pages.column("doc_id")[int(i)].as_py() for i in top]
    assert np.allclose([r["score"] for r in answer["results"]], emb[top] @ v, atol=1e-4)

    # a candidate below the bar is rejected and recorded; the live generation stays
    rejected = run(load_config(ROOT / "configs/demo.yaml", [*base, f"promote.model={tiny_qwen}",
                                                            "promote.min_delta=1.0"]))
    assert not rejected.promoted and rejected.live["id"] == new and rejected.switched is None
    doc = json.loads(live_json.read_text())
    assert doc["live"]["id"] == new and doc["history"][-1]["decision"] == "rejected"
    assert doc["history"][-1]["candidate"]["model"] == str(tiny_qwen)
    assert _post(endpoint, {"query": queries[1], "top_k": 3})[2]["generation"] == new
    # the live model again: nothing is embedded, evaluated or written
    again = run(load_config(ROOT / "configs/demo.yaml", [*base, f"promote.model={candidate}"]))
    assert not again.promoted and "already live" in again.reason and again.metrics == {}
    assert json.loads(live_json.read_text()) == doc
