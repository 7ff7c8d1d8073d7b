"""The retrieval endpoint's wire format: every request and response body of ``serving/``, as pydantic models.

One place for the wire format (as vLLM's ``protocol.py``): the server (``serving/app.py``) declares its routes with
these models, so ``/openapi.json`` shows them, and :mod:`ray_vdr.client` parses the answers into the same models.
Pydantic only: no Ray, no torch, no ``serving`` import (the library never imports the app), so the client stays light.

- ray-vdr's own API: :class:`SearchRequest` → :class:`SearchResponse`, :class:`PageInfo`, :class:`HealthResponse`,
  :class:`DeleteRequest` → :class:`DeleteResponse`; errors :class:`ErrorResponse` (``{"detail": "..."}``).
- OpenAI's embeddings API, field by field: :class:`EmbeddingsRequest` → :class:`EmbeddingsResponse`; errors
  :class:`OpenAIErrorResponse` (``{"error": {"message", "type", "param", "code"}}``, which the ``openai`` client
  raises as ``BadRequestError``, ``AuthenticationError``, …).
- Cohere's v2 rerank API (and Jina's, the same body): :class:`RerankRequest` → :class:`RerankResponse`; errors in
  ray-vdr's shape (Jina's: ``{"detail": "..."}``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from ray_vdr.corpus.manifest import DeleteSummary

__all__ = ["DeleteRequest", "DeleteResponse", "Embedding", "EmbeddingsRequest", "EmbeddingsResponse", "ErrorResponse",
           "HealthResponse", "IndexStatus", "OpenAIError", "OpenAIErrorResponse", "PageInfo", "RerankApiVersion",
           "RerankBilledUnits", "RerankMeta", "RerankRequest", "RerankResponse", "RerankResult", "SearchHit",
           "SearchRequest", "SearchResponse", "StageStatus", "Timings", "Usage"]


# ---------------------------------------------------------------------------------------------------------------------
# ray-vdr's API: search, pages, health, admin deletes


class SearchRequest(BaseModel):
    """``POST /search``: a text query, an image query (base64), or both."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, description="The text query.", examples=["What was ACME's Q3 2021 revenue?"])
    image: str | None = Field(
        None, description="An image query: base64 of PNG/JPEG/WebP bytes (a data: URL prefix is accepted). The "
        "endpoint never fetches URLs."
    )
    top_k: int | None = Field(None, description="Results to return (default and bound: the server's limits).")
    rerank_depth: int | None = Field(
        None, description="First-stage candidates the reranker scores (0 = no reranking; default: the server's)."
    )
    filter: dict[str, Any] | None = Field(
        None, description="Only pages whose document metadata matches every clause: field: value (equality), "
        "field: {in: [...]}, field: {gte/gt/lte/lt: number or date}. doc_id and source are always fields. Applied "
        "inside the vector search, so top_k stays full. An unknown field or a wrong type is a 422 naming it.",
        examples=[{"collection": "finance", "year": {"gte": 2021}}],
    )
    allow_partial: bool = Field(
        False, description="A sharded index: answer from the shards that can when one cannot (the answer says "
        "\"partial\": true and names the missing shards). Default: a 503 naming the shard."
    )


class SearchHit(BaseModel):
    """One result of a search: its final rank, page, and both stages' scores and ranks."""

    rank: int = Field(..., description="The final rank, from 1.")
    doc_id: str = Field(..., description="The document (its file name or id).")
    page: int = Field(..., description="The page in the document, from 1.")
    score: float = Field(..., description="The first stage's score (cosine similarity; a multi-vector index: MaxSim).")
    first_stage_rank: int = Field(..., description="The rank the first stage gave it, from 1.")
    rerank_score: float | None = Field(None, description="The reranker's score; null when it was not reranked.")
    rerank_rank: int | None = Field(None, description="The rank among the reranked candidates; null when not reranked.")
    source: str | None = Field(None, description="Where the document was read from.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="The document's metadata (its sidecar).")
    thumbnail_url: str | None = Field(None, description="The page's thumbnail, under this endpoint (GET /pages).")


class Timings(BaseModel):
    """Where a search's time went: each stage as the ingress saw it, and each model's compute time and batch size."""

    embed_ms: float
    search_ms: float
    rerank_ms: float
    total_ms: float
    embed_compute_ms: float = Field(..., description="The embedder's forward of the batch this query was in.")
    search_compute_ms: float = Field(..., description="The FAISS search of the batch this query was in.")
    rerank_compute_ms: float = Field(..., description="The reranker's forward of the batch this query was in.")
    embed_batch: int = Field(..., description="Requests in the embedder's batch.")
    rerank_batch: int = Field(..., description="Requests in the reranker's batch (0: not reranked).")


class SearchResponse(BaseModel):
    """``POST /search``'s answer."""

    query: str | None = Field(..., description="The text query, stripped; null for an image-only query.")
    image_query: bool = Field(..., description="Whether the query had an image (searched by the image).")
    top_k: int
    generation: str = Field(..., description="The generation (index and model, @ version) that answered.")
    rerank_depth: int = Field(..., description="Candidates the reranker scored (0: not reranked).")
    results: list[SearchHit]
    partial: bool = Field(False, description="Only with allow_partial: some index shards did not answer.")
    missing_shards: list[int] = Field(default_factory=list, description="The index shards that did not answer.")
    timings: Timings
    request_id: SkipJsonSchema[str | None] = Field(None, exclude=True, description="The answer's x-request-id header "
                                                   "(the client sets it; never in the body).")

    @property
    def hits(self) -> list[SearchHit]:
        """The results, best first."""
        return self.results


class PageInfo(BaseModel):
    """``GET /pages/{doc_id}?size=info``: what the index knows of a page."""

    doc_id: str
    page: int
    source: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class IndexStatus(BaseModel):
    """The index a retriever serves, in its health report."""

    vectors: int
    dim: int
    type: str = Field(..., description="The FAISS index type (flat, hnsw, ivf…).")
    model: str = Field(..., description="The embedder the index was built with.")
    updated_at: str | None = Field(None, description="When this index version was published (ISO 8601).")
    version: int | None = None
    live_pages: int


class StageStatus(BaseModel):
    """One stage's health: the preferred generation's state, and every generation it holds."""

    state: Literal["loading", "ready", "failed", "unavailable"]
    detail: str = Field(..., description="What it is doing or why it failed.")
    generation: str | None = Field(None, description="The generation it serves first.")
    generations: dict[str, str] = Field(default_factory=dict, description="Each generation's state.")
    index: IndexStatus | None = Field(None, description="The retriever's live index.")
    shard: int | None = Field(None, description="A sharded endpoint's retriever: the index shard it serves.")
    node: str | None = Field(None, description="The Ray node of the replica that answered.")


class HealthResponse(BaseModel):
    """``GET /healthz`` (200 ready, 503 not yet)."""

    ready: bool
    generation: str | None = Field(None, description="The generation the endpoint serves first.")
    stages: dict[str, StageStatus] = Field(default_factory=dict)
    detail: str | None = Field(None, description="Why it is not ready (each stage's detail).")


class DeleteRequest(BaseModel):
    """``POST /admin/delete``: documents to remove (any of them)."""

    model_config = ConfigDict(extra="forbid")

    doc_ids: list[str] = Field(default_factory=list, max_length=10_000)
    sources: list[str] = Field(default_factory=list, max_length=1_000)
    filter: dict[str, Any] | None = None


class DeleteResponse(DeleteSummary):
    """``POST /admin/delete``'s answer, once the endpoint serves the new index version: the delete's summary (the one
    ``ray-vdr delete`` prints) and the generation the endpoint serves now."""

    generation: str = Field(..., description="The generation the endpoint serves now.")


class ErrorResponse(BaseModel):
    """Any error of ray-vdr's routes (and Jina's / Cohere's rerank): 4xx, 503 with Retry-After, 504."""

    detail: str = Field(..., description="What went wrong, naming the field or limit; never an API key.")


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI's embeddings API


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings`` (OpenAI's embeddings API, plus ``input_type``)."""

    model_config = ConfigDict(extra="ignore")  # the client may send fields this endpoint has no use for (user, …)

    input: Any = Field(..., description="A string, a list of strings, or image content parts "
                       "({type: image_url, image_url: {url: data:image/png;base64,...}}).")
    model: str | None = Field(None, description="Ignored: the endpoint serves the embedder of its live index.")
    dimensions: int | None = Field(None, description="One of the embedder's Matryoshka dims (default: the index's).")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32.")
    input_type: Literal["query", "document"] = Field("query", description="The prompt to encode with.")
    token_vectors: bool = Field(False, description="A multi-vector (late-interaction) embedder: each input's token "
                                "vectors, as its index scores them (required with such an embedder, refused with "
                                "another). ``embedding`` is then a list of vectors, or base64 of the (tokens x dim) "
                                "little-endian float32 matrix; ``tokens`` says how many.")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[list[float]] | str = Field(
        ..., description="The vector, or base64 of its little-endian float32; token vectors: one list per token.")
    tokens: int | None = Field(None, description="Token vectors only: how many (the rows of ``embedding``).")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """``POST /v1/embeddings``'s answer, as OpenAI's."""

    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: Usage


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """An error of ``/v1/embeddings``, in OpenAI's shape."""

    error: OpenAIError

    @classmethod
    def of(cls, status: int, message: str, param: str | None = None) -> OpenAIErrorResponse:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        return cls(error=OpenAIError(message=message, type=kind, param=param))


# ---------------------------------------------------------------------------------------------------------------------
# Cohere's v2 rerank API (Jina's: the same request, at /v1/rerank)


class RerankRequest(BaseModel):
    """``POST /v2/rerank`` (Cohere v2) and ``POST /v1/rerank`` (Jina)."""

    model_config = ConfigDict(extra="ignore")  # max_tokens_per_doc, priority, return_documents, …

    query: str = Field(..., description="The text query.")
    documents: list[Any] = Field(..., description="Texts, image data URLs, {text}, {image} or {doc_id, page}.")
    top_n: int | None = Field(None, description="Results to return, best first (default: all).")
    model: str | None = Field(None, description="Ignored: the endpoint serves one reranker.")


class RerankResult(BaseModel):
    """A reranked document: its index in the request's ``documents`` and the reranker's score."""

    index: int
    relevance_score: float


class RerankApiVersion(BaseModel):
    version: str = "2"


class RerankBilledUnits(BaseModel):
    search_units: int = 1


class RerankMeta(BaseModel):
    api_version: RerankApiVersion = Field(default_factory=RerankApiVersion)
    billed_units: RerankBilledUnits = Field(default_factory=RerankBilledUnits)


class RerankResponse(BaseModel):
    """``POST /v2/rerank``'s answer, as Cohere's (best first)."""

    id: str
    model: str
    results: list[RerankResult]
    meta: RerankMeta = Field(default_factory=RerankMeta)
