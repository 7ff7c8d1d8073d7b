"""The endpoint's client (ray_vdr/client.py) against a loopback HTTP server that answers with the wire models of
ray_vdr/protocol.py (no Ray): what it sends validates as the protocol's requests, what it returns equals the models
the server sent, and each error shape becomes an EndpointError with the server's message and request id."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ray_vdr.client import EndpointClient, EndpointError
from ray_vdr.protocol import (
    DeleteRequest,
    DeleteResponse,
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorResponse,
    HealthResponse,
    OpenAIErrorResponse,
    PageInfo,
    RerankRequest,
    RerankResponse,
    RerankResult,
    SearchHit,
    SearchRequest,
    SearchResponse,
    StageStatus,
    Timings,
    Usage,
)

SEARCH = SearchResponse(
    query="revenue", image_query=False, top_k=2, generation="g1@v2", rerank_depth=2,
    results=[SearchHit(rank=1, doc_id="a.pdf", page=3, score=0.5, first_stage_rank=2, rerank_score=1.5, rerank_rank=1,
                       source="/docs/a.pdf", metadata={"tenant": "t"}, thumbnail_url="/pages/a.pdf?page=3"),
             SearchHit(rank=2, doc_id="b.png", page=1, score=0.6, first_stage_rank=1, rerank_score=0.2, rerank_rank=2)],
    timings=Timings(embed_ms=1.0, search_ms=2.0, rerank_ms=3.0, total_ms=6.5, embed_compute_ms=0.5,
                    search_compute_ms=0.1, rerank_compute_ms=2.5, embed_batch=1, rerank_batch=2))
EMBEDDINGS = EmbeddingsResponse(model="g1", data=[Embedding(index=1, embedding=[0.0, 1.0]),
                                                  Embedding(index=0, embedding=[1.0, 0.0])],
                                usage=Usage(prompt_tokens=2, total_tokens=2))
RERANK = RerankResponse(id="r1", model="reranker", results=[RerankResult(index=1, relevance_score=2.0),
                                                            RerankResult(index=0, relevance_score=-1.0)])
INFO = PageInfo(doc_id="a.pdf", page=3, source="/docs/a.pdf", metadata={"year": 2021})
DELETED = DeleteResponse(version=3, documents_removed=1, pages_removed=4, matched="doc_id ['a.pdf']",
                         removed_doc_ids=["a.pdf"], generation="g1@v3")
LOADING = HealthResponse(ready=False, generation="g1@v2", detail="embedder: loading",
                         stages={"embedder": StageStatus(state="loading", detail="loading", generation="g1")})
# (method, path without the query) → (status, content type, body)
ROUTES = {
    ("POST", "/search"): (200, "application/json", SEARCH.model_dump_json()),
    ("POST", "/v1/embeddings"): (200, "application/json", EMBEDDINGS.model_dump_json()),
    ("POST", "/v2/rerank"): (200, "application/json", RERANK.model_dump_json()),
    ("GET", "/pages/a.pdf"): (200, "application/json", INFO.model_dump_json()),
    ("GET", "/pages/img.png"): (200, "image/png", "\x89PNG..."),
    ("POST", "/admin/delete"): (200, "application/json", DELETED.model_dump_json()),
    ("GET", "/healthz"): (503, "application/json", LOADING.model_dump_json()),
    ("GET", "/pages/gone.png"): (404, "application/json", ErrorResponse(detail="no page gone.png").model_dump_json()),
    ("POST", "/v1/embeddings?bad"): (400, "application/json",
                                     OpenAIErrorResponse.of(400, "input[0] is empty", "input").model_dump_json()),
}


class _Canned(BaseHTTPRequestHandler):
    sent: list[tuple[str, str, dict, bytes]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.sent.append((self.command, self.path, dict(self.headers), body))
        path = self.path.split("?")[0]
        key = (self.command, path + ("?bad" if b'""' in body else ""))
        status, kind, text = ROUTES.get(key, (404, "text/plain", f"Path '{path}' not found"))
        data = text.encode("latin-1") if kind == "image/png" else text.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"rid-{len(self.sent)}")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def test_the_client_sends_the_protocols_requests_and_returns_its_responses(server):
    client = EndpointClient(server, api_key="k" * 20)
    _Canned.sent.clear()
    answer = client.search("revenue", image=b"\x89PNG", top_k=2, filter={"year": 2021})
    assert answer.request_id == "rid-1" and "request_id" not in answer.model_dump(), "a header, not in the body"
    assert answer.model_dump() == SEARCH.model_dump() and answer.hits == SEARCH.results
    assert answer.timings.total_ms == 6.5
    assert client.embed(["q", b"\x89PNG"], dimensions=2) == [[1.0, 0.0], [0.0, 1.0]], "in input order"
    assert client.rerank("q", ["text", b"\x89PNG", {"doc_id": "a.pdf", "page": 3}], top_n=2) == RERANK.results
    assert client.page_info("a.pdf", 3) == INFO
    assert client.page("img.png") == "\x89PNG...".encode("latin-1")
    assert client.delete(doc_ids=["a.pdf"]) == DELETED
    assert client.health() == (503, LOADING)

    (_, _, headers, search), (_, _, _, embed), (_, _, _, rerank) = _Canned.sent[:3]
    assert headers["Authorization"] == "Bearer " + "k" * 20
    sent = SearchRequest.model_validate_json(search)
    assert (sent.query, sent.top_k, sent.filter, sent.image) == ("revenue", 2, {"year": 2021}, "iVBORw==")
    assert "rerank_depth" not in json.loads(search), "unset fields are the server's defaults"
    sent_embed = EmbeddingsRequest.model_validate_json(embed)
    assert sent_embed.input[0] == "q" and sent_embed.input[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert (sent_embed.dimensions, sent_embed.encoding_format) == (2, "float")
    assert RerankRequest.model_validate_json(rerank).documents[1] == {"image": "data:image/png;base64,iVBORw=="}
    assert DeleteRequest.model_validate_json(_Canned.sent[5][3]).doc_ids == ["a.pdf"]
    assert [p for m, p, _, _ in _Canned.sent[3:5]] == ["/pages/a.pdf?size=info&page=3", "/pages/img.png?size=thumbnail"]


def test_each_error_shape_becomes_an_endpoint_error(server):
    client = EndpointClient(server)
    with pytest.raises(EndpointError) as e:
        client.page("gone.png")
    assert (e.value.status, e.value.detail) == (404, "no page gone.png") and e.value.request_id.startswith("rid-")
    with pytest.raises(EndpointError, match=r"HTTP 400: input\[0\] is empty"):
        client.embed("")
    with pytest.raises(EndpointError, match="HTTP 404: Path '/nowhere/search' not found"):
        EndpointClient(server + "nowhere").search("q")
    status, report = EndpointClient(server + "nowhere").health()
    assert status == 404 and not report.ready and report.detail == "Path '/nowhere/healthz' not found"
