"""The two-stage retrieval endpoint on Ray Serve: the ingress (HTTP routes) and the application builder.

    serve run serving/config.yaml                          # from the repo root, on a running or a new local Ray
    serve run serving.app:build_app index=./index reranker=./my-reranker
    ray-vdr serve -c configs/demo.yaml                     # the same app, from a ray-vdr config's serve section

``Ingress`` (FastAPI): ``POST /search``, ``GET /healthz``, ``GET /pages/{doc_id}``, the search page at ``/``, OpenAPI
at ``/docs``; it calls the deployments of :mod:`serving.deployments` (query embedder → FAISS retriever → reranker).
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
import json
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_vdr.config import ServeConfig, ServeDeploymentConfig
from ray_vdr.corpus.live import generation_config, serving_generations
from ray_vdr.corpus.store import read_manifest
from serving import core, openai_api, rerank_api
from serving.auth import AuthError, KeyRing
from serving.deployments import QueryEmbedder, Reranker, Retriever
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


def _error_cause(e: BaseException) -> BaseException:
    """The exception a deployment raised (Ray wraps it in RayTaskError, which may or may not subclass it)."""
    return getattr(e, "cause", None) or e


def _raise_or_return(result: Any) -> Any:
    """A stage's answer, or the NotReady it returned, raised here in the ingress. The stages return it rather than
    raise it: a batch has no per-request errors (one generation's NotReady must not fail the batch's other
    requests), and a generation still loading during a promotion is the ingress's to handle (it falls back to the
    previous one), not an error in the replica's log."""
    if isinstance(result, Exception):
        raise result
    return result


@api.exception_handler(AuthError)
async def _denied(request: Request, e: AuthError) -> JSONResponse:
    """401 (with WWW-Authenticate) or 403 for every route; the message names what is missing, never the key.
    OpenAI's error shape on its route, so its client raises AuthenticationError / PermissionDeniedError."""
    body = openai_api.openai_error(e.status, str(e)) if request.url.path.endswith("/v1/embeddings") else \
        {"detail": str(e)}
    return JSONResponse(body, status_code=e.status, headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


@api.middleware("http")
async def _limit_and_count(request: Request, call_next):
    """413 for bodies over limits.max_body_bytes, by their Content-Length before reading them; every answer counted
    by route and status (serving/metrics.py)."""
    limit = getattr(request.app.state, "max_body_bytes", None)
    length = request.headers.get("content-length")
    if limit is not None and length is not None and length.isdigit() and int(length) > limit:
        response = _error(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
    else:
        response = await call_next(request)
    metrics: EndpointMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.request(route_label(request.scope), response.status_code)
    return response


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, embedder: DeploymentHandle, retriever: DeploymentHandle, reranker: DeploymentHandle | None,
                 cfg: dict[str, Any]):
        self.cfg = ServeConfig.model_validate(cfg)
        self.embedder, self.retriever, self.reranker = embedder, retriever, reranker
        api.state.max_body_bytes = self.cfg.limits.max_body_bytes
        self.metrics = api.state.metrics = EndpointMetrics(self.cfg.metrics)
        quiet_health_probes()
        self.keys = KeyRing.load(self.cfg.auth.keys_file, self.cfg.auth.keys_env)  # hashes only
        # which generations to ask for, preferred first (nothing to load here: the stages load them)
        self.gens = Generations("ingress", self.cfg, lambda gen, say: gen)

    async def _in_generation(self, call):
        """``await call(gid)`` in the preferred generation; if a stage has not loaded it (yet: a promotion is
        switching), in the next one. Every stage of one request uses the same generation."""
        order = list(self.gens.order)
        for n, gid in enumerate(order):
            try:
                return await call(gid)
            except Exception as e:
                if n + 1 == len(order) or not isinstance(_error_cause(e), core.NotReady):
                    raise

    def _unavailable(self, e: BaseException) -> JSONResponse | None:
        """503 + Retry-After for a stage still loading or over capacity; None for anything else."""
        from ray.serve.exceptions import BackPressureError

        cause = _error_cause(e)
        retry = self.cfg.limits.retry_after_s
        if isinstance(e, core.NotReady) or isinstance(cause, core.NotReady):
            self.metrics.unavailable("not_ready")
            return _error(503, f"not ready: {cause}", retry)
        if isinstance(e, BackPressureError) or isinstance(cause, BackPressureError):
            self.metrics.unavailable("over_capacity")
            return _error(503, "over capacity: too many requests in flight, retry later", retry)
        return None

    async def _answer(self, call, what: str, error=None) -> JSONResponse:
        """``call(gid)``'s answer in the preferred generation, or the error response: a RequestError's 4xx (raised
        here or by a stage: a filter the index cannot apply), 504 past the timeout, 503 while a stage loads or is
        over capacity. ``error`` shapes the errors (default ``{"detail": ...}``)."""
        error = error or _error
        try:
            return JSONResponse(await asyncio.wait_for(self._in_generation(call), self.cfg.limits.request_timeout_s))
        except TimeoutError:
            return error(504, f"{what} took longer than {self.cfg.limits.request_timeout_s}s")
        except Exception as e:
            cause = _error_cause(e)
            if isinstance(cause, core.RequestError):
                return error(cause.status, str(cause))
            unavailable = self._unavailable(e)
            if unavailable is None:
                raise
            return error(unavailable.status_code, json.loads(unavailable.body)["detail"],
                         self.cfg.limits.retry_after_s)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(SEARCH_PAGE)

    @api.get("/healthz", summary="Ready when the embedder, the index (and the reranker) are loaded")
    async def healthz(self) -> JSONResponse:
        stages = {"embedder": self.embedder, "retriever": self.retriever}
        if self.reranker is not None:
            stages["reranker"] = self.reranker
        report: dict[str, Any] = {}
        for name, handle in stages.items():
            try:
                report[name] = await asyncio.wait_for(handle.status.remote(), STAGE_TIMEOUT_S)
            except Exception as e:  # a replica still starting, or gone
                report[name] = {"state": "unavailable", "detail": f"{type(e).__name__}: {e}"[:300]}
        ready = all(s["state"] == "ready" for s in report.values())
        headers = None if ready else {"Retry-After": str(self.cfg.limits.retry_after_s)}
        return JSONResponse({"ready": ready, "generation": self.gens.order[0], "stages": report},
                            status_code=200 if ready else 503, headers=headers)

    @api.post("/search", summary="Top pages for a text or image query, reranked")
    async def search(self, body: core.SearchRequest, authorization: str | None = Header(None)) -> JSONResponse:
        who = self.keys.check(authorization, "search")  # AuthError: 401/403 (_denied)
        try:
            query = core.parse_request(body, self.cfg.limits, rerank_available=self.reranker is not None)
        except core.RequestError as e:
            return _error(e.status, str(e))
        return await self._answer(lambda gid: self._search(gid, query, who.scope()), "search")

    async def _search(self, gid: str, query: core.Query, scope: list | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        vector, embed_s, embed_batch = _raise_or_return(await self.embedder.embed.remote(gid, query.item))
        t1 = time.perf_counter()
        depth = max(query.top_k, query.rerank_depth)
        hits, search_s = _raise_or_return(await self.retriever.search.remote(gid, vector, depth, query.clauses,
                                                                             scope))
        t2 = time.perf_counter()
        scores, rerank_s, rerank_batch = None, 0.0, 0
        if query.rerank_depth and hits:
            head = hits[:query.rerank_depth]
            scores, rerank_s, rerank_batch = _raise_or_return(await self.reranker.rerank.remote(
                gid, query.text, [h["position"] for h in head]))
        t3 = time.perf_counter()
        results = core.merge_results(hits, scores, query.top_k)
        ms = {"embed": (t1 - t0) * 1000, "search": (t2 - t1) * 1000, "rerank": (t3 - t2) * 1000,
              "total": (time.perf_counter() - t0) * 1000}
        self.metrics.stages("/search", {k: v for k, v in ms.items() if k != "rerank" or scores is not None})
        prefix = self.cfg.route_prefix.rstrip("/")
        for r in results:
            r["thumbnail_url"] = f"{prefix}/pages/{quote(r['doc_id'])}?page={r['page']}"
        return {
            "query": query.text, "image_query": query.image is not None, "top_k": query.top_k, "generation": gid,
            "rerank_depth": query.rerank_depth if scores is not None else 0, "results": results,
            "timings": {**{f"{stage}_ms": v for stage, v in ms.items()}, "embed_compute_ms": embed_s * 1000,
                        "search_compute_ms": search_s * 1000, "rerank_compute_ms": rerank_s * 1000,
                        "embed_batch": embed_batch, "rerank_batch": rerank_batch},
        }

    @api.post("/v1/embeddings", summary="OpenAI-compatible embeddings of texts and images (query or document prompt)")
    async def embeddings(self, body: openai_api.EmbeddingsRequest,
                         authorization: str | None = Header(None)) -> JSONResponse:
        self.keys.check(authorization, "embed")  # AuthError: 401/403 in OpenAI's shape (_denied)
        async def run(gid: str) -> dict[str, Any]:
            t0 = time.perf_counter()
            full, index_dim = _raise_or_return(await self.embedder.dims.remote(gid))
            dims = openai_api.allowed_dims(self.cfg.embedding_dims, full, index_dim)
            items, dim = openai_api.parse_embeddings(body, self.cfg.limits, dims, index_dim)
            t1 = time.perf_counter()
            vectors, tokens = _raise_or_return(await self.embedder.vectors.remote(
                gid, items, dim, body.input_type == "document"))
            t2 = time.perf_counter()
            self.metrics.stages("/v1/embeddings", {"embed": (t2 - t1) * 1000, "total": (t2 - t0) * 1000})
            return openai_api.embeddings_response(vectors, body.encoding_format, gid.split("@")[0], tokens)

        def error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:  # OpenAI's shape
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
            return JSONResponse(openai_api.openai_error(status, message, openai_api.error_param(message)), status_code=status,
                                headers=headers)

        return await self._answer(run, "embedding", error)

    @api.post("/v2/rerank", summary="Cohere v2-compatible reranking of texts, images and indexed pages")
    @api.post("/v1/rerank", summary="Jina-compatible reranking (the same as /v2/rerank)")
    async def rerank(self, body: rerank_api.RerankRequest, authorization: str | None = Header(None)) -> JSONResponse:
        who = self.keys.check(authorization, "rerank")  # AuthError: 401/403 (_denied)
        if self.reranker is None:
            return _error(404, "this endpoint has no reranker (serve.reranker)")

        async def run(gid: str) -> dict[str, Any]:
            t0 = time.perf_counter()
            query, docs, top_n = rerank_api.parse_rerank(body, self.cfg.limits)
            resolved = []
            for n, d in enumerate(docs):
                if isinstance(d, rerank_api.PageRef):
                    position = await self.retriever.lookup.remote(gid, d[0], d[1], who.scope())
                    if position is None:
                        raise core.RequestError(404, f"documents[{n}]: no page {d[1]} of doc_id {d[0]!r} in the index")
                    d = position
                resolved.append(d)
            t1 = time.perf_counter()
            scores = await self.reranker.score_documents.remote(gid, query, resolved)
            t2 = time.perf_counter()
            self.metrics.stages("/v2/rerank", {"rerank": (t2 - t1) * 1000, "total": (t2 - t0) * 1000})
            return rerank_api.rerank_response(scores.tolist(), top_n, self.cfg.reranker or "reranker")

        return await self._answer(run, "reranking")

    @api.post("/admin/delete", summary="Remove documents from the live index (off unless serve.admin_deletes)")
    async def admin_delete(self, body: core.DeleteRequest, authorization: str | None = Header(None)) -> JSONResponse:
        """Publishes a new index version without the matching documents and returns once this endpoint's stages
        serve it: no later response contains a removed page."""
        from ray_vdr.corpus.metadata import FilterError
        from ray_vdr.corpus.sync import delete

        if not self.cfg.admin_deletes:
            return _error(403, "admin deletes are off on this endpoint (serve.admin_deletes: false)")
        who = self.keys.check(authorization, "admin")  # AuthError: 401/403 (_denied)
        if not (body.doc_ids or body.sources or body.filter):
            return _error(422, "say what to delete: doc_ids, sources or filter")
        index = serving_generations(self.cfg)[0]["index"]
        try:
            summary = await asyncio.to_thread(delete, index, doc_ids=body.doc_ids, sources=body.sources,
                                              filter=body.filter, scope=who.scope())
        except LookupError as e:
            return _error(404, str(e))
        except (FilterError, ValueError) as e:
            return _error(422, str(e))
        self.gens.refresh()
        wanted, deadline = self.gens.order[0], time.monotonic() + self.cfg.limits.request_timeout_s
        while time.monotonic() < deadline:
            states = [await h.status.remote() for h in (self.embedder, self.retriever, self.reranker) if h is not None]
            if all(st.get("generations", {}).get(wanted) == "ready" or (
                    st.get("generations") and wanted.split("@")[0] in st["generations"] and st["state"] == "ready")
                   for st in states):
                break
            await asyncio.sleep(0.2)
        logger.info("admin delete: %s", {k: summary[k] for k in ("version", "documents_removed", "pages_removed")})
        return JSONResponse({**summary, "generation": wanted})

    @api.get("/pages/{doc_id:path}", summary="A live page's thumbnail, full image, or info (metadata)")
    async def pages(self, doc_id: str, page: int | None = None, size: str = "thumbnail",
                    authorization: str | None = Header(None)) -> Response:
        who = self.keys.check(authorization, "pages")  # AuthError: 401/403 (_denied)
        if size not in ("thumbnail", "full", "info"):
            return _error(422, "size must be 'thumbnail', 'full' or 'info' (doc_id, page, source and metadata)")

        async def fetch(gid: str) -> bytes | dict | None:
            position = await self.retriever.lookup.remote(gid, doc_id, page, who.scope())
            if position is None:
                return None
            if size == "info":
                return await self.retriever.info.remote(gid, position)
            return await self.retriever.page.remote(gid, position, "thumbnail" if size == "thumbnail" else "image")

        try:
            data = await self._in_generation(fetch)
            if data is None:
                where = f" page {page}" if page is not None else ""
                return _error(404, f"no page in the index for doc_id {doc_id!r}{where}")
        except Exception as e:
            unavailable = self._unavailable(e)
            if unavailable is None:
                raise
            return unavailable
        if isinstance(data, dict):
            return JSONResponse(data)
        media = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/webp" if data[8:12] == b"WEBP" else "image/png"
        return Response(data, media_type=media, headers={"Cache-Control": "public, max-age=3600"})


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
    manifest = read_manifest(live["index"])
    if manifest is not None:
        core.check_binding(generation_config(cfg, live), manifest)
    else:
        logger.warning("no index at %s yet: the endpoint starts and waits for it (health 503 until loaded)",
                       live["index"])
    gpus = _cluster_gpus()
    retry = cfg.limits.retry_after_s
    model_gpus = {name: (d.num_gpus if d.num_gpus is not None else (1.0 if gpus else 0.0))
                  for name, d in (("embedder", cfg.embedder), ("rerank", cfg.rerank))}
    data = cfg.model_dump(mode="json")
    embedder = QueryEmbedder.options(**_options(cfg.embedder, model_gpus["embedder"], retry)).bind(
        data, cfg.embedder.num_cpus, model_gpus["embedder"])
    retriever = Retriever.options(**_options(cfg.retriever, cfg.retriever.num_gpus or 0.0, retry)).bind(data)
    reranker = None
    if cfg.reranker is not None:
        reranker = Reranker.options(**_options(cfg.rerank, model_gpus["rerank"], retry)).bind(
            data, cfg.rerank.num_cpus, model_gpus["rerank"])
    return Ingress.options(**_options(cfg.ingress, cfg.ingress.num_gpus or 0.0, retry)).bind(
        embedder, retriever, reranker, data)
