"""The embedder binding: how an index's pages were encoded (model, prompts, pixel bounds, token limit, remote code),
recorded in its manifest so that every later encoder encodes queries exactly the same way (pydantic only: no torch).

Written by :func:`ray_vdr.models.load.embedder_binding` (plus the model's identity, by the embedding job); read by
:class:`ray_vdr.models.encoder.IndexEncoder`, which mining, evaluation, promotion and serving all encode through.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EmbedderBinding", "PixelBounds"]


class PixelBounds(BaseModel):
    """The image processor's pixel budget the pages were encoded with (Qwen-VL min/max pixels; None: the model's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_pixels: int | None = None
    max_pixels: int | None = None


class EmbedderBinding(BaseModel):
    """How an embedder encodes for an index. Two encoders with equal bindings (and equal model files: ``signature``)
    produce the same vectors; anything that changes the vectors is a field here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="The model: a folder, URI or hub id.")
    truncate_dim: int | None = Field(None, description="The truncation saved with the model, if any.")
    normalized: bool = Field(True, description="Whether the model ends in a Normalize module.")
    document_prompt: str | None = Field(None, description="The prompt pages were encoded with.")
    query_prompt: str | None = Field(None, description="The prompt queries are encoded with.")
    pixel_bounds: PixelBounds = Field(default_factory=PixelBounds, description="The processor's pixel budget.")
    max_seq_length: int | None = Field(None, description="Token limit per input; None: the model's own.")
    multi_vector: bool = Field(False, description="A multi-vector (late-interaction) model: a token vector per "
                               "input token or image patch, scored by MaxSim (a saved MultiVectorEncoder).")
    trust_remote_code: bool = Field(
        False, description="The model needs its repository's own code (custom modules) to load; every loader of this "
        "binding passes it on.")
    fingerprint: str | None = Field(None, description="sha256 over the model's files (computed once, at index build).")
    signature: str | None = Field(None, description="The cheap identity loaders compare (models.load.model_signature).")

    def at(self, path: str) -> EmbedderBinding:
        """The same encoding with the model files at ``path`` (a copy, or the same model under another URI)."""
        return self.model_copy(update={"path": path})
