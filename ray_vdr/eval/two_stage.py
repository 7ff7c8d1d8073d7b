"""Two-stage evaluation on the eval split: the embedder alone, then the embedder's top candidates reordered by the
reranker at several depths. NDCG@10, MRR@10 and Recall@10 per setting, as a table (eval.md), JSON and a plot.

The core (:func:`two_stage_metrics`) takes an :class:`~ray_vdr.models.encoder.IndexEncoder` (queries and pages
encoded as an index encodes them), a reranker and an :class:`~ray_vdr.eval.matryoshka.EvalSet`, and uses no Ray;
the job (:func:`run`) reads the eval split with Ray Data inside one Ray task, on a GPU when the cluster has one.
:func:`compare_embedders` is the same embed-only measurement for promotion.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from ray_vdr.config import VDRConfig
from ray_vdr.eval.metrics import mean_metrics, rank, ranking_metrics, rerank_order
from ray_vdr.models.binding import EmbedderBinding
from ray_vdr.storage import is_file, write_bytes

if TYPE_CHECKING:
    from ray_vdr.eval.matryoshka import EvalSet
    from ray_vdr.models.encoder import IndexEncoder

logger = logging.getLogger(__name__)

METRICS = ("ndcg@10", "mrr@10", "recall@10")
EMBED_ONLY = "embed only"


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {m: v for m, v in mean_metrics(rows).items() if m in METRICS}


class EvalReport(BaseModel):
    """What ``ray-vdr evaluate`` measured (eval.json), and where."""

    model_config = ConfigDict(extra="forbid")

    results: dict[str, dict[str, float]]
    dim: int
    eval_queries: int
    eval_corpus: int
    seconds: float
    device: str
    embedder: str | None = None
    reranker: str | None = None
    rerank_depths: list[int] = []
    table: str = ""
    output: str | None = None


def two_stage_metrics(encoder: IndexEncoder, reranker, eval_set: EvalSet, *, dim: int | None, depths: list[int],
                      batch_size: int = 16) -> dict[str, dict[str, float]]:
    """{"embed only": metrics, "rerank@<depth>": metrics, ...}; ``reranker`` None gives embed only.

    The encoder encodes queries and pages as the index does (prompts, ``dim``, normalised); the reranker scores
    each query's top ``max(depths)`` pages once, and every depth reorders its own prefix of them.
    """
    qids = list(eval_set.queries)
    cids = list(eval_set.corpus)
    q = encoder.encode_queries([eval_set.queries[i] for i in qids], dim, batch_size)
    c = encoder.encode_pages([eval_set.corpus[i] for i in cids], dim, batch_size)
    if encoder.multi_vector:  # token vectors: MaxSim
        from ray_vdr.models.multivector import maxsim_scores

        sims = maxsim_scores(q, c, dim or encoder.dim)
    else:
        sims = q @ c.T
    first_stage = [[cids[j] for j in row] for row in rank(sims)]
    results = {EMBED_ONLY: _mean([ranking_metrics(r, eval_set.relevant[qid]) for r, qid in
                                  zip(first_stage, qids, strict=True)])}
    if reranker is None or not depths:
        return results
    deepest = max(depths)
    pairs = [(eval_set.queries[qid], eval_set.corpus[cid]) for qid, ranked in zip(qids, first_stage, strict=True)
             for cid in ranked[:deepest]]
    scores = np.asarray(reranker.predict(pairs, batch_size=batch_size, convert_to_numpy=True,
                                         show_progress_bar=False), dtype=np.float32).reshape(-1)
    per_query = np.split(scores, np.cumsum([min(deepest, len(r)) for r in first_stage])[:-1])
    for depth in depths:
        rows = [ranking_metrics(rerank_order(ranked, s, depth), eval_set.relevant[qid])
                for ranked, s, qid in zip(first_stage, per_query, qids, strict=True)]
        results[f"rerank@{depth}"] = _mean(rows)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# reports


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    base = results[EMBED_ONLY]
    head = "| setting | " + " | ".join(METRICS) + " | Δ ndcg@10 vs embed only |"
    rows = [f"| {name} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS) + f" | {r['ndcg@10'] - base['ndcg@10']:+.4f} |"
            for name, r in results.items()]
    return "\n".join([head, "|---|" + "---|" * (len(METRICS) + 1), *rows])


def plot(results: dict[str, dict[str, float]], path: str | Path) -> None:
    """Each metric against rerank depth (depth 0 = embed only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [0] + [int(name.split("@")[1]) for name in results if name != EMBED_ONLY]
    names = [EMBED_ONLY] + [n for n in results if n != EMBED_ONLY]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for metric in METRICS:
        ax.plot(range(len(depths)), [results[n][metric] for n in names], "o-", label=metric)
    ax.set_xticks(range(len(depths)), ["embed only"] + [f"rerank top {d}" for d in depths[1:]])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score on the eval split")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Two-stage retrieval: embed only vs embed + rerank")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(out: str, results: dict[str, dict[str, float]], extra: dict[str, Any]) -> str:
    """eval.json, eval.md and eval.png under ``out`` (a folder or URI). Returns the markdown table."""
    import tempfile

    table = markdown_table(results)
    write_bytes(json.dumps({"results": results, **extra}, indent=2).encode(), f"{out}/eval.json")
    write_bytes((table + "\n").encode(), f"{out}/eval.md")
    with tempfile.TemporaryDirectory() as tmp:
        plot(results, Path(tmp) / "eval.png")
        write_bytes((Path(tmp) / "eval.png").read_bytes(), f"{out}/eval.png")
    return table


# ---------------------------------------------------------------------------------------------------------------------
# the job


def resolve(cfg: VDRConfig) -> tuple[str, str | None, str]:
    """(embedder, reranker or None, output) with the defaults filled in: this config's trained models."""
    from ray_vdr.models.load import trained_reranker

    model = cfg.evaluate.model or cfg.run.uri("model")
    if not is_file(f"{model}/modules.json") and cfg.evaluate.model is None:
        raise FileNotFoundError(f"evaluate.model is not set and the training run has no saved model at {model}")
    return model, cfg.evaluate.reranker or trained_reranker(cfg), cfg.evaluate.output or cfg.run.uri("eval")


def _eval_split_blocks(cfg: VDRConfig, tag: str) -> list:
    """The eval split's validated blocks (ray_vdr.data.sources.eval_blocks), rejects under ``rejects/<tag>``."""
    from ray_vdr.data.sources import eval_blocks

    return eval_blocks(cfg.data, cfg.run.uri("rejects", tag))


def _eval_set(blocks: list):
    """The EvalSet of the eval split's blocks (in the evaluation task: 40 rows here, a few thousand in real runs)."""
    from ray_vdr.data.sources import blocks_table
    from ray_vdr.eval.matryoshka import eval_set_from_table

    return eval_set_from_table(blocks_table(blocks))


def evaluated_encoder(cfg: VDRConfig, binding: EmbedderBinding, device: str, dim: int | None = None) -> IndexEncoder:
    """The encoder of an index binding, with this config's dtype and attention: an index's manifest binding
    (promotion), or the binding the embedding job would record for a model under this config
    (:func:`config_binding`), so evaluation encodes exactly as the index and the endpoint do."""
    from ray_vdr.models.encoder import IndexEncoder
    from ray_vdr.models.load import Runtime

    return IndexEncoder(binding, Runtime(cfg.model.dtype, cfg.model.attn_implementation, device), dim)


def config_binding(cfg: VDRConfig, model: str) -> EmbedderBinding:
    """How the embedding job would encode with ``model`` under this config: its prompts, pixel bounds and token limit
    (the model's saved ones, overridden by the config's model section)."""
    from ray_vdr.models.load import embedder_binding

    return embedder_binding(cfg.model, model)


def _reranker(cfg: VDRConfig, path: str, device: str):
    from ray_vdr.models.load import Runtime, load_reranker

    m = cfg.reranker.model
    return load_reranker(path, Runtime(m.dtype, m.attn_implementation, device), min_pixels=m.min_pixels,
                         max_pixels=m.max_pixels, trust_remote_code=m.trust_remote_code)


def _device(cfg: VDRConfig, num_cpus: float = 1.0) -> str:
    from ray_vdr.cluster import worker_device, worker_logging

    worker_logging()
    return worker_device(cfg.scaling.use_gpu, num_cpus)


def _evaluate_task(cfg_json: dict, blocks: list, model: str, reranker: str | None) -> EvalReport:
    """Runs as one Ray task: the eval split from its blocks, both models loaded, measured."""
    cfg = VDRConfig.model_validate(cfg_json)
    device = _device(cfg)
    eval_set = _eval_set(blocks)
    encoder = evaluated_encoder(cfg, config_binding(cfg, model), device)
    dim = cfg.evaluate.dim or cfg.output.truncate_dim or encoder.full_dim
    rr = _reranker(cfg, reranker, device) if reranker is not None else None
    t0 = time.perf_counter()
    results = two_stage_metrics(encoder, rr, eval_set, dim=dim, depths=cfg.evaluate.rerank_depths,
                                batch_size=cfg.evaluate.batch_size)
    return EvalReport(results=results, dim=dim, eval_queries=len(eval_set.queries), eval_corpus=len(eval_set.corpus),
                      seconds=round(time.perf_counter() - t0, 2), device=device)


def _compare_task(cfg_json: dict, blocks: list, embedders: dict[str, tuple[dict, int]]) -> dict[str, dict[str, float]]:
    """Runs as one Ray task: embed-only metrics of each {name: (binding, dim)} on the same eval split."""
    cfg = VDRConfig.model_validate(cfg_json)
    device = _device(cfg)
    eval_set = _eval_set(blocks)
    out = {}
    for name, (binding, dim) in embedders.items():
        encoder = evaluated_encoder(cfg, EmbedderBinding.model_validate(binding), device, dim)
        out[name] = two_stage_metrics(encoder, None, eval_set, dim=dim, depths=[],
                                      batch_size=cfg.evaluate.batch_size)[EMBED_ONLY]
        out[name]["eval_queries"] = len(eval_set.queries)
    return out


def compare_embedders(cfg: VDRConfig, embedders: dict[str, tuple[EmbedderBinding, int]], num_cpus: float = 1.0
                      ) -> dict[str, dict[str, float]]:
    """Embed-only NDCG@10, MRR@10, Recall@10 of each {name: (binding, dim)} on the eval split, in one Ray task (on a
    GPU when ``scaling.use_gpu``), each embedder as its index encodes (an index manifest's ``model`` binding) and
    at its index's dimension."""
    import ray

    if cfg.data.eval is None:
        raise FileNotFoundError("data.eval is not set: comparing embedders needs the eval split")
    task = ray.remote(_compare_task).options(num_gpus=1 if cfg.scaling.use_gpu else 0, num_cpus=num_cpus)
    plain = {name: (binding.model_dump(), dim) for name, (binding, dim) in embedders.items()}
    return ray.get(task.remote(cfg.model_dump(mode="json"), _eval_split_blocks(cfg, "eval-compare"), plain))


def run(cfg: VDRConfig) -> EvalReport:
    """Evaluate embed-only and embed + rerank on the eval split; write the reports. Returns the report."""
    import ray

    from ray_vdr.cluster import init_ray

    if cfg.data.eval is None:
        raise FileNotFoundError("data.eval is not set: two-stage evaluation needs the eval split")
    model, reranker, output = resolve(cfg)
    init_ray()
    task = ray.remote(_evaluate_task).options(num_gpus=1 if cfg.scaling.use_gpu else 0, num_cpus=1)
    blocks = _eval_split_blocks(cfg, "eval-two-stage")
    report = ray.get(task.remote(cfg.model_dump(mode="json"), blocks, model, reranker)).model_copy(
        update={"embedder": model, "reranker": reranker, "rerank_depths": cfg.evaluate.rerank_depths,
                "output": output})
    report.table = write_reports(output, report.results, report.model_dump(exclude={"results", "table", "output"}))
    logger.info("two-stage evaluation (%s):\n%s", output, report.table)
    return report
