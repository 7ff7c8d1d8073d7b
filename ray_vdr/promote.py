"""Model promotion: a candidate embedder goes live on the endpoint only if it retrieves at least as well.

    ray-vdr promote -c configs/demo.yaml promote.model=runs/<run>/model serve.live=runs/<run>/live.json

1. The live generation (index + the model it was built with) comes from the live manifest (``serve.live``), or, before
   the first promotion, from ``serve.index``.
2. The candidate re-embeds the live index's sources into a new index, one folder per candidate model under
   ``promote.output`` (the embedding job: resumable, so a rerun reuses it).
3. Both embedders are evaluated on the eval split in one Ray task, each as its index encodes (the prompts, pixel
   bounds and dimension its manifest records).
4. If the candidate's NDCG@10 >= the live one's + ``promote.min_delta``, the live manifest is rewritten: the candidate
   is live, the old live is previous. Otherwise the manifest only records the rejected candidate and why.
5. The running endpoint follows the manifest (serving/app.py): its replicas load the new generation next to the old
   one and the ingress switches; no replica restarts and no request fails. The job waits until the endpoint answers
   from the new generation (``promote.endpoint``), and says so.

The live manifest's format is :mod:`ray_vdr.corpus.live`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ray_vdr.client import EndpointClient, EndpointError
from ray_vdr.config import ConfigError, VDRConfig
from ray_vdr.corpus.live import (
    Generation,
    GenerationRef,
    LiveManifest,
    PromotionRecord,
    base_id,
    generation,
    read_live,
    write_live,
)
from ray_vdr.corpus.manifest import IndexManifest
from ray_vdr.corpus.store import read_manifest
from ray_vdr.models.binding import EmbedderBinding
from ray_vdr.storage import is_file, now_iso

logger = logging.getLogger(__name__)


@dataclass
class PromoteResult:
    promoted: bool
    reason: str
    before: Generation  # the generation live before this run
    candidate: Generation
    live: Generation  # the generation live after it
    metrics: dict[str, dict[str, float]]  # "live" and "candidate" embed-only metrics on the eval split
    switched: bool | None  # the endpoint answered from the new generation (None: not promoted, or no endpoint)
    manifest: str


def decide(live_ndcg: float, candidate_ndcg: float, min_delta: float = 0.0) -> tuple[bool, str]:
    """Promote when the candidate's NDCG@10 is not worse than the live one's by more than ``-min_delta``."""
    bar = live_ndcg + min_delta
    verdict = ">=" if candidate_ndcg >= bar else "<"
    why = (f"candidate NDCG@10 {candidate_ndcg:.4f} {verdict} live {live_ndcg:.4f}"
           + (f" + min_delta {min_delta:+.4f}" if min_delta else ""))
    return candidate_ndcg >= bar, why


def endpoint_url(cfg: VDRConfig) -> str:
    from ray_vdr.endpoint import endpoint_url as local_url

    return cfg.promote.endpoint.rstrip("/") + "/" if cfg.promote.endpoint else local_url(cfg.serve)


def wait_for_switch(url: str, gid: str, timeout_s: float, probes: int = 5) -> bool | None:
    """Wait until the endpoint at ``url`` answers ``probes`` searches in a row from generation ``gid``.

    None when nothing answers there (no endpoint running: it serves the new generation when it starts); raises
    TimeoutError when it answers but does not switch in time."""
    client = EndpointClient(url, timeout=30)
    try:
        client.health(timeout=10)  # any answer will do (503 while a stage loads)
    except OSError as e:
        logger.warning("no endpoint answered at %s (%s): it will serve %s when it starts", url, e, gid)
        return None
    deadline, streak, last = time.time() + timeout_s, 0, {}
    while time.time() < deadline:
        try:
            answer = client.search("promotion check", top_k=1, rerank_depth=0)
            last, switched = {"generation": answer.generation}, base_id(answer.generation) == base_id(gid)
        except (OSError, EndpointError) as e:
            last, switched = {"detail": str(e)}, False
        streak = streak + 1 if switched else 0
        if streak >= probes:
            return True
        time.sleep(0.5)
    raise TimeoutError(f"the endpoint at {url} did not switch to {gid} in {timeout_s:.0f}s; last answer: {last}")


def generation_binding(gen: Generation, manifest: IndexManifest) -> EmbedderBinding:
    """How a generation encodes queries: its index's embedder binding (prompts, pixel bounds) with its model."""
    return manifest.model.at(gen.model or manifest.model.path)


def _live_generation(cfg: VDRConfig, doc: LiveManifest | None) -> Generation:
    if doc is not None:
        return doc.live
    if cfg.serve.index is None:
        raise ConfigError("invalid configuration:\n  serve.index: not set, and there is no live manifest yet")
    manifest = read_manifest(cfg.serve.index)
    if manifest is None:
        raise FileNotFoundError(f"the live index {cfg.serve.index} has no manifest: build it with `ray-vdr embed`")
    return generation(cfg.serve.index, manifest.model.path, manifest.dim)


def run(cfg: VDRConfig) -> PromoteResult:
    """Promote ``promote.model`` on the endpoint that follows ``serve.live``, if it is not worse (module doc)."""
    from ray_vdr.cluster import init_ray
    from ray_vdr.corpus import embed
    from ray_vdr.eval.two_stage import compare_embedders
    from ray_vdr.models.load import local_model, model_fingerprint

    s = cfg.serve
    if s.index is None:
        s.index = cfg.index.output
    if not s.live:
        raise ConfigError("invalid configuration:\n  serve.live: not set; promotion switches an endpoint that "
                          "follows a live manifest (set serve.live for both `ray-vdr serve` and `ray-vdr promote`)")
    if s.model is not None:
        raise ConfigError("invalid configuration:\n  serve.model: pins the query embedder; unset it to promote "
                          "(the endpoint then uses the model each index was built with)")
    candidate_model = cfg.promote.model or cfg.run.uri("model")
    if not is_file(f"{candidate_model}/modules.json"):
        raise FileNotFoundError(f"no saved embedder at {candidate_model} (promote.model; default: this config's "
                                "training run): train one first (`ray-vdr train`)")
    doc = read_live(s.live)
    live = _live_generation(cfg, doc)
    live_manifest = read_manifest(live.index)
    if live_manifest is None:
        raise FileNotFoundError(f"the live index {live.index} (in {s.live}) has no manifest")

    fingerprint = model_fingerprint(local_model(candidate_model))
    if fingerprint == live_manifest.model.fingerprint:  # the same files: nothing to embed or compare
        return PromoteResult(False, "the candidate is already live (same model files)", live,
                             live.model_copy(update={"model": candidate_model}), live, {}, None, s.live)

    # 2. the candidate's index over the live index's corpus
    init_ray()
    out_root = (cfg.promote.output or cfg.run.uri("generations")).rstrip("/")
    candidate_index = f"{out_root}/{fingerprint[:12]}"
    icfg = cfg.model_copy(deep=True)
    icfg.index.model, icfg.index.output, icfg.index.sources = candidate_model, candidate_index, live_manifest.sources
    logger.info("embedding the live corpus (%d source(s), %d pages) with %s into %s", len(live_manifest.sources),
                live_manifest.vectors, candidate_model, candidate_index)
    built = embed.run(icfg)
    candidate = generation(candidate_index, candidate_model, built.manifest.dim)

    # 3. both embedders on the eval split
    live_dim = live.dim or live_manifest.dim
    logger.info("evaluating live %s (dim %d) and candidate %s (dim %d) on the eval split", live.model, live_dim,
                candidate_model, candidate.dim)
    metrics = compare_embedders(cfg, {"live": (generation_binding(live, live_manifest), live_dim),
                                      "candidate": (built.manifest.model, candidate.dim)},
                                num_cpus=cfg.promote.eval_cpus)
    promoted, reason = decide(metrics["live"]["ndcg@10"], metrics["candidate"]["ndcg@10"], cfg.promote.min_delta)

    # 4. the manifest: the decision, and the switch when promoted
    now = now_iso()
    record = PromotionRecord(at=now, candidate=candidate.model_copy(update={"metrics": metrics["candidate"]}),
                             live=GenerationRef(id=live.id, model=live.model, metrics=metrics["live"]),
                             decision="promoted" if promoted else "rejected", reason=reason)
    history = (doc.history if doc else []) + [record]
    if promoted:
        new_doc = LiveManifest(live=candidate.model_copy(update={"metrics": metrics["candidate"], "promoted_at": now}),
                               previous=live.model_copy(update={"metrics": metrics["live"]}), history=history)
    else:
        new_doc = LiveManifest(live=live, previous=doc.previous if doc else None, history=history)
    write_live(new_doc, s.live)
    logger.info("%s: %s; live manifest %s", "PROMOTED" if promoted else "REJECTED", reason, s.live)

    # 5. the endpoint follows the manifest
    switched = None
    if promoted:
        url = endpoint_url(cfg)
        began = time.time()
        switched = wait_for_switch(url, candidate.id, cfg.promote.switch_timeout_s)
        if switched:
            logger.info("the endpoint at %s serves %s (%s) after %.1fs", url, candidate.id, candidate_model,
                        time.time() - began)
    return PromoteResult(promoted, reason, live, candidate, new_doc.live, metrics, switched, s.live)
