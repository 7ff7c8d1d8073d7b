"""The endpoint's model and index deployments (Ray Serve), each wrapping plain classes of :mod:`serving.core` and
:mod:`ray_vdr.corpus.store` per generation (:mod:`serving.generations`); the ingress and the builder are in
:mod:`serving.app`.

- ``QueryEmbedder``: the embedder with its query prompt at the index's truncated dimension; batched over queries.
- ``Retriever``: the FAISS index (batched over queries) and the page store (thumbnails and page images).
- ``Reranker`` (optional): a CrossEncoder scoring (query, page image) pairs; batched over requests.

What the three share is :class:`Stage`: the config, the device, the generations it loads, its batcher, metrics and
health. Batches form while the model runs (:class:`serving.batching.Batcher`: no wait for a lone request); a batch
holds small typed records (:class:`EmbedCall`, :class:`SearchCall`, :class:`RerankCall`) and each request gets a
:class:`Batched` answer. A stage raises NotReady for a generation it has not loaded (yet: a promotion is switching)
and RequestError for a request it refuses; in a batch, to that request only (the Batcher delivers a per-request
exception: one generation's NotReady does not fail the batch's other requests). The ingress then falls back to the
previous generation, or answers 503 (serving/errors.py). Neither is a fault of the replica: Ray Serve's
"Request failed." traceback of them stays out of its log (:func:`quiet_expected_errors`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, NamedTuple

from ray import serve

from ray_vdr.cluster import worker_device
from ray_vdr.config import ServeConfig, ServeDeploymentConfig
from ray_vdr.corpus.live import Generation, generation_config
from ray_vdr.corpus.store import PageStore, open_index
from ray_vdr.data.images import pil_pages
from ray_vdr.protocol import IndexStatus, PageInfo, StageStatus
from serving import core
from serving.batching import Batcher
from serving.generations import Background, Generations, wait_for_manifest
from serving.metrics import EndpointMetrics, quiet_health_probes

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from ray_vdr.models.encoder import IndexEncoder

__all__ = ["Batched", "EmbedCall", "QueryEmbedder", "RerankCall", "Reranker", "Retriever", "SearchCall", "Stage",
           "quiet_expected_errors"]

logger = logging.getLogger(__name__)


def _not_an_expected_error(record: logging.LogRecord) -> bool:
    """False for Ray Serve's "Request failed." record of a NotReady or RequestError a stage raised (its access-log
    line, CALL ... ERROR, stays)."""
    error = record.exc_info[1] if record.exc_info else None
    return not isinstance(error, (core.NotReady, core.RequestError))


def quiet_expected_errors() -> None:
    """Keep the tracebacks of a generation still loading (the ingress's to handle) and of a refused request (the
    caller's) out of this replica's log: Ray Serve logs every exception a handle call raises."""
    serve_logger = logging.getLogger("ray.serve")
    if _not_an_expected_error not in serve_logger.filters:
        serve_logger.addFilter(_not_an_expected_error)


class Batched(NamedTuple):
    """A batched stage's answer to one request, with the batch's model time and size (the search's timings)."""

    value: Any
    seconds: float
    batch: int


class EmbedCall(NamedTuple):
    """A query to encode with generation ``gid``'s model."""

    gid: str
    item: str | Image.Image


class SearchCall(NamedTuple):
    """A query vector's top ``k`` live pages in generation ``gid``'s index, matching the filter ``clauses`` and the
    caller's key ``scope``."""

    gid: str
    vector: np.ndarray
    k: int
    clauses: list | None
    scope: list | None


class RerankCall(NamedTuple):
    """The scores of (``query``, page) for pages at ``positions`` of generation ``gid``'s index."""

    gid: str
    query: str
    positions: list[int]


class Stage:
    """The part every stage deployment shares: its config, its device (``model`` stages), what it loads per
    generation (:meth:`load`, in the background), its batcher over :meth:`run_batch`, its metrics and health.

    A subclass says what it is (``what``: its health name; ``stage``: its batch metric; ``section``: the ServeConfig
    section with its batching) and defines :meth:`load` and :meth:`run_batch`.
    """

    what = "stage"
    stage = "stage"
    section = "embedder"
    model = False  # runs a torch model: gets a device (and as many torch threads as CPUs)
    per_version = True  # one load per index version (False: per index and model, shared by its versions)

    def __init__(self, cfg: dict[str, Any], num_cpus: float = 1.0, num_gpus: float = 0.0):
        self.cfg = ServeConfig.model_validate(cfg)
        self.device = worker_device(bool(num_gpus), num_cpus) if self.model else "cpu"
        self.metrics = EndpointMetrics(self.cfg.metrics)
        quiet_health_probes()
        quiet_expected_errors()
        batching: ServeDeploymentConfig = getattr(self.cfg, self.section)
        self.batcher = Batcher(self._batch, batching.max_batch_size, batching.batch_wait_timeout_s)
        self.gens = Generations(self.what, self.cfg, self.load, per_version=self.per_version)

    def load(self, gen: Generation, say: Callable[[str], None]) -> Any:
        """What this stage serves of generation ``gen`` (runs in a thread; ``say`` reports progress to health)."""
        raise NotImplementedError

    async def run_batch(self, loaded: Any, requests: list) -> list:
        """One answer per request, in order, for requests of one generation (and :meth:`group`), with what
        :meth:`load` made of it."""
        raise NotImplementedError

    def group(self, request: Any) -> Hashable:
        """Requests of one generation that :meth:`run_batch` can answer together (default: all of them)."""
        return None

    def status(self) -> StageStatus:
        return StageStatus(**self.gens.status())

    async def _batch(self, requests: list) -> list[Batched | Exception]:
        """One :meth:`run_batch` per generation (and group) in the batch: one, except while a promotion switches. A
        generation not loaded here (NotReady) or a request refused (RequestError) is raised to its own requests only
        (the Batcher raises an answer that is an exception to its caller)."""
        start = time.perf_counter()
        self.metrics.batch(self.stage, len(requests))
        out: list[Any] = [None] * len(requests)
        groups: dict[tuple[str, Hashable], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.gid, self.group(r)), []).append(i)
        for (gid, _), idx in groups.items():
            try:
                answers = await self.run_batch(self.gens.get(gid), [requests[i] for i in idx])
            except (core.NotReady, core.RequestError) as e:
                answers = [e] * len(idx)
            for i, answer in zip(idx, answers, strict=True):
                out[i] = answer
        seconds = time.perf_counter() - start
        return [a if isinstance(a, Exception) else Batched(a, seconds, len(requests)) for a in out]


@serve.deployment
class QueryEmbedder(Stage):
    what = "query embedder"
    stage = "embed"
    section = "embedder"
    model = True
    per_version = False  # one model for every version of an index

    def load(self, gen: Generation, say: Callable[[str], None]) -> IndexEncoder:
        """The generation's encoder, checked against its index's binding (model files, dimension, prompts)."""
        manifest = wait_for_manifest(gen.index, self.cfg.index_poll_s, say)
        say(f"loading {gen.model or manifest.model.path} on {self.device}, checked against the index manifest")
        return core.query_encoder(generation_config(self.cfg, gen), manifest, self.device)

    async def embed(self, gid: str, item: str | Image.Image) -> Batched:
        """The query's vector from generation ``gid``'s model (batched with other queries); NotReady while that
        generation is not loaded here."""
        return await self.batcher(EmbedCall(gid, item))

    async def run_batch(self, encoder: IndexEncoder, requests: list[EmbedCall]) -> list[np.ndarray]:
        # in a thread: the loop keeps gathering the next batch
        return list(await asyncio.to_thread(encoder.encode_queries, [r.item for r in requests]))

    async def vectors(self, gid: str, items: list, dim: int | None, document: bool
                      ) -> tuple[np.ndarray | list[np.ndarray], int]:
        """``POST /v1/embeddings``: the items' vectors at ``dim`` with the query or document prompt, and their text
        tokens (not batched with searches: one request is already a batch)."""
        encoder: IndexEncoder = self.gens.get(gid)
        texts = [x for x in items if isinstance(x, str)]
        vectors = await asyncio.to_thread(encoder.encode_pages if document else encoder.encode_queries, items, dim)
        return vectors, encoder.count_tokens(texts)

    async def dims(self, gid: str) -> tuple[int, int, bool]:
        """(the model's full dimension, the index's, whether it gives token vectors) of generation ``gid``."""
        encoder: IndexEncoder = self.gens.get(gid)
        return encoder.full_dim, encoder.dim, encoder.multi_vector


@serve.deployment
class Retriever(Stage):
    """The FAISS index of each generation, or on a sharded endpoint one shard of it (``shard`` of ``shards``: its
    hits and page positions are the version's, so the ingress merges the shards' answers by score)."""

    what = "index"
    stage = "search"
    section = "retriever"

    def __init__(self, cfg: dict[str, Any], shard: int | None = None, shards: int = 1):
        self.shard, self.shards, self._first_version = shard, shards, None
        if shard is not None:
            self.what = f"index shard {shard}"
        super().__init__(cfg)
        if self.metrics.enabled:
            threading.Thread(target=self._report_generation, name="generation-metrics", daemon=True).start()

    def load(self, gen: Generation, say: Callable[[str], None]) -> tuple[Any, PageStore]:
        """The index alone (the model is the QueryEmbedder's to check and load), and its page store; on a sharded
        endpoint this replica's shard of it."""
        wait_for_manifest(gen.index, self.cfg.index_poll_s, say)
        where = f" shard {self.shard} of {self.shards}" if self.shard is not None else ""
        say(f"loading the FAISS index{where} (version {gen.version})")
        self._first_version = self._first_version or gen.version
        if gen.version and self._first_version and gen.version > self._first_version:
            _chaos_slow_shard(self.shard)
        index = open_index(gen.index, dim=gen.dim, version=gen.version, shard=self.shard)
        if self.shard is not None and index.manifest.shard_count > self.shards:
            raise ValueError(f"the index at {gen.index} has {index.manifest.shard_count} shards but this endpoint "
                             f"serves {self.shards}: redeploy it (serve.retriever.shards)")
        return index, PageStore.of(index)

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
        import ray

        status = super().status()
        status.shard, status.node = self.shard, ray.get_runtime_context().get_node_id()
        if status.state == "ready":
            m = self.gens.get(status.generation)[0].manifest
            status.index = IndexStatus(vectors=m.vectors, dim=m.dim, type=m.index.type, model=m.model.path,
                                       updated_at=m.updated_at, version=m.version, live_pages=m.live)
        return status

    async def search(self, gid: str, vector: np.ndarray, k: int, clauses: list | None = None,
                     scope: list | None = None) -> Batched:
        """The top-k live hits of a query vector in generation ``gid``'s index, matching the filter ``clauses`` and
        the caller's key ``scope`` (batched with other queries). A filter this index cannot apply raises a
        RequestError (422 naming the field)."""
        return await self.batcher(SearchCall(gid, vector, k, clauses, scope))

    def group(self, request: SearchCall) -> str:
        """One FAISS call per filter and key scope."""
        return json.dumps([request.clauses, request.scope], sort_keys=True)

    async def run_batch(self, loaded: tuple[Any, PageStore], requests: list[SearchCall]) -> list[list[dict]]:
        """The group's queries in one FAISS call, at its largest k (a multi-vector index: one FDE search, then each
        query's candidates rescored by MaxSim)."""
        from ray_vdr.corpus.metadata import FilterError

        index, _ = loaded
        first = requests[0]
        try:
            hits = await asyncio.to_thread(index.search, [r.vector for r in requests],
                                           max(r.k for r in requests), first.clauses, first.scope)
        except FilterError as e:
            raise core.RequestError(422, str(e)) from None
        return [h[:r.k] for r, h in zip(requests, hits, strict=True)]

    async def lookup(self, gid: str, doc_id: str, page: int | None, scope: list | None = None) -> int | None:
        """The position of a live page the caller's key ``scope`` may see; None otherwise (a 404 either way)."""
        index, store = self.gens.get(gid)
        position = store.position(doc_id, page)
        return position if position is not None and index.visible(position, scope) else None

    async def info(self, gid: str, position: int) -> PageInfo:
        """A page's doc_id, page, source and metadata."""
        index = self.gens.get(gid)[0]
        ids, row = index.ids, position - index.offset
        row = {c: ids.column(c)[row].as_py() for c in ("doc_id", "page", "source", "metadata")
               if c in ids.column_names}
        return PageInfo(**{**row, "metadata": json.loads(row["metadata"]) if row.get("metadata") else {}})

    async def page(self, gid: str, position: int, column: str) -> bytes:
        return (await asyncio.to_thread(self.gens.get(gid)[1].get, [position], column))[0]


CHAOS_SHARD_ENV = "RAY_VDR_CHAOS_SLOW_SHARD"  # tests: "<shard>:<seconds>": that shard loads each newer version late


def _chaos_slow_shard(shard: int | None) -> None:
    spec = os.environ.get(CHAOS_SHARD_ENV)
    if spec and shard is not None and int(spec.split(":")[0]) == shard:
        logger.warning("chaos: index shard %d loads its next version %s s late", shard, spec.split(":")[1])
        time.sleep(float(spec.split(":")[1]))


@serve.deployment
class Reranker(Stage):
    what = "reranker pages"
    stage = "rerank"
    section = "rerank"
    model = True

    def __init__(self, cfg: dict[str, Any], num_cpus: float, num_gpus: float):
        super().__init__(cfg, num_cpus, num_gpus)
        self.scorer = Background("reranker", lambda say: core.RerankScorer(self.cfg.reranker, self.cfg, self.device))

    def load(self, gen: Generation, say: Callable[[str], None]) -> PageStore:
        """The generation's page store (page positions differ from index to index); the model is one for all."""
        wait_for_manifest(gen.index, self.cfg.index_poll_s, say)
        return PageStore.open(gen.index, version=gen.version)

    def status(self) -> StageStatus:
        pages = super().status()
        return pages if self.scorer.state == "ready" else pages.model_copy(update=self.scorer.status())

    async def rerank(self, gid: str, query: str, positions: list[int]) -> Batched:
        """Scores of (query, page) for pages of generation ``gid``'s index (batched with other requests)."""
        return await self.batcher(RerankCall(gid, query, positions))

    async def run_batch(self, store: PageStore, requests: list[RerankCall]) -> list[np.ndarray]:
        """The pairs of every request go through the model together, in forwards of ``rerank_batch_size`` pairs."""
        scorer = self.scorer.get()

        def run():
            blobs = [b for r in requests for b in store.get(r.positions, "image")]
            queries = [r.query for r in requests for _ in r.positions]
            return scorer.score(list(zip(queries, pil_pages(blobs), strict=True)))

        scores = await asyncio.to_thread(run)
        bounds = list(itertools.accumulate((len(r.positions) for r in requests), initial=0))
        return [scores[a:b] for a, b in itertools.pairwise(bounds)]

    async def score_documents(self, gid: str, query: str, docs: list) -> np.ndarray:
        """``POST /v2/rerank``: the scores of (query, document) for texts, images and indexed page positions (ints);
        not batched with searches (one request is already a batch)."""
        scorer = self.scorer.get()
        store = self.gens.get(gid) if any(isinstance(d, int) for d in docs) else None

        def run():
            positions = [d for d in docs if isinstance(d, int)]
            pages = dict(zip(positions, pil_pages(store.get(positions, "image")), strict=True)) if positions else {}
            return scorer.score([(query, pages[d] if isinstance(d, int) else d) for d in docs])

        return await asyncio.to_thread(run)
