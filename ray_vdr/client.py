"""A small typed HTTP client of the retrieval endpoint (``serving/``): search, embed, rerank, pages, deletes, health.

    from ray_vdr.client import EndpointClient          # also importable as serving.client

    client = EndpointClient("http://127.0.0.1:8000/", api_key="...")   # or RAY_VDR_API_KEY
    hits = client.search("What was ACME's Q3 2021 revenue?", top_k=5).hits
    vectors = client.embed(["a query", png_bytes], dimensions=256)
    best = client.rerank("revenue", ["some text", {"doc_id": hits[0].doc_id, "page": hits[0].page}], top_n=1)
    thumbnail = client.page(hits[0].doc_id, hits[0].page)

Any answer but 2xx raises :class:`EndpointError` with the status, the server's message and the request id; nothing
answering raises OSError. The CLI, promotion, tests and benches talk to the endpoint through it, over HTTP like any
other client: standard library only, no Ray, no ``serving`` import (it lives in the library so that jobs can use it).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["EndpointClient", "EndpointError", "Hit", "PageInfo", "Ranked", "SearchResult"]


class EndpointError(Exception):
    """A 4xx or 5xx answer: ``status``, the server's ``detail``, the ``request_id`` (x-request-id) to find its
    log line, and ``retry_after`` (the Retry-After header of a 503 or 429: when to try again)."""

    def __init__(self, status: int, detail: str, request_id: str | None = None, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {detail}" + (f" (request {request_id})" if request_id else ""))
        self.status, self.detail, self.request_id, self.retry_after = status, detail, request_id, retry_after


@dataclass(frozen=True)
class Hit:
    """One result of a search: its final rank, page, and both stages' scores and ranks."""

    rank: int
    doc_id: str
    page: int
    score: float
    first_stage_rank: int
    rerank_score: float | None = None
    rerank_rank: int | None = None
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    thumbnail_url: str | None = None


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    generation: str
    timings: dict[str, float]
    request_id: str | None = None


@dataclass(frozen=True)
class Ranked:
    """A reranked document: its index in the request's ``documents`` and its score."""

    index: int
    relevance_score: float


@dataclass(frozen=True)
class PageInfo:
    doc_id: str
    page: int
    source: str | None
    metadata: dict[str, Any]


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

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float | None = None) -> tuple[dict[str, Any], str | None]:
        """The JSON answer and its request id; EndpointError for anything but 2xx."""
        status, headers, raw = self._request(method, path, body, timeout)
        request_id = headers.get("x-request-id")
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"detail": raw.decode(errors="replace")[:500]}
        if status >= 400:
            detail = answer.get("detail") if isinstance(answer, dict) else None
            if detail is None and isinstance(answer, dict) and isinstance(answer.get("error"), dict):
                detail = answer["error"].get("message")  # OpenAI's error shape (/v1/embeddings)
            raise EndpointError(status, str(detail if detail is not None else answer), request_id,
                                headers.get("retry-after"))
        return answer, request_id

    # -- the API ------------------------------------------------------------------------------------------------------

    def search(self, query: str | None = None, *, image: bytes | None = None, top_k: int | None = None,
               rerank_depth: int | None = None, filter: dict[str, Any] | None = None,
               timeout: float | None = None) -> SearchResult:
        """``POST /search``: the top pages for a text query, an image query (PNG/JPEG/WebP bytes), or both."""
        body: dict[str, Any] = {k: v for k, v in (("query", query), ("top_k", top_k), ("rerank_depth", rerank_depth),
                                                  ("filter", filter)) if v is not None}
        if image is not None:
            body["image"] = base64.b64encode(image).decode()
        answer, request_id = self._json("POST", "search", body, timeout)
        fields = Hit.__dataclass_fields__
        hits = [Hit(**{k: v for k, v in r.items() if k in fields}) for r in answer["results"]]
        return SearchResult(hits, answer["generation"], answer["timings"], request_id)

    def embed(self, inputs: str | bytes | list[str | bytes], *, dimensions: int | None = None,
              input_type: Literal["query", "document"] = "query") -> list[list[float]]:
        """``POST /v1/embeddings``: one vector per text or image (bytes), with the query or the document prompt, at
        ``dimensions`` (one of the model's Matryoshka dims; default: the index's)."""
        items = inputs if isinstance(inputs, list) else [inputs]
        body: dict[str, Any] = {"input": [{"type": "image_url", "image_url": {"url": _data_url(x)}}
                                          if isinstance(x, bytes) else x for x in items],
                                "input_type": input_type, "encoding_format": "float"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        answer, _ = self._json("POST", "v1/embeddings", body)
        return [d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])]

    def rerank(self, query: str, documents: list[str | bytes | dict[str, Any]], *,
               top_n: int | None = None) -> list[Ranked]:
        """``POST /v2/rerank``: the documents (texts, images as bytes, or indexed pages ``{"doc_id", "page"}``) by
        the reranker's score, best first."""
        docs = [{"image": _data_url(d)} if isinstance(d, bytes) else d for d in documents]
        body: dict[str, Any] = {"query": query, "documents": docs}
        if top_n is not None:
            body["top_n"] = top_n
        answer, _ = self._json("POST", "v2/rerank", body)
        return [Ranked(r["index"], r["relevance_score"]) for r in answer["results"]]

    def page(self, doc_id: str, page: int | None = None, size: Literal["thumbnail", "full"] = "thumbnail") -> bytes:
        """``GET /pages/{doc_id}``: a page's thumbnail or full image (PNG or JPEG bytes)."""
        status, headers, raw = self._request("GET", self._page_path(doc_id, page, size))
        if status >= 400:
            try:
                detail = json.loads(raw).get("detail")
            except ValueError:
                detail = raw.decode(errors="replace")[:500]
            raise EndpointError(status, str(detail), headers.get("x-request-id"))
        return raw

    def page_info(self, doc_id: str, page: int | None = None) -> PageInfo:
        """A page's doc_id, page number, source and document metadata."""
        answer, _ = self._json("GET", self._page_path(doc_id, page, "info"))
        return PageInfo(answer["doc_id"], answer["page"], answer.get("source"), answer.get("metadata") or {})

    def delete(self, *, doc_ids: list[str] | None = None, sources: list[str] | None = None,
               filter: dict[str, Any] | None = None) -> dict[str, Any]:
        """``POST /admin/delete`` (an ``admin`` key): returns once the endpoint no longer serves those documents."""
        body = {k: v for k, v in (("doc_ids", doc_ids), ("sources", sources), ("filter", filter)) if v}
        return self._json("POST", "admin/delete", body)[0]

    def health(self, timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        """``GET /healthz``: (200, report) when every stage is loaded, (503, each stage's state) while not; never
        raises for a status. Raises OSError when nothing answers at the URL."""
        status, _, raw = self._request("GET", "healthz", timeout=timeout)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, {"detail": raw.decode(errors="replace")[:500]}

    @staticmethod
    def _page_path(doc_id: str, page: int | None, size: str) -> str:
        query = {"size": size, **({"page": page} if page is not None else {})}
        return f"pages/{urllib.parse.quote(doc_id)}?{urllib.parse.urlencode(query)}"
