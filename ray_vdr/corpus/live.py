"""The live manifest: which index generation (an index and the model it was built with) an endpoint serves.

``ray-vdr promote`` writes it (:mod:`ray_vdr.promote`); every replica of the endpoint reads it (``serving/``)::

    {"live": {"id", "index", "model", "dim", "metrics", "promoted_at"}, "previous": {...} | null,
     "history": [{"at", "candidate", "live", "decision", "reason", ...}, ...]}

A generation's id is derived from its index URI, so the same index is the same generation everywhere.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ray_vdr.config import ServeConfig
from ray_vdr.storage import is_file, read_bytes

__all__ = ["generation", "generation_config", "read_live", "serving_generations"]


def generation(index: str, model: str | None = None, dim: int | None = None) -> dict[str, Any]:
    """A servable generation: an index folder (its id is derived from the URI), optionally its model and dimension."""
    gid = "g-" + hashlib.sha1(index.rstrip("/").encode()).hexdigest()[:10]
    return {"id": gid, "index": index, "model": model, "dim": dim}


def read_live(uri: str) -> dict[str, Any] | None:
    """The live manifest `ray-vdr promote` writes (None while there is none)."""
    return json.loads(read_bytes(uri)) if is_file(uri) else None


def serving_generations(cfg: ServeConfig) -> list[dict[str, Any]]:
    """The generations an endpoint serves, preferred first: the live manifest's live and previous ones, or, without
    a manifest, ``cfg.index`` (with ``cfg.model`` and ``cfg.dim``)."""
    live = read_live(cfg.live) if cfg.live else None
    if live is None:
        return [generation(cfg.index, cfg.model, cfg.dim)]
    return [g for g in (live["live"], live.get("previous")) if g]


def generation_config(cfg: ServeConfig, gen: dict[str, Any]) -> ServeConfig:
    """``cfg`` bound to one generation's index, model and dimension."""
    return cfg.model_copy(update={"index": gen["index"], "model": gen.get("model"), "dim": gen.get("dim")})
