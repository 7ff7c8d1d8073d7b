"""The two-stage endpoint on a real local Ray cluster and Ray Serve over HTTP (loopback), with the tiny models: the
planted page first, image queries, reranking, every bad input's 4xx, pages, health and overload, refused bindings,
and the search page in a real browser. The shared endpoint and its references are in conftest.py.

Answers are read with the library's client (ray_vdr.client); where a test needs what that client never sends (a
malformed body, an unknown field) or the raw status and headers, with httpx."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ray_vdr.client import EndpointClient, EndpointError

pytestmark = pytest.mark.slow


def test_planted_page_ranks_first(endpoint, planted):
    for p in planted[:4]:
        answer = EndpointClient(endpoint).search(p["query"], top_k=5, rerank_depth=0)
        got = answer.hits
        assert got[0].doc_id == p["doc_id"], f"{p['query']!r}: planted page first"
        assert [r.doc_id for r in got] == p["first_stage"]
        assert np.allclose([r.score for r in got], p["scores"], atol=1e-4), "same scores as in-process"
        assert answer.timings.embed_ms > 0 and answer.timings.rerank_ms < 1 and answer.request_id


def test_image_query_is_searched_like_in_process(endpoint, corpus_index, inproc):
    """A page image as the query (base64): encoded with the query prompt, as in-process; not reranked."""
    png = (corpus_index.parent / "corpus" / "page-007.png").read_bytes()
    answer = EndpointClient(endpoint).search(image=png, top_k=3)
    expected = inproc["search"]([Image.open(io.BytesIO(png)).convert("RGB")], 3)[0]
    assert [r.doc_id for r in answer.hits] == [d for d, _ in expected]
    assert np.allclose([r.score for r in answer.hits], [sc for _, sc in expected], atol=1e-4)
    assert answer.image_query is True and answer.rerank_depth == 0


def test_reranker_reorders_the_candidates(endpoint, planted):
    """With rerank_depth 5, the top 5 are the first stage's 5, ordered by the reranker's scores, which equal the
    CrossEncoder's in-process scores; across the planted queries the reranker moves pages."""
    client, moved = EndpointClient(endpoint), 0
    for p in planted[:4]:
        answer = client.search(p["query"], top_k=5, rerank_depth=5)
        got = answer.hits
        assert sorted(r.doc_id for r in got) == sorted(p["first_stage"])
        by_doc = dict(zip(p["first_stage"], p["rerank"], strict=True))
        assert np.allclose([r.rerank_score for r in got], [by_doc[r.doc_id] for r in got], atol=1e-4)
        assert [r.rerank_score for r in got] == sorted((r.rerank_score for r in got), reverse=True)
        assert [r.rerank_rank for r in got] == [1, 2, 3, 4, 5]
        moved += sum(r.rank != r.first_stage_rank for r in got)
        assert answer.timings.rerank_ms > 0 and answer.timings.rerank_batch >= 1 and answer.rerank_depth == 5
    assert moved > 0, "the reranker changed the order"
    both = next(p for p in planted if p["agree"])
    assert client.search(both["query"], top_k=3).hits[0].doc_id == both["doc_id"]  # default depth: two stages


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
    with httpx.Client(base_url=endpoint, timeout=60) as http:  # bodies the typed client never sends
        for body, status, says in cases:
            got = http.post("search", json=body)
            assert got.status_code == status and says in got.json()["detail"], (
                body if len(str(body)) < 300 else "image", got.status_code, got.text)
        got = http.post("search", content=b"{not json", headers={"Content-Type": "application/json"})
        assert got.status_code == 422 and got.json() == {"detail": "the body is not valid JSON"}
        got = http.post("search", json={"query": "x", "pad": "y" * 3_100_000})
        assert got.status_code == 413 and "exceeds the limit" in got.json()["detail"]
        got = http.get("pages/page-001.png", params={"size": "huge"})
        assert got.status_code == 422 and got.json()["detail"].startswith("size: "), got.text
    with pytest.raises(EndpointError) as e:
        EndpointClient(endpoint).page("no-such-doc.png")
    assert e.value.status == 404 and "no-such-doc.png" in e.value.detail


def test_pages_serves_thumbnails_and_full_pages(endpoint, planted, corpus_index):
    client = EndpointClient(endpoint)
    hit = client.search(planted[0]["query"], top_k=1, rerank_depth=0).hits[0]
    thumbnail = httpx.get(endpoint.rstrip("/") + hit.thumbnail_url, timeout=30)  # the URL the answer gives
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert thumbnail.headers["cache-control"] == "public, max-age=3600" and "vary" not in thumbnail.headers, \
        "no keys: any cache may keep it"
    info = httpx.get(endpoint.rstrip("/") + hit.thumbnail_url + "&size=info", timeout=30)
    assert info.headers["cache-control"] == "public, max-age=3600" and info.json()["doc_id"] == hit.doc_id
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 256
    assert thumbnail.content == client.page(hit.doc_id, hit.page)
    full = client.page(hit.doc_id, hit.page, size="full")
    assert full == (corpus_index.parent / "corpus" / hit.doc_id).read_bytes(), "the page as indexed"
    html = httpx.get(endpoint, timeout=30)
    assert html.status_code == 200 and "<form" in html.text
    spec = httpx.get(endpoint + "openapi.json", timeout=30)
    status, paths = spec.status_code, spec.json()["paths"]

    def schema(path, method, status):  # the model a route declares for an answer
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]

    assert status == 200 and schema("/search", "post", "200") == "SearchResponse"
    assert [schema(p, "post", "200") for p in ("/v1/embeddings", "/v2/rerank", "/admin/delete")] == [
        "EmbeddingsResponse", "RerankResponse", "DeleteResponse"]
    assert (schema("/healthz", "get", "503"), schema("/pages/{doc_id}", "get", "200")) == ("HealthResponse", "PageInfo")
    assert (schema("/search", "post", "503"), schema("/v1/embeddings", "post", "400")) == (
        "ErrorResponse", "OpenAIErrorResponse"), "one error model per API shape"


def test_health_is_unready_until_the_index_exists_and_overload_gets_503(endpoint, corpus_index, tmp_path,
                                                                        tmp_path_factory, serve_cfg):
    """A second application whose index is published after it started: health 503 (waiting), a search 503 (the
    embedder raised NotReady), then 200. Then more concurrent requests than it may hold: only 200s and 503s with
    Retry-After, and no request hangs."""
    from ray import serve

    from serving.app import build_app

    late = tmp_path / "late-index"
    small = {"max_batch_size": 2, "max_ongoing_requests": 2, "target_ongoing_requests": 1}
    cfg = serve_cfg(late, 8000, app_name="late", route_prefix="/late", index_poll_s=1.0, retriever=small,
                    rerank=small, embedder={**small, "num_cpus": 0.1, "max_queued_requests": 2},
                    ingress={"max_ongoing_requests": 2, "target_ongoing_requests": 1, "max_queued_requests": 2})
    serve.run(build_app(cfg), name="late", route_prefix="/late", blocking=False)
    base = endpoint.rstrip("/") + "/late/"
    client, deadline = EndpointClient(base), time.time() + 120
    while client.health()[0] != 503 and time.time() < deadline:
        time.sleep(0.5)  # 404 until the proxy knows the route
    health = httpx.get(base + "healthz", timeout=30)
    assert health.status_code == 503 and health.headers.get("retry-after") == "3"
    assert "waiting for the index" in health.json()["stages"]["embedder"]["detail"]
    status, report = client.health()
    assert status == 503 and not report.ready and "embedder: waiting for the index" in report.detail
    search = httpx.post(base + "search", json={"query": "revenue"}, timeout=60)
    assert search.status_code == 503 and search.headers.get("retry-after") == "3"
    assert search.json()["detail"].startswith("not ready: query embedder")
    # the embedder raised NotReady (its call's access-log line says ERROR), without a traceback in its log
    deadline, logs = time.time() + 15, ""
    while "CALL embed ERROR" not in logs and time.time() < deadline:
        time.sleep(0.5)
        logs = "".join(p.read_text() for p in tmp_path_factory.getbasetemp().rglob("replica_late_QueryEmbedder_*.log"))
    assert "CALL embed ERROR" in logs and "NotReady" not in logs and "Request failed" not in logs
    shutil.copytree(corpus_index, late)
    deadline = time.time() + 120
    while client.health()[0] != 200:
        assert time.time() < deadline, client.health()
        time.sleep(0.5)
    statuses: list[int] = []
    retry_afters: list[str | None] = []

    def search_once():
        answer = httpx.post(base + "search", json={"query": "What was the revenue in 2021?", "top_k": 3}, timeout=60)
        statuses.append(answer.status_code)
        retry_afters.append(answer.headers.get("retry-after"))

    threads = [threading.Thread(target=search_once) for _ in range(40)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and time.time() - start < 120, "no request hangs"
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert all(r == "3" for s, r in zip(statuses, retry_afters, strict=True) if s == 503)
    serve.delete("late")


def test_mismatched_model_or_dimension_is_refused(corpus_index, tiny_clip, serve_cfg):
    from ray_vdr.corpus.store import IndexMismatch
    from serving.app import build_app

    with pytest.raises(IndexMismatch, match="32-d embeddings but 16-d"):
        build_app(serve_cfg(corpus_index, 8000, dim=16))
    with pytest.raises(IndexMismatch, match="its files differ"):
        build_app(serve_cfg(corpus_index, 8000, model=str(tiny_clip)))


def test_search_page_in_headless_chromium(browser, endpoint, planted):
    """Type a planted query into the search page and see its page first, with both stages' ranks shown."""
    both = next(p for p in planted if p["agree"])
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
