"""Ranking metrics and the rerank order: the one implementation every evaluation and the endpoint use (no Ray).

Binary relevance, as in Sentence Transformers' InformationRetrievalEvaluator (tests/eval/test_metrics.py holds them
to it): NDCG@k with the ideal DCG of min(|relevant|, k) hits, MRR@k (reciprocal rank of the first relevant item
within k, else 0) and Recall@k. Training-time evaluation (:mod:`ray_vdr.eval.matryoshka`), the reranker's evaluation
during training, two-stage evaluation and promotion (:mod:`ray_vdr.eval.two_stage`) and the endpoint's result merge
all rank and score through here.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["mean_metrics", "ndcg_at_k", "mrr_at_k", "rank", "ranking_metrics", "recall_at_k", "rerank_order"]


def ndcg_at_k(ranked: Sequence[Hashable], relevant: set, k: int) -> float:
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(ranked[:k]) if item in relevant)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / idcg if idcg else 0.0


def mrr_at_k(ranked: Sequence[Hashable], relevant: set, k: int) -> float:
    return next((1.0 / (i + 1) for i, item in enumerate(ranked[:k]) if item in relevant), 0.0)


def recall_at_k(ranked: Sequence[Hashable], relevant: set, k: int) -> float:
    return sum(1 for item in ranked[:k] if item in relevant) / len(relevant) if relevant else 0.0


def ranking_metrics(ranked: Sequence[Hashable], relevant: set, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """NDCG@k, MRR@k and Recall@k of one ranked list, for each k: {"ndcg@10": …, "mrr@10": …, "recall@10": …}."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at_k(ranked, relevant, k)
        out[f"mrr@{k}"] = mrr_at_k(ranked, relevant, k)
        out[f"recall@{k}"] = recall_at_k(ranked, relevant, k)
    return out


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
