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
    truncated to ``dim`` (default: the index's, given here) and L2-normalised, as float32 rows."""

    def __init__(self, binding: EmbedderBinding, runtime: Runtime | None = None, dim: int | None = None):
        self.binding = binding
        self.model = load_embedder(binding, runtime)
        self.dim = dim or binding.truncate_dim or self.full_dim

    @property
    def full_dim(self) -> int:
        return self.model.get_embedding_dimension()

    def encode_queries(self, items: list[str | Image.Image], dim: int | None = None,
                       batch_size: int | None = None) -> np.ndarray:
        """Query vectors (texts, or images for an image query), one row per item."""
        return self._encode(self.model.encode_query, items, dim, batch_size)

    def encode_pages(self, items: list[Image.Image | str], dim: int | None = None,
                     batch_size: int | None = None) -> np.ndarray:
        """Page (document) vectors, one row per item."""
        return self._encode(self.model.encode_document, items, dim, batch_size)

    def _encode(self, fn: Any, items: list, dim: int | None, batch_size: int | None) -> np.ndarray:
        """Texts and images in separate calls (one modality per forward), rows back in the items' order."""
        dim = dim or self.dim
        out = np.zeros((len(items), dim), dtype=np.float32)
        for want_text in (True, False):
            idx = [i for i, x in enumerate(items) if isinstance(x, str) == want_text]
            if idx:
                out[idx] = fn([items[i] for i in idx], batch_size=batch_size or len(idx), truncate_dim=dim,
                              normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return out

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens of the texts as the model's tokenizer counts them (OpenAI's ``usage``)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None or not texts:
            return 0
        return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
