"""Ranking metrics and the rerank order: the one implementation every evaluation and the endpoint use (no Ray).

Relevance is binary (a set of relevant items) or graded (a mapping item → gain, as the BEIR qrels' ``score``):

- NDCG@k: DCG of the top k, each item's gain (1 for binary) over log2(rank + 1), divided by the ideal DCG (the
  judged gains sorted, top k) — trec_eval's ``ndcg_cut_k``, which pytrec_eval and MTEB report;
- MRR@k (reciprocal rank of the first relevant item within k, else 0), Recall@k and MAP@k (the precision at each
  relevant item's rank within k, summed, over all relevant items: trec_eval's ``map_cut_k``), an item being relevant
  when its gain is above 0.

Binary relevance gives what Sentence Transformers' InformationRetrievalEvaluator gives; graded relevance what
pytrec_eval gives (tests/eval/test_metrics.py holds them to both). A run ranked from scores, as trec_eval ranks it
(ties by item id, descending), comes from :func:`trec_order`. Training-time evaluation
(:mod:`ray_vdr.eval.matryoshka`), the reranker's evaluation during training, two-stage evaluation and promotion
(:mod:`ray_vdr.eval.two_stage`) and the endpoint's result merge all rank and score through here.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = ["map_at_k", "mean_metrics", "ndcg_at_k", "mrr_at_k", "rank", "ranking_metrics", "recall_at_k",
           "rerank_order", "trec_order"]

Relevance = set | Mapping[Hashable, float]


def _gains(relevant: Relevance) -> Mapping[Hashable, float]:
    return relevant if isinstance(relevant, Mapping) else dict.fromkeys(relevant, 1.0)


def _relevant(relevant: Relevance) -> set:
    return {item for item, gain in relevant.items() if gain > 0} if isinstance(relevant, Mapping) else relevant


def ndcg_at_k(ranked: Sequence[Hashable], relevant: Relevance, k: int) -> float:
    gains = _gains(relevant)
    dcg = sum(max(gains.get(item, 0.0), 0.0) / math.log2(i + 2) for i, item in enumerate(ranked[:k]))
    ideal = sorted((g for g in gains.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def mrr_at_k(ranked: Sequence[Hashable], relevant: Relevance, k: int) -> float:
    hits = _relevant(relevant)
    return next((1.0 / (i + 1) for i, item in enumerate(ranked[:k]) if item in hits), 0.0)


def recall_at_k(ranked: Sequence[Hashable], relevant: Relevance, k: int) -> float:
    hits = _relevant(relevant)
    return sum(1 for item in ranked[:k] if item in hits) / len(hits) if hits else 0.0


def map_at_k(ranked: Sequence[Hashable], relevant: Relevance, k: int) -> float:
    hits = _relevant(relevant)
    found, total = 0, 0.0
    for i, item in enumerate(ranked[:k]):
        if item in hits:
            found += 1
            total += found / (i + 1)
    return total / len(hits) if hits else 0.0


MEASURES = {"ndcg": ndcg_at_k, "mrr": mrr_at_k, "recall": recall_at_k, "map": map_at_k}


def ranking_metrics(ranked: Sequence[Hashable], relevant: Relevance, ks: Sequence[int] = (10,),
                    measures: Sequence[str] = ("ndcg", "mrr", "recall")) -> dict[str, float]:
    """Each measure at each k of one ranked list: {"ndcg@10": …, "mrr@10": …, "recall@10": …} (add "map")."""
    return {f"{m}@{k}": MEASURES[m](ranked, relevant, k) for k in ks for m in measures}


def first_relevant_rank(ranked: Sequence[Hashable], relevant: Relevance) -> int:
    """The 1-based position of the first relevant item in a full ranking (``len(ranked) + 1`` if none is there): a
    measure over the whole ranking, so far less noisy on a small eval set than NDCG@10, which only the top 10 move."""
    hits = _relevant(relevant)
    return next((i + 1 for i, item in enumerate(ranked) if item in hits), len(ranked) + 1)


def trec_order(scores: Mapping[Hashable, float]) -> list:
    """Items by descending score, ties by item id descending: the order trec_eval (so pytrec_eval and MTEB) ranks a
    run in."""
    return [item for item, _ in sorted(scores.items(), key=lambda kv: (float(kv[1]), kv[0]), reverse=True)]


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over queries."""
    return {m: float(np.mean([r[m] for r in rows])) for m in rows[0]} if rows else {}


def rank(scores: np.ndarray) -> np.ndarray:
    """Indices of each row's items by descending score; ties keep the items' order (a stable sort)."""
    return np.argsort(-np.atleast_2d(scores), axis=1, kind="stable")


def rerank_order(first_stage: Sequence, scores: Sequence[float], depth: int) -> list:
    """The first ``depth`` items of a first-stage ranking by reranker score (ties keep the first-stage order), then
    the rest as retrieved. ``scores`` holds the reranker's score of each of the first ``depth`` items."""
    head = sorted(range(min(depth, len(first_stage))), key=lambda i: (-float(scores[i]), i))
    return [first_stage[i] for i in head] + list(first_stage[depth:])
