"""The two-stage retrieval endpoint on Ray Serve: the ingress (HTTP routes) and the application builder.

    serve run serving/config.yaml                          # from the repo root, on a running or a new local Ray
    serve run serving.app:build_app index=./index reranker=./my-reranker
    ray-vdr serve -c configs/demo.yaml                     # the same app, from a ray-vdr config's serve section

``Ingress`` (FastAPI): ``POST /search``, ``GET /healthz``, ``GET /pages/{doc_id}``, the search page at ``/``, OpenAPI
at ``/docs``; it calls the deployments of :mod:`serving.deployments` (query embedder → FAISS retriever → reranker).
Every body is a model of :mod:`ray_vdr.protocol` (the one wire format, which the client parses too); routes and
stages raise, and :mod:`serving.errors` answers each error in its API's shape.
Models and the index load in the background, so ``GET /healthz`` answers 503 "loading" rather than a replica
hanging in its constructor.

Generations: what the endpoint serves is an index (and the model it was built with), a *generation*. With
``serve.live`` set, every replica follows the live manifest that ``ray-vdr promote`` writes (ray_vdr/promote.py),
keeps its live and previous generations loaded and drops older ones; the ingress runs every stage of a request in
one generation, the live one, or the previous one while a stage is still loading the live one. So a promotion
switches the endpoint without restarting a replica and without a failed request.

Batching and limits are consistent by construction (checked by :class:`ray_vdr.config.ServeConfig`): a batched
replica's ``max_ongoing_requests`` is at least its batch size (it caps the batch, Ray #43288), and the ingress can hold
enough requests in flight to fill every downstream batch. Over capacity every caller gets 503 with Retry-After.
"""

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_vdr.config import ServeConfig, ServeDeploymentConfig
from ray_vdr.corpus.live import generation_config, serving_generations
from ray_vdr.corpus.store import read_manifest
from ray_vdr.protocol import (
    DeleteRequest,
    DeleteResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    HealthResponse,
    PageInfo,
    RerankRequest,
    RerankResponse,
    SearchRequest,
    SearchResponse,
    StageStatus,
    Timings,
)
from serving import core, errors, fanout, openai_api, rerank_api
from serving.auth import KeyRing
from serving.deployments import Batched, QueryEmbedder, Reranker, Retriever
from serving.generations import Generations
from serving.metrics import EndpointMetrics, quiet_health_probes, route_label

logger = logging.getLogger("ray_vdr.serving")

SEARCH_PAGE = (Path(__file__).parent / "static" / "search.html").read_text()
STAGE_TIMEOUT_S = 2.0  # health probes of the stages

api = FastAPI(
    title="ray-vdr visual document retrieval",
    description="Two-stage retrieval over document page images: embedder + FAISS, then a multimodal reranker.",
    version="0.1.0",
)
errors.install(api)  # every error in its route's API shape, each kind mapped to its status in one handler


@api.middleware("http")
async def _limit_and_count(request: Request, call_next):
    """413 for bodies over limits.max_body_bytes, by their Content-Length before reading them; every answer counted
    by route and status (serving/metrics.py)."""
    limit = getattr(request.app.state, "max_body_bytes", None)
    length = request.headers.get("content-length")
    if limit is not None and length is not None and length.isdigit() and int(length) > limit:
        response = errors.error_response(request, 413,
                                         f"request body of {length} bytes exceeds the limit of {limit} bytes")
    else:
        response = await call_next(request)
    metrics: EndpointMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.request(route_label(request.scope), response.status_code)
    return response


# ---------------------------------------------------------------------------------------------------------------------
# the ingress


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, embedder: DeploymentHandle, retrievers: list[DeploymentHandle],
                 reranker: DeploymentHandle | None, cfg: dict[str, Any]):
        self.cfg = ServeConfig.model_validate(cfg)
        self.embedder, self.retrievers, self.reranker = embedder, retrievers, reranker
        api.state.max_body_bytes = self.cfg.limits.max_body_bytes
        api.state.retry_after_s = self.cfg.limits.retry_after_s
        self.metrics = api.state.metrics = EndpointMetrics(self.cfg.metrics)
        quiet_health_probes()
        self.keys = KeyRing.load(self.cfg.auth.keys_file, self.cfg.auth.keys_env)  # hashes only
        # which generations to ask for, preferred first (nothing to load here: the stages load them)
        self.gens = Generations("ingress", self.cfg, lambda gen, say: gen)

    async def _in_generation(self, call):
        """``await call(gid)`` in the preferred generation; if a stage has not loaded it (yet: a promotion is
        switching), in the next one. Every stage of one request uses the same generation. A stage's error comes out
        as the stage raised it (not Ray's wrapper), for its exception handler."""
        order = list(self.gens.order)
        for n, gid in enumerate(order):
            try:
                return await call(gid)
            except Exception as e:
                cause = fanout.error_cause(e)
                if isinstance(cause, core.NotReady) and not isinstance(cause, core.ShardUnavailable) \
                        and n + 1 < len(order):
                    continue
                if cause is not e and isinstance(cause, (core.NotReady, core.RequestError)):
                    raise cause from None
                raise

    async def _answer(self, call, what: str) -> Any:
        """``call(gid)``'s answer in the preferred generation (:meth:`_in_generation`); 504 past the timeout."""
        try:
            return await asyncio.wait_for(self._in_generation(call), self.cfg.limits.request_timeout_s)
        except TimeoutError:
            raise core.RequestError(504, f"{what} took longer than {self.cfg.limits.request_timeout_s}s") from None

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(SEARCH_PAGE)

    @api.get("/healthz", summary="Ready when the embedder, the index (and the reranker) are loaded",
             responses={503: {"model": HealthResponse, "description": "Not ready yet (with Retry-After)"}})
    async def healthz(self, response: Response) -> HealthResponse:
        stages = {"embedder": self.embedder, **self._retriever_stages()}
        if self.reranker is not None:
            stages["reranker"] = self.reranker
        report: dict[str, StageStatus] = {}
        for name, handle in stages.items():
            try:
                report[name] = await asyncio.wait_for(handle.status.remote(), STAGE_TIMEOUT_S)
            except Exception as e:  # a replica still starting, or gone
                report[name] = StageStatus(state="unavailable", detail=f"{type(e).__name__}: {e}"[:300])
        ready = all(s.state == "ready" for s in report.values())
        if not ready:
            response.status_code = 503
            response.headers["Retry-After"] = str(self.cfg.limits.retry_after_s)
        detail = None if ready else "; ".join(f"{n}: {s.detail}" for n, s in report.items() if s.state != "ready")
        return HealthResponse(ready=ready, generation=self.gens.order[0], stages=report, detail=detail)

    @api.post("/search", summary="Top pages for a text or image query, reranked", responses=errors.ERRORS)
    async def search(self, body: SearchRequest, authorization: str | None = Header(None)) -> SearchResponse:
        who = self.keys.check(authorization, "search")  # AuthError: 401/403 (_denied)
        query = core.parse_request(body, self.cfg.limits, rerank_available=self.reranker is not None)
        return await self._answer(lambda gid: self._search(gid, query, who.scope(), body.allow_partial), "search")

    def _retriever_stages(self) -> dict[str, DeploymentHandle]:
        if len(self.retrievers) == 1:
            return {"retriever": self.retrievers[0]}
        return {f"retriever-{i}": h for i, h in enumerate(self.retrievers)}

    async def _shard_search(self, gid: str, vector, k: int, clauses: list | None, scope: list | None,
                            allow_partial: bool) -> tuple[Batched, list[int]]:
        return await fanout.search(self.retrievers, gid, vector, k, clauses, scope, allow_partial=allow_partial,
                                   timeout=self.cfg.retriever.shard_timeout_s, last=gid == self.gens.order[-1])

    async def _lookup(self, gid: str, doc_id: str, page: int | None, scope: list | None
                      ) -> tuple[DeploymentHandle, int] | None:
        return await fanout.lookup(self.retrievers, gid, doc_id, page, scope)

    async def _search(self, gid: str, query: core.Query, scope: list | None = None,
                      allow_partial: bool = False) -> SearchResponse:
        t0 = time.perf_counter()
        embedded: Batched = await self.embedder.embed.remote(gid, query.item)
        t1 = time.perf_counter()
        depth = max(query.top_k, query.rerank_depth)
        searched, missing = await self._shard_search(gid, embedded.value, depth, query.clauses, scope, allow_partial)
        hits = searched.value
        t2 = time.perf_counter()
        reranked = Batched(None, 0.0, 0)
        if query.rerank_depth and hits:
            head = hits[:query.rerank_depth]
            reranked = await self.reranker.rerank.remote(gid, query.text, [h["position"] for h in head])
        scores = reranked.value
        t3 = time.perf_counter()
        results = core.merge_results(hits, scores, query.top_k)
        ms = {"embed": (t1 - t0) * 1000, "search": (t2 - t1) * 1000, "rerank": (t3 - t2) * 1000,
              "total": (time.perf_counter() - t0) * 1000}
        self.metrics.stages("/search", {k: v for k, v in ms.items() if k != "rerank" or scores is not None})
        prefix = self.cfg.route_prefix.rstrip("/")
        for r in results:
            r.thumbnail_url = f"{prefix}/pages/{quote(r.doc_id)}?page={r.page}"
        return SearchResponse(
            query=query.text, image_query=query.image is not None, top_k=query.top_k, generation=gid,
            rerank_depth=query.rerank_depth if scores is not None else 0, results=results,
            partial=bool(missing), missing_shards=missing,
            timings=Timings(**{f"{stage}_ms": v for stage, v in ms.items()}, embed_compute_ms=embedded.seconds * 1000,
                            search_compute_ms=searched.seconds * 1000, rerank_compute_ms=reranked.seconds * 1000,
                            embed_batch=embedded.batch, rerank_batch=reranked.batch))

    @api.post("/v1/embeddings", summary="OpenAI-compatible embeddings of texts and images (query or document prompt)",
              responses=errors.OPENAI_ERRORS)
    async def embeddings(self, body: EmbeddingsRequest,
                         authorization: str | None = Header(None)) -> EmbeddingsResponse:
        self.keys.check(authorization, "embed")  # AuthError: 401/403 in OpenAI's shape (_denied)

        async def run(gid: str) -> EmbeddingsResponse:
            t0 = time.perf_counter()
            full, index_dim, multi_vector = await self.embedder.dims.remote(gid)
            dims = openai_api.allowed_dims(self.cfg.embedding_dims, full, index_dim)
            items, dim = openai_api.parse_embeddings(body, self.cfg.limits, dims, index_dim, multi_vector)
            t1 = time.perf_counter()
            vectors, tokens = await self.embedder.vectors.remote(gid, items, dim, body.input_type == "document")
            t2 = time.perf_counter()
            self.metrics.stages("/v1/embeddings", {"embed": (t2 - t1) * 1000, "total": (t2 - t0) * 1000})
            return openai_api.embeddings_response(vectors, body.encoding_format, gid.split("@")[0], tokens)

        return await self._answer(run, "embedding")

    @api.post("/v2/rerank", summary="Cohere v2-compatible reranking of texts, images and indexed pages",
              responses=errors.ERRORS)
    @api.post("/v1/rerank", summary="Jina-compatible reranking (the same as /v2/rerank)", responses=errors.ERRORS)
    async def rerank(self, body: RerankRequest, authorization: str | None = Header(None)) -> RerankResponse:
        who = self.keys.check(authorization, "rerank")  # AuthError: 401/403 (_denied)
        if self.reranker is None:
            raise core.RequestError(404, "this endpoint has no reranker (serve.reranker)")

        async def run(gid: str) -> RerankResponse:
            t0 = time.perf_counter()
            query, docs, top_n = rerank_api.parse_rerank(body, self.cfg.limits)
            resolved = []
            for n, d in enumerate(docs):
                if isinstance(d, rerank_api.PageRef):
                    found = await self._lookup(gid, d.doc_id, d.page, who.scope())
                    if found is None:
                        raise core.RequestError(404, f"documents[{n}]: no page {d.page} of doc_id {d.doc_id!r} in "
                                                "the index")
                    d = found[1]
                resolved.append(d)
            t1 = time.perf_counter()
            scores = await self.reranker.score_documents.remote(gid, query, resolved)
            t2 = time.perf_counter()
            self.metrics.stages("/v2/rerank", {"rerank": (t2 - t1) * 1000, "total": (t2 - t0) * 1000})
            return rerank_api.rerank_response(scores.tolist(), top_n, self.cfg.reranker or "reranker")

        return await self._answer(run, "reranking")

    @api.post("/admin/delete", summary="Remove documents from the live index (off unless serve.admin_deletes)",
              responses=errors.ERRORS)
    async def admin_delete(self, body: DeleteRequest, authorization: str | None = Header(None)) -> DeleteResponse:
        """Publishes a new index version without the matching documents and returns once this endpoint's stages
        serve it: no later response contains a removed page."""
        from ray_vdr.corpus.metadata import FilterError
        from ray_vdr.corpus.sync import delete

        if not self.cfg.admin_deletes:
            raise core.RequestError(403, "admin deletes are off on this endpoint (serve.admin_deletes: false)")
        who = self.keys.check(authorization, "admin")  # AuthError: 401/403 (_denied)
        if not (body.doc_ids or body.sources or body.filter):
            raise core.RequestError(422, "say what to delete: doc_ids, sources or filter")
        index = serving_generations(self.cfg)[0].index
        try:
            summary = await asyncio.to_thread(delete, index, doc_ids=body.doc_ids, sources=body.sources,
                                              filter=body.filter, scope=who.scope())
        except LookupError as e:
            raise core.RequestError(404, str(e)) from None
        except (FilterError, ValueError) as e:
            raise core.RequestError(422, str(e)) from None
        self.gens.refresh()
        wanted, deadline = self.gens.order[0], time.monotonic() + self.cfg.limits.request_timeout_s
        while time.monotonic() < deadline:
            states = [await h.status.remote() for h in (self.embedder, *self.retrievers, self.reranker)
                      if h is not None]
            if all(st.generations.get(wanted) == "ready" or (
                    wanted.split("@")[0] in st.generations and st.state == "ready") for st in states):
                break
            await asyncio.sleep(0.2)
        logger.info("admin delete: %s", summary.model_dump_json(include={"version", "documents_removed",
                                                                         "pages_removed"}))
        return DeleteResponse(**summary.model_dump(), generation=wanted)

    @api.get("/pages/{doc_id:path}", summary="A live page's thumbnail, full image, or info (metadata)",
             response_model=PageInfo, responses={
                 200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}},
                       "description": "The page's image (size thumbnail or full), or its info (size info)"},
                 **errors.ERRORS})
    async def pages(self, doc_id: str, page: int | None = None,
                    size: Literal["thumbnail", "full", "info"] = "thumbnail",
                    authorization: str | None = Header(None)) -> Response:
        who = self.keys.check(authorization, "pages")  # AuthError: 401/403 (_denied)

        async def fetch(gid: str) -> bytes | PageInfo | None:
            found = await self._lookup(gid, doc_id, page, who.scope())
            if found is None:
                return None
            retriever, position = found
            if size == "info":
                return await retriever.info.remote(gid, position)
            return await retriever.page.remote(gid, position, "thumbnail" if size == "thumbnail" else "image")

        data = await self._in_generation(fetch)
        if data is None:
            where = f" page {page}" if page is not None else ""
            raise core.RequestError(404, f"no page in the index for doc_id {doc_id!r}{where}")
        # with API keys a page is the caller's (its tenant's): no shared cache (a proxy, a CDN) may hand it to another
        cache = {"Cache-Control": "private, max-age=3600", "Vary": "Authorization"} if self.keys.enabled else \
            {"Cache-Control": "public, max-age=3600"}
        if isinstance(data, PageInfo):
            return JSONResponse(data.model_dump(), headers=cache)
        media = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/webp" if data[8:12] == b"WEBP" else "image/png"
        return Response(data, media_type=media, headers=cache)


# ---------------------------------------------------------------------------------------------------------------------
# the builder


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def _options(d: ServeDeploymentConfig, num_gpus: float, retry_after_s: int) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": num_gpus},
        "backpressure_config": {"retry_after_s": retry_after_s},
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
    }
    if d.min_replicas == d.max_replicas:
        opts["num_replicas"] = d.min_replicas
    else:
        opts["autoscaling_config"] = {"min_replicas": d.min_replicas, "max_replicas": d.max_replicas,
                                      "target_ongoing_requests": d.target_ongoing_requests}
    return opts


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``args`` (a :class:`ray_vdr.config.ServeConfig` or its dict, as in a Serve config).

    Checks the index binding here when the index exists, so a wrong model or dimension fails ``serve run`` at once;
    when it does not exist yet, the deployments wait for it and health stays 503 until it is loaded.
    """
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    if not cfg.auth.configured and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        if not cfg.auth.allow_anonymous:
            raise ValueError(f"serve.host is {cfg.host} (reachable from other machines) but serve.auth has no keys: "
                             "set serve.auth.keys_file or keys_env, or serve.auth.allow_anonymous: true")
        logger.warning("serving on %s WITHOUT API keys (serve.auth.allow_anonymous): anyone who can reach it reads "
                       "every page", cfg.host)
    KeyRing.load(cfg.auth.keys_file, cfg.auth.keys_env)  # a bad key file fails `serve run` here, naming the entry
    if cfg.index is None:
        raise ValueError("serve.index is not set: give the embedding job's output folder or URI (index=...)")
    live = serving_generations(cfg)[0]  # the live manifest's live generation, or cfg.index
    manifest = read_manifest(live.index)
    if manifest is not None:
        core.check_binding(generation_config(cfg, live), manifest)
    else:
        logger.warning("no index at %s yet: the endpoint starts and waits for it (health 503 until loaded)",
                       live.index)
    gpus = _cluster_gpus()
    retry = cfg.limits.retry_after_s
    model_gpus = {name: (d.num_gpus if d.num_gpus is not None else (1.0 if gpus else 0.0))
                  for name, d in (("embedder", cfg.embedder), ("rerank", cfg.rerank))}
    data = cfg.model_dump(mode="json")
    embedder = QueryEmbedder.options(**_options(cfg.embedder, model_gpus["embedder"], retry)).bind(
        data, cfg.embedder.num_cpus, model_gpus["embedder"])
    shards = cfg.retriever.shards or (manifest.shard_count if manifest is not None else 1)
    if shards == 1:
        retrievers = [Retriever.options(**_options(cfg.retriever, cfg.retriever.num_gpus or 0.0, retry)).bind(data)]
    else:  # a Retriever group per shard, each placeable on its own nodes
        retrievers = []
        for i in range(shards):
            opts = _options(cfg.retriever, cfg.retriever.num_gpus or 0.0, retry)
            if cfg.retriever.shard_resources:
                opts["ray_actor_options"]["resources"] = cfg.retriever.shard_resources[i % len(
                    cfg.retriever.shard_resources)]
            retrievers.append(Retriever.options(name=f"Retriever-shard-{i}", **opts).bind(data, i, shards))
        logger.info("index of %d shards: a Retriever group per shard", shards)
    reranker = None
    if cfg.reranker is not None:
        reranker = Reranker.options(**_options(cfg.rerank, model_gpus["rerank"], retry)).bind(
            data, cfg.rerank.num_cpus, model_gpus["rerank"])
    return Ingress.options(**_options(cfg.ingress, cfg.ingress.num_gpus or 0.0, retry)).bind(
        embedder, retrievers, reranker, data)
