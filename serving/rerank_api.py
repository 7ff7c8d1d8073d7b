"""Cohere- and Jina-compatible reranking (``POST /v2/rerank``, ``POST /v1/rerank``) without Ray: the request's
checks and the response.

What the ``cohere`` client sends (``ClientV2(base_url=URL).rerank(model=…, query=…, documents=[…], top_n=…)``; Jina's
API is the same at ``/v1/rerank``)::

    {"model": "...", "query": "text", "documents": ["text" | "data:image/png;base64,..." |
     {"text": "..."} | {"image": "data:..."} | {"doc_id": "report.pdf", "page": 3}], "top_n": 5}

A document is a text, an image (a base64 data URL; never fetched) or a reference to an indexed page, which the
endpoint reads from its page store (a page the index does not serve is a 404). The answer lists
``{index, relevance_score}`` best first: the CrossEncoder's own scores. The request and response models are
:mod:`ray_vdr.protocol`'s (the one wire format).
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

from PIL import Image

from ray_vdr.config import ServeLimits
from ray_vdr.protocol import RerankRequest, RerankResponse, RerankResult
from serving.core import RequestError, decode_image_query

__all__ = ["PageRef", "parse_rerank", "rerank_response"]


class PageRef(NamedTuple):
    """An indexed page a document refers to."""

    doc_id: str
    page: int


def _document(x: Any, n: int, limits: ServeLimits) -> str | Image.Image | PageRef:
    if isinstance(x, str):
        if x.startswith("data:"):
            return decode_image_query(x, limits.image)
        if not x.strip():
            raise RequestError(400, f"documents[{n}] is empty")
        if len(x) > limits.max_query_chars * 20:
            raise RequestError(400, f"documents[{n}] has {len(x)} characters; the limit is "
                               f"{limits.max_query_chars * 20}")
        return x
    if isinstance(x, dict):
        if isinstance(x.get("text"), str):
            return _document(x["text"], n, limits)
        image = x.get("image")
        if image is None and isinstance(x.get("image_url"), dict):
            image = x["image_url"].get("url")
        if isinstance(image, str):
            if not image.startswith("data:"):
                raise RequestError(400, f"documents[{n}]: images must be base64 data URLs: the endpoint never "
                                   "fetches URLs")
            return decode_image_query(image, limits.image)
        if isinstance(x.get("doc_id"), str):
            page = x.get("page", 1)
            if not isinstance(page, int) or isinstance(page, bool) or page < 1:
                raise RequestError(400, f"documents[{n}].page must be a positive integer")
            return PageRef(x["doc_id"], page)
    raise RequestError(400, f"documents[{n}] must be a text, an image data URL, {{text}}, {{image}} or "
                       "{doc_id, page}")


def parse_rerank(req: RerankRequest, limits: ServeLimits) -> tuple[str, list[str | Image.Image | PageRef], int]:
    """(query, documents, top_n); RequestError(400) naming the field otherwise."""
    query = req.query.strip()
    if not query:
        raise RequestError(400, "query is empty")
    if len(query) > limits.max_query_chars:
        raise RequestError(400, f"query has {len(query)} characters; the limit is {limits.max_query_chars}")
    if not req.documents:
        raise RequestError(400, "documents is empty")
    if len(req.documents) > limits.max_rerank_depth:
        raise RequestError(400, f"documents has {len(req.documents)} items; the limit is {limits.max_rerank_depth} "
                           "(limits.max_rerank_depth)")
    if req.top_n is not None and req.top_n <= 0:
        raise RequestError(400, f"top_n must be positive, got {req.top_n}")
    docs = [_document(x, n, limits) for n, x in enumerate(req.documents)]
    return query, docs, min(req.top_n or len(docs), len(docs))


def rerank_response(scores: list[float], top_n: int, model: str) -> RerankResponse:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_n]
    return RerankResponse(id=str(uuid.uuid4()), model=model,
                          results=[RerankResult(index=i, relevance_score=float(scores[i])) for i in order])
