"""The live manifest: which index generation (an index and the model it was built with) an endpoint serves.

``ray-vdr promote`` writes it (:mod:`ray_vdr.promote`); every replica of the endpoint reads it (``serving/``)::

    {"live": {"id", "index", "model", "dim", "metrics", "promoted_at"}, "previous": {...} | null,
     "history": [{"at", "candidate", "live", "decision", "reason", ...}, ...]}

A generation's id is derived from its index URI and the index's version (``g-<hash>@v<n>``), so the same index
version is the same generation everywhere; a sync, delete or compaction of the live index publishes a new version,
which the endpoint follows like a promotion.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field

from ray_vdr.config import ServeConfig
from ray_vdr.storage import read_json, write_bytes

__all__ = ["Generation", "LiveManifest", "PromotionRecord", "base_id", "generation", "generation_config",
           "read_live", "serving_generations", "write_live"]


class Generation(BaseModel):
    """A servable generation: an index (at one of its versions) and the model its queries are encoded with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="g-<hash of the index URI>[@v<version>]: the same everywhere for one index version.")
    index: str = Field(description="The index folder or URI.")
    model: str | None = Field(None, description="The query embedder; None: the one the index was built with.")
    dim: int | None = Field(None, description="The index's dimension; None: read from its manifest.")
    version: int | None = Field(None, description="The index version; None: its current one.")
    metrics: dict[str, float] | None = Field(None, description="Embed-only metrics when promoted (eval split).")
    promoted_at: str | None = None

    @property
    def base_id(self) -> str:
        return base_id(self.id)


class GenerationRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    model: str | None = None
    metrics: dict[str, float] | None = None


class PromotionRecord(BaseModel):
    """One decision of ``ray-vdr promote``, kept in the live manifest's history."""

    model_config = ConfigDict(extra="forbid")

    at: str
    candidate: Generation
    live: GenerationRef
    decision: str = Field(description="promoted or rejected")
    reason: str


class LiveManifest(BaseModel):
    """The live manifest (``serve.live``): the generation every replica serves, the previous one, and the history."""

    model_config = ConfigDict(extra="forbid")

    live: Generation
    previous: Generation | None = None
    history: list[PromotionRecord] = Field(default_factory=list)


def generation(index: str, model: str | None = None, dim: int | None = None,
               version: int | None = None) -> Generation:
    """A servable generation: an index folder (its id is derived from the URI), optionally its model and dimension,
    and a version of the index (each sync, delete or compaction publishes one; ``@v<n>`` in the id)."""
    gid = "g-" + hashlib.sha1(index.rstrip("/").encode()).hexdigest()[:10]
    return Generation(id=gid if version is None else f"{gid}@v{version}", index=index, model=model, dim=dim,
                      version=version)


def base_id(gid: str) -> str:
    """A generation's id without its index version (what versions of one index share: the model)."""
    return gid.split("@", 1)[0]


def read_live(uri: str) -> LiveManifest | None:
    """The live manifest `ray-vdr promote` writes (None while there is none)."""
    data = read_json(uri)
    return None if data is None else LiveManifest.model_validate(data)


def write_live(doc: LiveManifest, uri: str) -> None:
    write_bytes(doc.model_dump_json(indent=2).encode(), uri)


def _versions(gen: Generation, previous_too: bool) -> list[Generation]:
    """A generation at its index's current version (and the previous one, still served while replicas switch)."""
    from ray_vdr.corpus.store import read_manifest

    manifest = read_manifest(gen.index.rstrip("/"))
    if manifest is None or manifest.version is None:  # not there yet, or an index from before versions
        return [generation(gen.index, gen.model, gen.dim)]
    out = [generation(gen.index, gen.model, gen.dim, manifest.version)]
    if previous_too and manifest.previous_version:
        out.append(generation(gen.index, gen.model, gen.dim, manifest.previous_version))
    return out


def serving_generations(cfg: ServeConfig) -> list[Generation]:
    """The generations an endpoint serves, preferred first: the live manifest's live and previous ones, or, without
    a manifest, ``cfg.index`` (with ``cfg.model`` and ``cfg.dim``); each at its index's current version, and the
    preferred one also at its previous version."""
    live = read_live(cfg.live) if cfg.live else None
    bases = [generation(cfg.index, cfg.model, cfg.dim)] if live is None else \
        [g for g in (live.live, live.previous) if g]
    out: list[Generation] = []
    for i, g in enumerate(bases):
        out += [v for v in _versions(g, previous_too=i == 0) if v.id not in {o.id for o in out}]
    return out


def generation_config(cfg: ServeConfig, gen: Generation) -> ServeConfig:
    """``cfg`` bound to one generation's index, model and dimension."""
    return cfg.model_copy(update={"index": gen.index, "model": gen.model, "dim": gen.dim})
