"""The two-stage endpoint on a real local Ray cluster and Ray Serve over HTTP (loopback), with the tiny models: the
planted page first, image queries, reranking, every bad input's 4xx, pages, health and overload, refused bindings,
and the search page in a real browser. The shared endpoint and its references are in conftest.py."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.serving.http import TINY, get, headless_chromium, post, post_raw, serve_cfg

pytestmark = pytest.mark.slow


def test_planted_page_ranks_first(endpoint, planted):
    for p in planted[:4]:
        status, _, answer = post(endpoint, {"query": p["query"], "top_k": 5, "rerank_depth": 0})
        assert status == 200, answer
        got = answer["results"]
        assert got[0]["doc_id"] == p["doc_id"], f"{p['query']!r}: planted page first"
        assert [r["doc_id"] for r in got] == p["first_stage"]
        assert np.allclose([r["score"] for r in got], p["scores"], atol=1e-4), "same scores as in-process"
        assert answer["timings"]["embed_ms"] > 0 and answer["timings"]["rerank_ms"] < 1


def test_image_query_is_searched_like_in_process(endpoint, corpus_index, inproc):
    """A page image as the query (base64): encoded with the query prompt, as in-process; not reranked."""
    png = (corpus_index.parent / "corpus" / "page-007.png").read_bytes()
    status, _, answer = post(endpoint, {"image": base64.b64encode(png).decode(), "top_k": 3})
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
        status, _, answer = post(endpoint, {"query": p["query"], "top_k": 5, "rerank_depth": 5})
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
    status, _, answer = post(endpoint, {"query": both["query"], "top_k": 3})  # default depth: two stages
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
        got, _, answer = post(endpoint, body)
        assert got == status and says in json.dumps(answer), (body if len(str(body)) < 300 else "image", got, answer)
    got, _, answer = post_raw(endpoint, b"{not json")
    assert got == 422, answer
    got, _, answer = post_raw(endpoint, json.dumps({"query": "x", "pad": "y" * 3_100_000}).encode())
    assert got == 413 and "exceeds the limit" in answer["detail"]
    got, _, body = get(endpoint + "pages/no-such-doc.png")
    assert got == 404 and b"no-such-doc.png" in body
    got, _, body = get(endpoint + "pages/page-001.png?size=huge")
    assert got == 422


def test_pages_serves_thumbnails_and_full_pages(endpoint, planted, corpus_index):
    status, _, answer = post(endpoint, {"query": planted[0]["query"], "top_k": 1, "rerank_depth": 0})
    url = endpoint.rstrip("/") + answer["results"][0]["thumbnail_url"]
    status, headers, data = get(url)
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert headers["cache-control"] == "public, max-age=3600" and "vary" not in headers, "no keys: any cache may"
    assert get(url + "&size=info")[1]["cache-control"] == "public, max-age=3600"
    thumb = Image.open(io.BytesIO(data))
    assert max(thumb.size) <= 256
    status, _, full = get(url + "&size=full")
    doc = answer["results"][0]["doc_id"]
    assert status == 200 and full == (corpus_index.parent / "corpus" / doc).read_bytes(), "the page as indexed"
    status, _, html = get(endpoint)
    assert status == 200 and b"<form" in html
    status, _, spec = get(endpoint + "openapi.json")
    paths = json.loads(spec)["paths"]

    def schema(path, method, status):  # the model a route declares for an answer
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]

    assert status == 200 and schema("/search", "post", "200") == "SearchResponse"
    assert [schema(p, "post", "200") for p in ("/v1/embeddings", "/v2/rerank", "/admin/delete")] == [
        "EmbeddingsResponse", "RerankResponse", "DeleteResponse"]
    assert (schema("/healthz", "get", "503"), schema("/pages/{doc_id}", "get", "200")) == ("HealthResponse", "PageInfo")
    assert (schema("/search", "post", "503"), schema("/v1/embeddings", "post", "400")) == (
        "ErrorResponse", "OpenAIErrorResponse"), "one error model per API shape"


def test_health_is_unready_until_the_index_exists_and_overload_gets_503(endpoint, corpus_index, tmp_path,
                                                                        tmp_path_factory):
    """A second application whose index is published after it started: health 503 (waiting), a search 503 (the
    embedder raised NotReady), then 200. Then more concurrent requests than it may hold: only 200s and 503s with
    Retry-After, and no request hangs."""
    from ray import serve

    from serving.app import build_app

    late = tmp_path / "late-index"
    cfg = serve_cfg(late, 8000, app_name="late", route_prefix="/late", index_poll_s=1.0,
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
    while (status := get(base + "healthz"))[0] != 503 and time.time() < deadline:
        time.sleep(0.5)  # 404 until the proxy knows the route
    status, headers, body = get(base + "healthz")
    assert status == 503 and headers.get("retry-after") == "3"
    assert "waiting for the index" in body.decode()
    status, headers, answer = post(base, {"query": "revenue"})
    assert status == 503 and headers.get("retry-after") == "3" and "not ready" in answer["detail"]
    # the embedder raised NotReady (its call's access-log line says ERROR), without a traceback in its log
    deadline, logs = time.time() + 15, ""
    while "CALL embed ERROR" not in logs and time.time() < deadline:
        time.sleep(0.5)
        logs = "".join(p.read_text() for p in tmp_path_factory.getbasetemp().rglob("replica_late_QueryEmbedder_*.log"))
    assert "CALL embed ERROR" in logs and "NotReady" not in logs and "Request failed" not in logs
    shutil.copytree(corpus_index, late)
    deadline = time.time() + 120
    while get(base + "healthz")[0] != 200:
        assert time.time() < deadline, get(base + "healthz")
        time.sleep(0.5)
    statuses: list[int] = []
    retry_afters: list[str | None] = []

    def client():
        s, h, _ = post(base, {"query": "What was the revenue in 2021?", "top_k": 3})
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
    from ray_vdr.corpus.store import IndexMismatch
    from serving.app import build_app

    with pytest.raises(IndexMismatch, match="32-d embeddings but 16-d"):
        build_app(serve_cfg(corpus_index, 8000, dim=16))
    with pytest.raises(IndexMismatch, match="its files differ"):
        build_app(serve_cfg(corpus_index, 8000, model=str(tiny_clip)))


def test_search_page_in_headless_chromium(endpoint, planted):
    """Type a planted query into the search page and see its page first, with both stages' ranks shown."""
    both = next(p for p in planted if p["agree"])
    with headless_chromium() as browser:
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
