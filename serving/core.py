"""The endpoint's core, without Ray: request checks, the index binding, query encoding, reranking, result merging.

The Serve deployments in ``serving/app.py`` wrap these plain classes; the load benchmark runs them in-process to
measure what the endpoint adds on top of the compute. Pages come from the index's page store
(:class:`ray_vdr.corpus.store.PageStore`).

Stages of one search::

    request ─► validate (limits, base64 image decode with the bomb guard) ─► IndexEncoder (query prompt, truncated
    dim, normalised) ─► FAISS top-N (N = max(top_k, rerank_depth)) ─► RerankScorer on the first rerank_depth
    (query, page image) pairs ─► merge: reranked candidates by rerank score, then the rest in first-stage order
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ray_vdr.config import ImageLimits, ServeConfig, ServeLimits
from ray_vdr.corpus.manifest import IndexManifest
from ray_vdr.eval.metrics import rerank_order
from ray_vdr.models.binding import EmbedderBinding
from ray_vdr.protocol import SearchHit, SearchRequest

if TYPE_CHECKING:
    from ray_vdr.models.encoder import IndexEncoder

logger = logging.getLogger(__name__)

__all__ = ["NotReady", "RequestError", "RerankScorer", "ShardUnavailable", "check_binding", "decode_image_query",
           "query_encoder",
           "merge_results", "parse_request"]


class RequestError(ValueError):
    """A request the endpoint refuses: ``status`` is the HTTP status (4xx: the message says what to change; 504: it
    took longer than ``limits.request_timeout_s``). The ingress answers it in the route's error shape."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # crosses replicas (a filter the Retriever refuses): keep the status
        return RequestError, (self.status, str(self))


class NotReady(RuntimeError):
    """A stage still loading (or waiting for its index), raised by the stages; the ingress tries the previous
    generation, else answers 503 with Retry-After."""


class ShardUnavailable(NotReady):
    """Index shards that did not answer: no live replica within ``retriever.shard_timeout_s``, or not loaded in any
    generation the ingress may use. 503 naming them (no other generation is tried: one answer, one generation)."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing

    def __reduce__(self):
        return ShardUnavailable, (str(self), self.missing)


@dataclass
class Query:
    text: str | None
    image: Image.Image | None
    top_k: int
    rerank_depth: int
    clauses: list | None = None

    @property
    def item(self) -> str | Image.Image:
        """What the embedder encodes: the image when there is one (a text+image query is searched by its image and
        reranked by its text)."""
        return self.image if self.image is not None else self.text


def decode_image_query(data: str, limits: ImageLimits) -> Image.Image:
    from ray_vdr.data.images import ImageRejected, decode_image

    text = data.strip()
    if text.startswith(("http://", "https://", "ftp://", "file:", "s3://", "gs://")):
        raise RequestError(422, "image must be base64-encoded image bytes: the endpoint never fetches URLs")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise RequestError(422, "image data URLs must be base64 (data:image/png;base64,...)")
    if len(text) > limits.max_bytes * 4 // 3 + 4:
        raise RequestError(413, f"image is larger than {limits.max_bytes} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(422, f"image is not valid base64: {e}") from None
    try:
        img, _ = decode_image(raw, limits)
    except ImageRejected as e:
        raise RequestError(422, f"image rejected ({e.reason}): {e.detail}") from None
    return img


def parse_request(req: SearchRequest, limits: ServeLimits, rerank_available: bool) -> Query:
    """Check a request against the limits; raises RequestError (4xx) naming the limit."""
    text = req.query.strip() if req.query is not None else None
    if not text and req.image is None:
        raise RequestError(422, "give a non-empty 'query' (text) or an 'image' (base64)")
    if text and len(text) > limits.max_query_chars:
        raise RequestError(422, f"query has {len(text)} characters; the limit is {limits.max_query_chars}")
    top_k = limits.default_top_k if req.top_k is None else req.top_k
    if not 1 <= top_k <= limits.max_top_k:
        raise RequestError(422, f"top_k must be between 1 and {limits.max_top_k}, got {top_k}")
    depth = (limits.default_rerank_depth if rerank_available else 0) if req.rerank_depth is None else req.rerank_depth
    if not 0 <= depth <= limits.max_rerank_depth:
        raise RequestError(422, f"rerank_depth must be between 0 and {limits.max_rerank_depth}, got {depth}")
    if depth and not rerank_available:
        raise RequestError(422, "this endpoint has no reranker: use rerank_depth 0")
    image = decode_image_query(req.image, limits.image) if req.image is not None else None
    if depth and not text:
        depth = 0  # the reranker scores (text, page) pairs: an image-only query is ranked by the first stage
    clauses = None
    if req.filter is not None:
        from ray_vdr.corpus.metadata import FilterError, parse_filter

        try:
            clauses = parse_filter(req.filter, limits.max_filter_clauses, limits.max_filter_values) or None
        except FilterError as e:
            raise RequestError(422, str(e)) from None
    return Query(text or None, image, top_k, depth, clauses)


# ---------------------------------------------------------------------------------------------------------------------
# the index binding: which model and dimension the endpoint must use


def check_binding(cfg: ServeConfig, manifest: IndexManifest) -> EmbedderBinding:
    """The query embedder for an index: the index's embedder binding (prompts, pixel bounds, remote code) with the
    model to load.

    Refuses (IndexMismatch) a ``cfg.dim`` other than the index's, and a model whose files differ from the ones the
    index was built with (by the cheap signature the manifest stores): queries and pages must come from the same
    weights, prompt and truncation.
    """
    from ray_vdr.corpus.store import check_manifest

    model = cfg.model or manifest.model.path
    check_manifest(manifest, model_path=model, dim=cfg.dim, where=f"the index at {cfg.index}")
    return manifest.model.at(model)


def query_encoder(cfg: ServeConfig, manifest: IndexManifest, device: str) -> IndexEncoder:
    """The index's encoder (checked against it), encoding queries at the index's dimension, on ``device``."""
    from ray_vdr.models.encoder import IndexEncoder
    from ray_vdr.models.load import Runtime

    return IndexEncoder(check_binding(cfg, manifest), Runtime(cfg.dtype, cfg.attn_implementation, device),
                        manifest.dim)


# ---------------------------------------------------------------------------------------------------------------------
# models


class RerankScorer:
    """A Sentence Transformers CrossEncoder scoring (query text, page image) pairs."""

    def __init__(self, path: str, cfg: ServeConfig, device: str):
        from ray_vdr.models.load import Runtime, load_reranker

        self.model = load_reranker(path, Runtime(cfg.dtype, cfg.attn_implementation, device),
                                   trust_remote_code=cfg.reranker_trust_remote_code)
        self.batch_size = cfg.rerank_batch_size

    def score(self, pairs: list[tuple[str, Image.Image]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        scores = self.model.predict(pairs, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(scores, dtype=np.float32).reshape(len(pairs))


# ---------------------------------------------------------------------------------------------------------------------
# merging the stages


def merge_results(hits: list[dict[str, Any]], rerank_scores: np.ndarray | None, top_k: int) -> list[SearchHit]:
    """Final ranking: the reranked head by rerank score (ties by first-stage rank), then the rest as retrieved.

    Each result keeps both stages' score and rank, so a client can see what the reranker changed.
    """
    depth = 0 if rerank_scores is None else len(rerank_scores)
    scores = [float(x) for x in rerank_scores] if depth else []
    order = rerank_order(list(range(len(hits))), scores, depth)
    rerank_rank = {i: r for r, i in enumerate(order[:depth], start=1)}
    return [SearchHit(rank=final, doc_id=hits[i]["doc_id"], page=hits[i]["page"], source=hits[i]["source"],
                      metadata=hits[i].get("metadata", {}), score=hits[i]["score"], first_stage_rank=hits[i]["rank"],
                      rerank_score=scores[i] if i < depth else None, rerank_rank=rerank_rank.get(i))
            for final, i in enumerate(order[:top_k], start=1)]
