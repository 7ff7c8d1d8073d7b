"""The endpoint's model and index deployments (Ray Serve), each wrapping plain classes of :mod:`serving.core` and
:mod:`ray_vdr.corpus.store` per generation (:mod:`serving.generations`); the ingress and the builder are in
:mod:`serving.app`.

- ``QueryEmbedder``: the embedder with its query prompt at the index's truncated dimension; batched over queries.
- ``Retriever``: the FAISS index (batched over queries) and the page store (thumbnails and page images).
- ``Reranker`` (optional): a CrossEncoder scoring (query, page image) pairs; batched over requests.

Batches form while the model runs (:class:`serving.batching.Batcher`: no wait for a lone request). The batched
methods return NotReady per request instead of raising it: a batch function's exception fails the whole batch,
and one generation still loading during a promotion must not fail the batch's other requests (the ingress raises it
and falls back to the previous generation).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ray import serve

from ray_vdr.cluster import worker_device
from ray_vdr.config import ServeConfig, ServeDeploymentConfig
from ray_vdr.corpus.live import generation_config
from ray_vdr.corpus.store import PageStore, open_index
from ray_vdr.data.images import pil_pages
from ray_vdr.protocol import IndexStatus, PageInfo, StageStatus
from serving import core
from serving.batching import Batcher
from serving.generations import Background, Generations, wait_for_manifest
from serving.metrics import EndpointMetrics, quiet_health_probes

__all__ = ["QueryEmbedder", "Reranker", "Retriever"]

logger = logging.getLogger(__name__)


def _batcher(fn, d: ServeDeploymentConfig) -> Batcher:
    """A batched stage with the configured batch size and extra wait."""
    return Batcher(fn, d.max_batch_size, d.batch_wait_timeout_s)


@serve.deployment
class QueryEmbedder:
    def __init__(self, cfg: dict[str, Any], num_cpus: float, num_gpus: float):
        self.cfg = ServeConfig.model_validate(cfg)
        device = worker_device(bool(num_gpus), num_cpus)

        def load(gen, say):
            manifest = wait_for_manifest(gen["index"], self.cfg.index_poll_s, say)
            say("checking the model against the index manifest")
            binding = core.check_binding(generation_config(self.cfg, gen), manifest)
            say(f"loading {binding['path']} on {device}")
            return core.QueryEncoder(binding, self.cfg, device)

        self.gens = Generations("query embedder", self.cfg, load, per_version=False)
        self._embed = _batcher(self._embed_batch, self.cfg.embedder)
        self.metrics = EndpointMetrics(self.cfg.metrics)
        quiet_health_probes()

    def status(self) -> StageStatus:
        return StageStatus(**self.gens.status())

    async def embed(self, gid: str, item: Any) -> tuple[Any, float, int] | core.NotReady:
        """The query's vector from generation ``gid``'s model; also the model time and batch size (for timings).
        NotReady is returned, not raised (see ``_raise_or_return``)."""
        return await self._embed((gid, item))

    async def vectors(self, gid: str, items: list, dim: int | None, document: bool
                      ) -> tuple[Any, int] | core.NotReady:
        """``POST /v1/embeddings``: the items' vectors at ``dim`` with the query or document prompt, and their text
        tokens (not batched with searches: one request is already a batch)."""
        try:
            encoder: core.QueryEncoder = self.gens.get(gid)
        except core.NotReady as e:
            return e
        texts = [x for x in items if isinstance(x, str)]
        vectors = await asyncio.to_thread(encoder.encode, items, dim, document)
        return vectors, encoder.count_tokens(texts)

    async def dims(self, gid: str) -> tuple[int, int] | core.NotReady:
        """(the model's full dimension, the index's) of generation ``gid``."""
        try:
            encoder: core.QueryEncoder = self.gens.get(gid)
        except core.NotReady as e:
            return e
        return encoder.full_dim, encoder.dim

    async def _embed_batch(self, requests: list[tuple[str, Any]]) -> list[Any]:
        """One forward per generation in the batch (one, except while a promotion switches)."""
        start, out = time.perf_counter(), [None] * len(requests)
        self.metrics.batch("embed", len(requests))
        for gid in dict.fromkeys(g for g, _ in requests):
            idx = [i for i, (g, _) in enumerate(requests) if g == gid]
            try:
                encoder: core.QueryEncoder = self.gens.get(gid)
            except core.NotReady as e:
                for i in idx:
                    out[i] = e
                continue
            # in a thread: the loop keeps gathering the next batch
            vectors = await asyncio.to_thread(encoder.encode, [requests[i][1] for i in idx])
            for i, v in zip(idx, vectors, strict=True):
                out[i] = v
        seconds = time.perf_counter() - start
        return [v if isinstance(v, Exception) else (v, seconds, len(requests)) for v in out]


@serve.deployment
class Retriever:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = ServeConfig.model_validate(cfg)

        def load(gen, say):  # the index alone: the model is the QueryEmbedder's to check and load
            wait_for_manifest(gen["index"], self.cfg.index_poll_s, say)
            say(f"loading the FAISS index (version {gen.get('version')})")
            index = open_index(gen["index"], dim=generation_config(self.cfg, gen).dim, version=gen.get("version"))
            return index, PageStore.of(index)

        self.gens = Generations("index", self.cfg, load)
        self._search = _batcher(self._search_batch, self.cfg.retriever)
        self.metrics = EndpointMetrics(self.cfg.metrics)
        quiet_health_probes()
        if self.metrics.enabled:
            threading.Thread(target=self._report_generation, name="generation-metrics", daemon=True).start()

    def _report_generation(self) -> None:
        """The live generation's gauges (which one, its vectors, its age), every second: Ray's metrics agent drops a
        gauge that was not recorded again within two report intervals (1 s at least)."""
        while True:
            try:
                status = self.status()
                if status.index is not None:
                    ix = status.index
                    self.metrics.generation(status.generation, ix.vectors, ix.live_pages, ix.updated_at)
            except Exception as e:  # a generation dropped meanwhile: the next round reports the new one
                logger.debug("generation metrics: %s", e)
            time.sleep(1.0)

    def status(self) -> StageStatus:
        status = StageStatus(**self.gens.status())
        if status.state == "ready":
            m = self.gens.get(status.generation)[0].manifest
            status.index = IndexStatus(vectors=m["vectors"], dim=m["dim"], type=m["index"]["type"],
                                       model=m["model"]["path"], updated_at=m.get("updated_at"),
                                       version=m.get("version"), live_pages=m.get("live_pages", m["vectors"]))
        return status

    async def search(self, gid: str, vector: Any, k: int, clauses: list | None = None, scope: list | None = None
                     ) -> tuple[list[dict], float] | core.NotReady | core.RequestError:
        """The top-k live hits of a query vector in generation ``gid``'s index, matching the filter ``clauses`` and
        the caller's key ``scope``; also the search time. A filter this index cannot apply comes back as a
        RequestError (422 naming the field)."""
        return await self._search((gid, vector, k, clauses, scope))  # or NotReady, returned (see _raise_or_return)

    async def _search_batch(self, requests: list[tuple[str, Any, int, list | None, list | None]]) -> list[Any]:
        """One FAISS call per generation, filter and key scope in the batch, at its largest k."""
        import json

        import numpy as np

        from ray_vdr.corpus.metadata import FilterError

        start, out = time.perf_counter(), [None] * len(requests)
        self.metrics.batch("search", len(requests))
        groups: dict[tuple[str, str], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r[0], json.dumps([r[3], r[4]], sort_keys=True)), []).append(i)
        for (gid, _), idx in groups.items():
            try:
                index, _ = self.gens.get(gid)
            except core.NotReady as e:
                for i in idx:
                    out[i] = e
                continue
            k, clauses, scope = max(requests[i][2] for i in idx), requests[idx[0]][3], requests[idx[0]][4]
            try:
                hits = await asyncio.to_thread(index.search, np.stack([requests[i][1] for i in idx]), k, clauses,
                                               scope)
            except FilterError as e:
                for i in idx:
                    out[i] = core.RequestError(422, str(e))
                continue
            for i, h in zip(idx, hits, strict=True):
                out[i] = h[:requests[i][2]]
        seconds = time.perf_counter() - start
        return [h if isinstance(h, Exception) else (h, seconds) for h in out]

    async def lookup(self, gid: str, doc_id: str, page: int | None, scope: list | None = None) -> int | None:
        """The position of a live page the caller's key ``scope`` may see; None otherwise (a 404 either way)."""
        index, store = self.gens.get(gid)
        position = store.position(doc_id, page)
        return position if position is not None and index.visible(position, scope) else None

    async def info(self, gid: str, position: int) -> PageInfo:
        """A page's doc_id, page, source and metadata."""
        import json

        ids = self.gens.get(gid)[0].ids
        row = {c: ids.column(c)[position].as_py() for c in ("doc_id", "page", "source", "metadata")
               if c in ids.column_names}
        return PageInfo(**{**row, "metadata": json.loads(row["metadata"]) if row.get("metadata") else {}})

    async def page(self, gid: str, position: int, column: str) -> bytes:
        return (await asyncio.to_thread(self.gens.get(gid)[1].get, [position], column))[0]


@serve.deployment
class Reranker:
    def __init__(self, cfg: dict[str, Any], num_cpus: float, num_gpus: float):
        self.cfg = ServeConfig.model_validate(cfg)
        device = worker_device(bool(num_gpus), num_cpus)
        self.scorer = Background("reranker", lambda say: core.RerankScorer(self.cfg.reranker, self.cfg, device))

        def load(gen, say):  # the generation's page store: page positions differ from index to index
            wait_for_manifest(gen["index"], self.cfg.index_poll_s, say)
            return PageStore.open(gen["index"], version=gen.get("version"))

        self.gens = Generations("reranker pages", self.cfg, load)
        self._rerank = _batcher(self._rerank_batch, self.cfg.rerank)
        self.metrics = EndpointMetrics(self.cfg.metrics)
        quiet_health_probes()

    def status(self) -> StageStatus:
        pages = self.gens.status()
        return StageStatus(**(pages if self.scorer.state == "ready" else {**pages, **self.scorer.status()}))

    async def rerank(self, gid: str, query: str, positions: list[int]) -> tuple[Any, float, int] | core.NotReady:
        """Scores of (query, page) for pages of generation ``gid``'s index; also the model time and batch size."""
        return await self._rerank((gid, query, positions))  # or NotReady, returned (see _raise_or_return)

    async def score_documents(self, gid: str, query: str, docs: list) -> Any:
        """``POST /v2/rerank``: the scores of (query, document) for texts, images and indexed page positions (ints);
        not batched with searches (one request is already a batch)."""
        scorer = self.scorer.get()
        store = self.gens.get(gid) if any(isinstance(d, int) for d in docs) else None

        def run():
            positions = [d for d in docs if isinstance(d, int)]
            pages = dict(zip(positions, pil_pages(store.get(positions, "image")), strict=True)) if positions else {}
            return scorer.score([(query, pages[d] if isinstance(d, int) else d) for d in docs])

        return await asyncio.to_thread(run)

    async def _rerank_batch(self, requests: list[tuple[str, str, list[int]]]) -> list[Any]:
        """The pairs of every request in the batch go through the model together, in forwards of
        ``rerank_batch_size`` pairs."""
        scorer = self.scorer.get()
        start = time.perf_counter()
        self.metrics.batch("rerank", len(requests))
        ok, out = [], [None] * len(requests)
        for i, (gid, _, _) in enumerate(requests):
            try:
                ok.append((i, self.gens.get(gid)))
            except core.NotReady as e:
                out[i] = e

        def run():
            blobs = [b for i, store in ok for b in store.get(requests[i][2], "image")]
            queries = [requests[i][1] for i, _ in ok for _ in requests[i][2]]
            return scorer.score(list(zip(queries, pil_pages(blobs), strict=True)))

        scores = await asyncio.to_thread(run)
        seconds = time.perf_counter() - start
        at = 0
        for i, _ in ok:
            n = len(requests[i][2])
            out[i] = (scores[at:at + n], seconds, len(ok))
            at += n
        return out
