"""Two-stage retrieval, without Ray: request checks, query encoding, reranking, the page store, result merging.

The Serve deployments in ``serving/app.py`` wrap these plain classes; the load benchmark runs them in-process to
measure what the endpoint adds on top of the compute.

Stages of one search::

    request ─► validate (limits, base64 image decode with the bomb guard) ─► QueryEncoder (query prompt, truncated
    dim, normalised) ─► FAISS top-N (N = max(top_k, rerank_depth)) ─► RerankScorer on the first rerank_depth
    (query, page image) pairs ─► merge: reranked candidates by rerank score, then the rest in first-stage order
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ray_vdr.config import ImageLimits, ModelConfig, ServeConfig, ServeLimits
from ray_vdr.storage import is_file, read_bytes
from ray_vdr.vector_index import MANIFEST

logger = logging.getLogger(__name__)

__all__ = ["Background", "Generations", "NotReady", "PageStore", "QueryEncoder", "RequestError", "RerankScorer",
           "SearchRequest", "check_binding", "generation", "merge_results", "parse_request", "read_live",
           "serving_generations"]


class RequestError(ValueError):
    """A request the endpoint refuses: ``status`` is the HTTP status (4xx), the message says what to change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NotReady(RuntimeError):
    """A stage still loading (or waiting for its index); the endpoint answers 503 with Retry-After."""


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


@dataclass
class Query:
    text: str | None
    image: Image.Image | None
    top_k: int
    rerank_depth: int

    @property
    def item(self) -> str | Image.Image:
        """What the embedder encodes: the image when there is one (a text+image query is searched by its image and
        reranked by its text)."""
        return self.image if self.image is not None else self.text


def _decode_image_query(data: str, limits: ImageLimits) -> Image.Image:
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
    image = _decode_image_query(req.image, limits.image) if req.image is not None else None
    if depth and not text:
        depth = 0  # the reranker scores (text, page) pairs: an image-only query is ranked by the first stage
    return Query(text or None, image, top_k, depth)


# ---------------------------------------------------------------------------------------------------------------------
# the index binding: which model and dimension the endpoint must use


def read_manifest(index: str) -> dict[str, Any] | None:
    return json.loads(read_bytes(f"{index}/{MANIFEST}")) if is_file(f"{index}/{MANIFEST}") else None


def check_binding(cfg: ServeConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """The query embedder for an index: its path, dimension, query prompt and pixel bounds.

    Refuses (IndexMismatch) a ``cfg.dim`` other than the index's, and a model whose files differ from the ones the
    index was built with: queries and pages must come from the same weights, prompt and truncation.
    """
    from ray_vdr.index import _local_model
    from ray_vdr.vector_index import check_manifest, model_fingerprint

    model = cfg.model or manifest["model"]["path"]
    where = f"the index at {cfg.index}"
    check_manifest(manifest, dim=cfg.dim, where=where)
    check_manifest(manifest, fingerprint=model_fingerprint(_local_model(model)), where=where)
    return {"model": model, "dim": manifest["dim"], "query_prompt": manifest["model"].get("query_prompt"),
            "pixel_bounds": manifest["model"].get("pixel_bounds") or {}}


# ---------------------------------------------------------------------------------------------------------------------
# models


def _threads(num_cpus: float, device: str) -> None:
    import math

    import torch

    if device == "cpu":  # Ray sets one OpenMP thread per whole CPU reserved; use what the replica asked for
        torch.set_num_threads(max(1, math.ceil(num_cpus)))


class QueryEncoder:
    """The embedder, encoding queries the way the index encoded pages: query prompt, truncated dim, normalised."""

    def __init__(self, binding: dict[str, Any], cfg: ServeConfig, device: str, num_cpus: float = 1.0):
        from ray_vdr.index import _local_model
        from ray_vdr.models.load import build_model

        _threads(num_cpus, device)
        bounds = binding["pixel_bounds"]
        model_cfg = ModelConfig(name_or_path=_local_model(binding["model"]), builder="load", dtype=cfg.dtype,
                                attn_implementation=cfg.attn_implementation, min_pixels=bounds.get("min_pixels"),
                                max_pixels=bounds.get("max_pixels"), query_prompt=binding["query_prompt"])
        self.model = build_model(model_cfg, device=device)
        self.dim = binding["dim"]

    def encode(self, items: list[str | Image.Image]) -> np.ndarray:
        """One row per item; texts and images are encoded in separate calls (one modality per forward)."""
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        for want_text in (True, False):
            idx = [i for i, x in enumerate(items) if isinstance(x, str) == want_text]
            if idx:
                out[idx] = self.model.encode_query([items[i] for i in idx], batch_size=len(idx),
                                                   truncate_dim=self.dim, normalize_embeddings=True,
                                                   convert_to_numpy=True, show_progress_bar=False)
        return out


class RerankScorer:
    """A Sentence Transformers CrossEncoder scoring (query text, page image) pairs."""

    def __init__(self, path: str, cfg: ServeConfig, device: str, num_cpus: float = 1.0):
        from sentence_transformers import CrossEncoder

        from ray_vdr.index import _local_model
        from ray_vdr.models.load import resolve_attn_implementation, resolve_dtype
        from ray_vdr.models.processor import install_image_only_processor

        _threads(num_cpus, device)
        install_image_only_processor()
        kwargs = {"dtype": resolve_dtype(cfg.dtype, device),
                  "attn_implementation": resolve_attn_implementation(cfg.attn_implementation, device)}
        self.model = CrossEncoder(_local_model(path), device=device, model_kwargs=kwargs)
        self.batch_size = cfg.rerank_batch_size

    def score(self, pairs: list[tuple[str, Image.Image]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        scores = self.model.predict(pairs, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(scores, dtype=np.float32).reshape(len(pairs))


# ---------------------------------------------------------------------------------------------------------------------
# pages


class PageStore:
    """Page images and thumbnails of an index, read from its Parquet shards by vector position, with an LRU cache."""

    def __init__(self, output: str, ids: pa.Table, cache_bytes: int = 256 << 20):
        self.output, self.ids = output, ids
        self._cache: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._cache_bytes, self._held = cache_bytes, 0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, output: str, cache_bytes: int = 256 << 20) -> PageStore:
        from ray_vdr.index import _read_ids

        return cls(output, _read_ids(output), cache_bytes)

    def get(self, positions: list[int], column: str = "image") -> list[bytes]:
        """The ``column`` (image or thumbnail) of each vector position; one read per shard for the misses."""
        from ray_vdr.index import PAGES, _read

        found: dict[int, bytes] = {}
        with self._lock:
            for p in positions:
                if (p, column) in self._cache:
                    self._cache.move_to_end((p, column))
                    found[p] = self._cache[(p, column)]
        by_shard: dict[str, list[int]] = {}
        for p in positions:
            if p not in found:
                by_shard.setdefault(self.ids.column("shard")[p].as_py(), []).append(p)
        for shard, wanted in by_shard.items():
            rows = [self.ids.column("row")[p].as_py() for p in wanted]
            values = _read(self.output, PAGES, shard, [column]).column(column).take(pa.array(rows)).to_pylist()
            for p, value in zip(wanted, values, strict=True):
                found[p] = value
                self._remember((p, column), value)
        return [found[p] for p in positions]

    def _remember(self, key: tuple[int, str], value: bytes) -> None:
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = value
            self._held += len(value)
            while self._held > self._cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._held -= len(old)

    def position(self, doc_id: str, page: int | None) -> int | None:
        """The vector position of a document's page (its first page when ``page`` is None)."""
        mask = pc.equal(self.ids.column("doc_id"), doc_id)
        if page is not None:
            mask = pc.and_(mask, pc.equal(self.ids.column("page"), page))
        hits = np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False)).tolist()
        if not hits:
            return None
        if page is None:
            pages = self.ids.column("page").take(pa.array(hits)).to_pylist()
            return hits[int(np.argmin(pages))]
        return hits[0]


def pil_pages(blobs: list[bytes]) -> list[Image.Image]:
    import io

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]


# ---------------------------------------------------------------------------------------------------------------------
# merging the stages


def merge_results(hits: list[dict[str, Any]], rerank_scores: np.ndarray | None, top_k: int) -> list[dict[str, Any]]:
    """Final ranking: the reranked head by rerank score (ties by first-stage rank), then the rest as retrieved.

    Each result keeps both stages' score and rank, so a client can see what the reranker changed.
    """
    depth = 0 if rerank_scores is None else len(rerank_scores)
    head = [{**h, "rerank_score": float(s)} for h, s in zip(hits[:depth], rerank_scores if depth else [], strict=True)]
    head.sort(key=lambda h: (-h["rerank_score"], h["rank"]))
    for i, h in enumerate(head, start=1):
        h["rerank_rank"] = i
    tail = [{**h, "rerank_score": None, "rerank_rank": None} for h in hits[depth:]]
    out = []
    for final, h in enumerate(head + tail, start=1):
        if final > top_k:
            break
        out.append({"rank": final, "doc_id": h["doc_id"], "page": h["page"], "source": h["source"], "key": h["key"],
                    "position": h["position"], "score": h["score"], "first_stage_rank": h["rank"],
                    "rerank_score": h["rerank_score"], "rerank_rank": h["rerank_rank"]})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# loading in the background, so health can say "not yet" instead of the replica hanging in its constructor


class Background:
    """Runs ``load`` in a thread. ``get()`` returns its value once loaded, else raises NotReady saying why."""

    def __init__(self, what: str, load: Callable[[Callable[[str], None]], Any]):
        self.what, self.state, self.detail, self.value = what, "loading", f"loading {what}", None
        self.started = time.time()
        self._thread = threading.Thread(target=self._run, args=(load,), name=f"load-{what}", daemon=True)
        self._thread.start()

    def _say(self, detail: str) -> None:
        self.detail = detail

    def _run(self, load) -> None:
        try:
            self.value = load(self._say)
            self.state, self.detail = "ready", f"{self.what} loaded in {time.time() - self.started:.1f}s"
            logger.info(self.detail)
        except Exception as e:
            self.state, self.detail = "failed", f"{type(e).__name__}: {e}"
            logger.error("loading %s failed: %s", self.what, self.detail)

    def get(self) -> Any:
        if self.state != "ready":
            raise NotReady(f"{self.what}: {self.detail}")
        return self.value

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail}


def wait_for_manifest(index: str, poll_s: float, say: Callable[[str], None]) -> dict[str, Any]:
    """The index manifest; while the embedding job has not published it yet, wait (health stays unready)."""
    waited = 0.0
    while (manifest := read_manifest(index)) is None:
        say(f"waiting for the index at {index} ({MANIFEST} not there yet, {waited:.0f}s)")
        if waited % 60 < poll_s:
            logger.warning("no index at %s yet; waiting for jobs/embed_corpus.py to publish it", index)
        time.sleep(poll_s)
        waited += poll_s
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# generations: which index (and the model it was built with) the endpoint serves, switched by `ray-vdr promote`


def generation(index: str, model: str | None = None, dim: int | None = None) -> dict[str, Any]:
    """A servable generation: an index folder (its id is derived from the URI), optionally its model and dimension."""
    import hashlib

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
    """``cfg`` bound to one generation's index, model and dimension (for check_binding and the loaders)."""
    return cfg.model_copy(update={"index": gen["index"], "model": gen.get("model"), "dim": gen.get("dim")})


class Generations:
    """What one replica has loaded, per generation: ``load(gen, say)`` runs in the background for each generation
    the live manifest names, and a generation it no longer names is dropped. With ``cfg.live`` set, the manifest is
    read again every ``cfg.index_poll_s`` in a thread; without, the one generation of ``cfg.index`` is fixed.

    ``get(gid)`` raises NotReady for a generation not (yet, or any more) loaded here: the ingress then falls back to
    the next generation, so a switch never fails a request while replicas load the new one.
    """

    def __init__(self, what: str, cfg: ServeConfig, load: Callable[[dict[str, Any], Callable[[str], None]], Any]):
        self.what, self.cfg, self._load = what, cfg, load
        self.loaded: dict[str, Background] = {}
        self.order: list[str] = []
        self.refresh()
        if cfg.live:
            threading.Thread(target=self._follow, name=f"follow-{what}", daemon=True).start()

    def refresh(self) -> None:
        gens = serving_generations(self.cfg)
        for g in gens:
            if g["id"] not in self.loaded:
                logger.info("%s: loading generation %s (%s)", self.what, g["id"], g["index"])
                self.loaded[g["id"]] = Background(f"{self.what} {g['id']}", lambda say, g=g: self._load(g, say))
        self.order = [g["id"] for g in gens]
        for gid in [k for k in self.loaded if k not in self.order]:
            logger.info("%s: dropping generation %s", self.what, gid)
            del self.loaded[gid]  # requests already holding its objects finish with them

    def _follow(self) -> None:
        while True:
            time.sleep(self.cfg.index_poll_s)
            try:
                self.refresh()
            except Exception as e:  # a manifest mid-upload or storage hiccup: keep serving what is loaded
                logger.warning("%s: reading the live manifest %s failed: %s", self.what, self.cfg.live, e)

    def get(self, gid: str) -> Any:
        bg = self.loaded.get(gid)
        if bg is None:
            raise NotReady(f"{self.what}: generation {gid} is not served here (serving {self.order})")
        return bg.get()

    def status(self) -> dict[str, Any]:
        """The preferred generation's state (ready, loading or failed), and every generation's."""
        first = self.loaded[self.order[0]].status()
        return {**first, "generation": self.order[0],
                "generations": {gid: self.loaded[gid].state for gid in self.order}}
