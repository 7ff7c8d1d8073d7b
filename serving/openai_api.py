"""OpenAI-compatible embeddings (``POST /v1/embeddings``) without Ray: the request's checks and the response.

What the ``openai`` client sends (``OpenAI(base_url=…/v1).embeddings.create(model=…, input=…, dimensions=…)``)::

    {"model": "...", "input": "text" | ["text", ...] | [{"type": "image_url", "image_url": {"url": "data:..."}}, ...],
     "dimensions": 256, "encoding_format": "float" | "base64", "input_type": "query" | "document"}

``input_type`` is this endpoint's extra field (``extra_body`` in the client): the query prompt (default) or the
document prompt. ``token_vectors`` (also ``extra_body``) asks a multi-vector embedder for each input's token vectors:
``embedding`` is then a list of vectors (base64: the tokens x dim float32 matrix) and ``tokens`` their number.
``dimensions`` must be one of the embedder's Matryoshka dims (``serve.embedding_dims``, by default the model's
dimension and its halvings down to 64, and the index's). Images are base64 data URLs (never fetched).
Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, which the client raises as
``BadRequestError``. The request and response models are :mod:`ray_vdr.protocol`'s (the one wire format).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from PIL import Image

from ray_vdr.config import ServeLimits
from ray_vdr.protocol import Embedding, EmbeddingsRequest, EmbeddingsResponse, Usage
from serving.core import RequestError, decode_image_query

__all__ = ["allowed_dims", "embeddings_response", "error_param", "parse_embeddings"]

MAX_INPUTS = 256


def error_param(message: str) -> str | None:
    """The request field an error message starts with (OpenAI's ``param``)."""
    head = message.split(" ", 1)[0].split("[", 1)[0].rstrip(":")
    return head if head in ("input", "dimensions", "encoding_format", "input_type", "model", "token_vectors") else None


def allowed_dims(configured: list[int] | None, full_dim: int, index_dim: int) -> list[int]:
    """The dims ``dimensions`` may take, largest first."""
    if configured:
        return sorted({d for d in configured if d <= full_dim}, reverse=True)
    dims, d = {full_dim, index_dim}, full_dim
    while d // 2 >= min(64, index_dim) and d % 2 == 0:
        d //= 2
        dims.add(d)
    return sorted(dims, reverse=True)


def _item(x: Any, n: int, limits: ServeLimits) -> str | Image.Image:
    if isinstance(x, str):
        if not x.strip():
            raise RequestError(400, f"input[{n}] is empty")
        if len(x) > limits.max_query_chars:
            raise RequestError(400, f"input[{n}] has {len(x)} characters; the limit is {limits.max_query_chars}")
        return x
    if isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str):
        return _item(x["text"], n, limits)
    if isinstance(x, dict) and x.get("type") == "image_url":
        url = x.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise RequestError(400, f"input[{n}].image_url.url must be a data: URL with base64 image bytes")
        if not url.startswith("data:"):
            raise RequestError(400, f"input[{n}]: image URLs must be data: URLs (base64): the endpoint never fetches "
                               "URLs")
        return decode_image_query(url, limits.image)
    if isinstance(x, int) or (isinstance(x, list) and all(isinstance(t, int) for t in x)):
        raise RequestError(400, "input: token arrays are not supported; send text or image content parts")
    if isinstance(x, list) and len(x) == 1:  # one content part (a message's content list) is not a mix: that part
        return _item(x[0], n, limits)
    if isinstance(x, list):
        raise RequestError(400, f"input[{n}] mixes {len(x)} content parts in one input: this embedder encodes a text "
                           "or an image per input, not both together; send them as separate inputs")
    raise RequestError(400, f"input[{n}] must be a string or a content part of type text or image_url")


def parse_embeddings(req: EmbeddingsRequest, limits: ServeLimits, dims: list[int],
                     index_dim: int, multi_vector: bool = False) -> tuple[list[str | Image.Image], int]:
    """The items to encode and the dimension; RequestError(400) naming the field otherwise."""
    if multi_vector and not req.token_vectors:
        raise RequestError(400, "token_vectors: this endpoint's embedder is multi-vector (a vector per token, scored "
                           "by MaxSim): ask for its token vectors with token_vectors: true (extra_body in the openai "
                           "client)")
    if req.token_vectors and not multi_vector:
        raise RequestError(400, "token_vectors: this endpoint's embedder gives one vector per input, not token vectors")
    raw = req.input if isinstance(req.input, list) else [req.input]
    if not raw:
        raise RequestError(400, "input is empty")
    if len(raw) > MAX_INPUTS:
        raise RequestError(400, f"input has {len(raw)} items; the limit is {MAX_INPUTS}")
    if all(isinstance(t, int) for t in raw):
        raise RequestError(400, "input: token arrays are not supported; send text or image content parts")
    items = [_item(x, n, limits) for n, x in enumerate(raw)]
    dim = index_dim if req.dimensions is None else req.dimensions
    if dim not in dims:
        raise RequestError(400, f"dimensions must be one of this embedder's Matryoshka dims {dims}, got {dim}")
    return items, dim


def embeddings_response(vectors: np.ndarray | list[np.ndarray], encoding: str, model: str,
                        tokens: int) -> EmbeddingsResponse:
    """The vectors (rows) or each input's token vectors (2-d arrays) in OpenAI's shape."""
    def one(i: int, v: np.ndarray) -> Embedding:
        value = (base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode() if encoding == "base64"
                 else v.astype(np.float32).tolist())
        return Embedding(index=i, embedding=value, tokens=len(v) if v.ndim == 2 else None)

    return EmbeddingsResponse(model=model, data=[one(i, v) for i, v in enumerate(vectors)],
                              usage=Usage(prompt_tokens=tokens, total_tokens=tokens))
