"""A small typed HTTP client of the retrieval endpoint (``serving/``): search, embed, rerank, pages, deletes, health.

    from ray_vdr.client import EndpointClient          # also importable as serving.client

    client = EndpointClient("http://127.0.0.1:8000/", api_key="...")   # or RAY_VDR_API_KEY
    hits = client.search("What was ACME's Q3 2021 revenue?", top_k=5).hits
    vectors = client.embed(["a query", png_bytes], dimensions=256)
    best = client.rerank("revenue", ["some text", {"doc_id": hits[0].doc_id, "page": hits[0].page}], top_n=1)
    thumbnail = client.page(hits[0].doc_id, hits[0].page)

Answers come back as the endpoint's own wire models (:mod:`ray_vdr.protocol`, which the server declares its routes
with): ``search`` → :class:`~ray_vdr.protocol.SearchResponse`, ``rerank`` → its ``RerankResult`` list, ``page_info``
→ ``PageInfo``, ``delete`` → ``DeleteResponse``, ``health`` → (status, ``HealthResponse``). Any answer but 2xx raises
:class:`EndpointError` with the status, the server's message (from either error shape) and the request id; nothing
answering raises OSError. The CLI, promotion, tests and benches talk to the endpoint through it, over HTTP like any
other client: the standard library and pydantic only, no Ray, no ``serving`` import (it lives in the library so that
jobs can use it).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from ray_vdr.protocol import (
    DeleteRequest,
    DeleteResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorResponse,
    HealthResponse,
    OpenAIErrorResponse,
    PageInfo,
    RerankRequest,
    RerankResponse,
    RerankResult,
    SearchRequest,
    SearchResponse,
)

__all__ = ["EndpointClient", "EndpointError"]

Answer = TypeVar("Answer", bound=BaseModel)


class EndpointError(Exception):
    """A 4xx or 5xx answer: ``status``, the server's ``detail``, the ``request_id`` (x-request-id) to find its
    log line, and ``retry_after`` (the Retry-After header of a 503 or 429: when to try again)."""

    def __init__(self, status: int, detail: str, request_id: str | None = None, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {detail}" + (f" (request {request_id})" if request_id else ""))
        self.status, self.detail, self.request_id, self.retry_after = status, detail, request_id, retry_after


def _error_detail(raw: bytes) -> str:
    """The message of an error body in either of the endpoint's shapes (ray-vdr's or OpenAI's), else its text."""
    for shape in (ErrorResponse, OpenAIErrorResponse):
        try:
            answer = shape.model_validate_json(raw)
        except ValidationError:
            continue
        return answer.detail if isinstance(answer, ErrorResponse) else answer.error.message
    return raw.decode(errors="replace")[:500]


def _data_url(data: bytes) -> str:
    """Image bytes as a data: URL (the endpoint never fetches a URL)."""
    mime = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/webp" if data[8:12] == b"WEBP" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class EndpointClient:
    """The endpoint mounted at ``url`` (e.g. ``http://127.0.0.1:8000/``), called with ``api_key`` (default: the
    RAY_VDR_API_KEY environment variable; k8s: from the ray-vdr-api-keys Secret)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/") + "/"
        self.timeout = timeout
        self._key = api_key or os.environ.get("RAY_VDR_API_KEY") or None

    def __repr__(self) -> str:  # never the key
        return f"EndpointClient({self.url!r}, api_key={'set' if self._key else None})"

    # -- HTTP ---------------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def _answer(self, model: type[Answer], method: str, path: str, body: BaseModel | None = None,
                timeout: float | None = None) -> tuple[Answer, str | None]:
        """The answer parsed into ``model``, and its request id; EndpointError for anything but 2xx."""
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        status, headers, raw = self._request(method, path, payload, timeout)
        request_id = headers.get("x-request-id")
        if status >= 400:
            raise EndpointError(status, _error_detail(raw), request_id, headers.get("retry-after"))
        return model.model_validate_json(raw), request_id

    # -- the API ------------------------------------------------------------------------------------------------------

    def search(self, query: str | None = None, *, image: bytes | None = None, top_k: int | None = None,
               rerank_depth: int | None = None, filter: dict[str, Any] | None = None,
               timeout: float | None = None) -> SearchResponse:
        """``POST /search``: the top pages (``.hits``) for a text query, an image query (PNG/JPEG/WebP bytes), or
        both; also the generation that answered, the timings and the request id."""
        body = SearchRequest(query=query, image=base64.b64encode(image).decode() if image is not None else None,
                             top_k=top_k, rerank_depth=rerank_depth, filter=filter)
        answer, request_id = self._answer(SearchResponse, "POST", "search", body, timeout)
        answer.request_id = request_id
        return answer

    def embed(self, inputs: str | bytes | list[str | bytes], *, dimensions: int | None = None,
              input_type: Literal["query", "document"] = "query",
              token_vectors: bool = False) -> list[list[float]] | list[list[list[float]]]:
        """``POST /v1/embeddings``: one vector per text or image (bytes), with the query or the document prompt, at
        ``dimensions`` (one of the model's Matryoshka dims; default: the index's); ``token_vectors`` (a multi-vector
        embedder): each input's token vectors."""
        items = inputs if isinstance(inputs, list) else [inputs]
        body = EmbeddingsRequest(input=[{"type": "image_url", "image_url": {"url": _data_url(x)}}
                                        if isinstance(x, bytes) else x for x in items],
                                 dimensions=dimensions, input_type=input_type, encoding_format="float",
                                 token_vectors=token_vectors)
        answer, _ = self._answer(EmbeddingsResponse, "POST", "v1/embeddings", body)
        return [d.embedding for d in sorted(answer.data, key=lambda d: d.index)]  # type: ignore[misc]

    def rerank(self, query: str, documents: list[str | bytes | dict[str, Any]], *,
               top_n: int | None = None) -> list[RerankResult]:
        """``POST /v2/rerank``: the documents (texts, images as bytes, or indexed pages ``{"doc_id", "page"}``) by
        the reranker's score, best first (``index`` in ``documents``, ``relevance_score``)."""
        docs = [{"image": _data_url(d)} if isinstance(d, bytes) else d for d in documents]
        answer, _ = self._answer(RerankResponse, "POST", "v2/rerank", RerankRequest(query=query, documents=docs,
                                                                                    top_n=top_n))
        return answer.results

    def page(self, doc_id: str, page: int | None = None, size: Literal["thumbnail", "full"] = "thumbnail") -> bytes:
        """``GET /pages/{doc_id}``: a page's thumbnail or full image (PNG or JPEG bytes)."""
        status, headers, raw = self._request("GET", self._page_path(doc_id, page, size))
        if status >= 400:
            raise EndpointError(status, _error_detail(raw), headers.get("x-request-id"), headers.get("retry-after"))
        return raw

    def page_info(self, doc_id: str, page: int | None = None) -> PageInfo:
        """A page's doc_id, page number, source and document metadata."""
        return self._answer(PageInfo, "GET", self._page_path(doc_id, page, "info"))[0]

    def delete(self, *, doc_ids: list[str] | None = None, sources: list[str] | None = None,
               filter: dict[str, Any] | None = None) -> DeleteResponse:
        """``POST /admin/delete`` (an ``admin`` key): returns once the endpoint no longer serves those documents."""
        body = DeleteRequest(doc_ids=doc_ids or [], sources=sources or [], filter=filter)
        return self._answer(DeleteResponse, "POST", "admin/delete", body)[0]

    def health(self, timeout: float | None = None) -> tuple[int, HealthResponse]:
        """``GET /healthz``: (200, report) when every stage is loaded, (503, each stage's state) while not; never
        raises for a status (an answer that is no health report, e.g. before the route exists, comes back as
        not ready with its text as ``detail``). Raises OSError when nothing answers at the URL."""
        status, _, raw = self._request("GET", "healthz", timeout=timeout)
        try:
            return status, HealthResponse.model_validate_json(raw)
        except ValidationError:
            return status, HealthResponse(ready=False, detail=_error_detail(raw))

    @staticmethod
    def _page_path(doc_id: str, page: int | None, size: str) -> str:
        query = {"size": size, **({"page": page} if page is not None else {})}
        return f"pages/{urllib.parse.quote(doc_id)}?{urllib.parse.urlencode(query)}"
