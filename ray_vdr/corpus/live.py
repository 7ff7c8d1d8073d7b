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
from typing import Any

from ray_vdr.config import ServeConfig
from ray_vdr.storage import read_json

__all__ = ["base_id", "generation", "generation_config", "read_live", "serving_generations"]


def generation(index: str, model: str | None = None, dim: int | None = None,
               version: int | None = None) -> dict[str, Any]:
    """A servable generation: an index folder (its id is derived from the URI), optionally its model and dimension,
    and a version of the index (each sync, delete or compaction publishes one; ``@v<n>`` in the id)."""
    gid = "g-" + hashlib.sha1(index.rstrip("/").encode()).hexdigest()[:10]
    out = {"id": gid if version is None else f"{gid}@v{version}", "index": index, "model": model, "dim": dim}
    if version is not None:
        out["version"] = version
    return out


def base_id(gid: str) -> str:
    """A generation's id without its index version (what versions of one index share: the model)."""
    return gid.split("@", 1)[0]


def read_live(uri: str) -> dict[str, Any] | None:
    """The live manifest `ray-vdr promote` writes (None while there is none)."""
    return read_json(uri)


def _versions(gen: dict[str, Any], previous_too: bool) -> list[dict[str, Any]]:
    """A generation at its index's current version (and the previous one, still served while replicas switch)."""
    from ray_vdr.corpus.store import read_manifest

    manifest = read_manifest(gen["index"].rstrip("/"))
    if manifest is None or "version" not in manifest:  # not there yet, or an index from before versions
        return [generation(gen["index"], gen.get("model"), gen.get("dim"))]
    out = [generation(gen["index"], gen.get("model"), gen.get("dim"), manifest["version"])]
    if previous_too and manifest.get("previous_version"):
        out.append(generation(gen["index"], gen.get("model"), gen.get("dim"), manifest["previous_version"]))
    return out


def serving_generations(cfg: ServeConfig) -> list[dict[str, Any]]:
    """The generations an endpoint serves, preferred first: the live manifest's live and previous ones, or, without
    a manifest, ``cfg.index`` (with ``cfg.model`` and ``cfg.dim``); each at its index's current version, and the
    preferred one also at its previous version."""
    live = read_live(cfg.live) if cfg.live else None
    bases = [generation(cfg.index, cfg.model, cfg.dim)] if live is None else \
        [g for g in (live["live"], live.get("previous")) if g]
    out = []
    for i, g in enumerate(bases):
        out += [v for v in _versions(g, previous_too=i == 0) if v["id"] not in {o["id"] for o in out}]
    return out


def generation_config(cfg: ServeConfig, gen: dict[str, Any]) -> ServeConfig:
    """``cfg`` bound to one generation's index, model and dimension."""
    return cfg.model_copy(update={"index": gen["index"], "model": gen.get("model"), "dim": gen.get("dim")})
