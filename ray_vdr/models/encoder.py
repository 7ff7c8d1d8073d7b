"""The one index encoder: queries and pages encoded as an index encodes them, at its dimension.

The embedding job (pages), mining and the training-data job (queries and positives), two-stage evaluation and
promotion (both), and the endpoint (queries, and ``/v1/embeddings``) all encode through :class:`IndexEncoder`, built
from the index's :class:`~ray_vdr.models.binding.EmbedderBinding` and a :class:`~ray_vdr.models.load.Runtime`: the
same prompts, pixel bounds, token limit, truncation and normalisation everywhere, and the model's own code when the
binding says it needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ray_vdr.models.binding import EmbedderBinding
from ray_vdr.models.load import Runtime, load_embedder

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["IndexEncoder"]


class IndexEncoder:
    """An index's embedder: ``encode_queries`` with the query prompt, ``encode_pages`` with the document prompt, both
    truncated to ``dim`` (default: the index's, given here) and L2-normalised, as float32 rows.

    A multi-vector embedder (``binding.multi_vector``) returns each item's token vectors instead: a list of float32
    (tokens, dim) arrays, each token cut to ``dim`` and L2-normalised; pages optionally token-pooled (``pooling``)."""

    def __init__(self, binding: EmbedderBinding, runtime: Runtime | None = None, dim: int | None = None):
        self.binding = binding
        self.model = load_embedder(binding, runtime)
        self.dim = dim or binding.truncate_dim or self.full_dim
        self.multi_vector = binding.multi_vector

    @property
    def full_dim(self) -> int:
        return self.model.get_embedding_dimension()

    def encode_queries(self, items: list[str | Image.Image], dim: int | None = None,
                       batch_size: int | None = None) -> np.ndarray | list[np.ndarray]:
        """Query vectors (texts, or images for an image query), one row per item (token vectors: one array each)."""
        return self._encode(self.model.encode_query, items, dim, batch_size)

    def encode_pages(self, items: list[Image.Image | str], dim: int | None = None,
                     batch_size: int | None = None, pooling: float = 1.0) -> np.ndarray | list[np.ndarray]:
        """Page (document) vectors, one row per item (token vectors: one array each, pooled by ``pooling``)."""
        extra = {}
        if self.multi_vector and pooling > 1:
            from sentence_transformers.multi_vector_encoder.modules.token_pooling import HierarchicalTokenPooling

            extra["token_pooling"] = HierarchicalTokenPooling(pool_factor=pooling)
        return self._encode(self.model.encode_document, items, dim, batch_size, **extra)

    def _encode(self, fn: Any, items: list, dim: int | None, batch_size: int | None,
                **extra: Any) -> np.ndarray | list[np.ndarray]:
        """Texts and images in separate calls (one modality per forward), rows back in the items' order."""
        dim = dim or self.dim
        if self.multi_vector:
            return self._encode_tokens(fn, items, dim, batch_size, **extra)
        out = np.zeros((len(items), dim), dtype=np.float32)
        for want_text in (True, False):
            idx = [i for i, x in enumerate(items) if isinstance(x, str) == want_text]
            if idx:
                out[idx] = fn([items[i] for i in idx], batch_size=batch_size or len(idx), truncate_dim=dim,
                              normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return out

    def _encode_tokens(self, fn: Any, items: list, dim: int, batch_size: int | None,
                       **extra: Any) -> list[np.ndarray]:
        from ray_vdr.models.multivector import truncated_tokens

        out: list[np.ndarray] = [np.zeros((0, dim), np.float32)] * len(items)
        for want_text in (True, False):
            idx = [i for i, x in enumerate(items) if isinstance(x, str) == want_text]
            if idx:
                tokens = fn([items[i] for i in idx], batch_size=batch_size or len(idx), show_progress_bar=False,
                            convert_to_numpy=True, **extra)
                for i, t in zip(idx, truncated_tokens(tokens, dim), strict=True):
                    out[i] = t.numpy()
        return out

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens of the texts as the model's tokenizer counts them (OpenAI's ``usage``)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None or not texts:
            return 0
        return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
