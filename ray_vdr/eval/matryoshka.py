"""Retrieval evaluation of an embedder on the eval split at every Matryoshka dimension (training, before and after).

The eval split is laid out like the reference (each row: a query, its positive page and hard-negative pages); all
pages together form the corpus. Queries and pages are embedded once per evaluation at full dimension; each dimension
truncates, normalises and ranks the corpus by cosine similarity, scored with :mod:`ray_vdr.eval.metrics` (held to
Sentence Transformers' InformationRetrievalEvaluator by tests/eval/test_metrics.py). So evaluating 7 Matryoshka dims
costs one encoding pass, not 7. Plain arrays and PIL images in, metrics out: no Ray here.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ray_vdr.eval.metrics import first_relevant_rank, mean_metrics, rank, ranking_metrics
from ray_vdr.models.multivector import is_multi_vector_model, maxsim_scores

if TYPE_CHECKING:
    from PIL import Image
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10")


@dataclass
class EvalSet:
    queries: dict[str, str]
    corpus: dict[str, Image.Image]
    relevant: dict[str, set[str]]

    def __post_init__(self) -> None:
        unknown = {cid for rel in self.relevant.values() for cid in rel} - set(self.corpus)
        if unknown:
            raise ValueError(f"eval split: {len(unknown)} relevant page id(s) are not in the corpus, e.g. "
                             f"{sorted(unknown)[:3]}")
        if not self.queries:
            raise ValueError("eval split has no usable queries (all rows rejected?)")


def page_id(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def eval_set_from_table(table: pa.Table) -> EvalSet:
    """Build queries/corpus/relevant docs from validated rows (``row_id, query, image, negative_*`` with bytes)."""
    from PIL import Image

    image_cols = [c for c in table.column_names if c == "image" or c.startswith("negative_")]
    corpus: dict[str, Image.Image] = {}
    queries: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    cols = {c: table.column(c).to_pylist() for c in ["row_id", "query", *image_cols]}
    for i in range(table.num_rows):
        for col in image_cols:
            data = cols[col][i]
            pid = page_id(data)
            if pid not in corpus:
                corpus[pid] = Image.open(io.BytesIO(data)).convert("RGB")
            if col == "image":
                relevant.setdefault(cols["row_id"][i], set()).add(pid)
        queries[cols["row_id"][i]] = cols["query"][i]
    return EvalSet(queries, corpus, relevant)


def truncated(x: np.ndarray, dim: int) -> np.ndarray:
    """Rows cut to their first ``dim`` components and L2-normalised: a Matryoshka dimension of full-size vectors."""
    x = x[:, :dim]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class MatryoshkaRetrievalEvaluator:
    """Ranks the eval corpus for every eval query at each dimension; ``results`` after a call:
    {dim: {"ndcg@10": …, "mrr@10": …, "recall@1": …, "recall@5": …, "recall@10": …, "mean_rank": …}}, where
    ``mean_rank`` is the mean position of each query's first relevant page in the whole ranking (random: about
    (pages + 1) / 2), the measure a small eval set's learning shows first.

    Queries are encoded with ``encode_query`` and pages with ``encode_document`` (the model's prompts), as the index
    and the endpoint encode them. A multi-vector model (MultiVectorEncoder) is scored by MaxSim over its token vectors,
    each cut to the dimension.
    """

    def __init__(self, eval_set: EvalSet, dims: list[int], *, batch_size: int = 16):
        self.eval_set = eval_set
        self.dims = dims
        self.batch_size = batch_size
        self.results: dict[int, dict[str, float]] = {}

    def __call__(self, model: SentenceTransformer) -> dict[int, dict[str, float]]:
        es = self.eval_set
        qids, cids = list(es.queries), list(es.corpus)
        multi = is_multi_vector_model(model)
        kwargs = {"batch_size": self.batch_size, "show_progress_bar": False}
        if not multi:
            kwargs["convert_to_numpy"] = True
        q = model.encode_query([es.queries[i] for i in qids], **kwargs)
        c = model.encode_document([es.corpus[i] for i in cids], **kwargs)
        for d in self.dims:
            if multi:  # token vectors, scored by MaxSim
                order = rank(maxsim_scores(q, c, d))
            else:
                order = rank(truncated(np.asarray(q, np.float32), d) @ truncated(np.asarray(c, np.float32), d).T)
            rows = []
            for row, qid in zip(order, qids, strict=True):
                ranked = [cids[j] for j in row]
                rows.append(ranking_metrics(ranked[:10], es.relevant[qid], ks=(1, 5, 10))
                            | {"mean_rank": first_relevant_rank(ranked, es.relevant[qid])})
            means = mean_metrics(rows)
            self.results[d] = {m: means[m] for m in (*METRICS, "mean_rank")}
        return dict(self.results)


def eval_dims(model_dim: int | None, matryoshka_dims: list[int] | None) -> list[int]:
    if matryoshka_dims:
        return list(matryoshka_dims)
    if model_dim is None:
        raise ValueError("cannot tell the embedding dimension to evaluate at")
    return [model_dim]


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def markdown_table(before: dict[int, dict], after: dict[int, dict] | None = None) -> str:
    """One row per dim: base metrics, and finetuned metrics with the NDCG@10 gain when ``after`` is given; the mean
    rank of the first relevant page where every result has it (results saved by older versions do not)."""
    results = [*before.values(), *(after or {}).values()]
    names = [*METRICS, *(["mean_rank"] if all("mean_rank" in r for r in results) else [])]

    def cell(x: float, m: str) -> str:
        return f"{x:.1f}" if m == "mean_rank" else f"{x:.4f}"

    label = {"mean_rank": "mean rank"}
    if after is None:
        head = "| dim | " + " | ".join(label.get(m, m) for m in names) + " |"
        rows = [f"| {d} | " + " | ".join(cell(before[d][m], m) for m in names) + " |" for d in before]
    else:
        head = "| dim | " + " | ".join(f"{label.get(m, m)} base → finetuned" for m in names) + " | Δ ndcg@10 |"
        rows = [
            f"| {d} | " + " | ".join(f"{cell(before[d][m], m)} → {cell(after[d][m], m)}" for m in names)
            + f" | {after[d]['ndcg@10'] - before[d]['ndcg@10']:+.4f} |"
            for d in after
        ]
    sep = "|" + "---|" * (head.count("|") - 1)
    return "\n".join([head, sep, *rows])


def plot(before: dict[int, dict], after: dict[int, dict] | None, path: str | Path) -> None:
    """NDCG@10 against embedding dimension, base vs finetuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, res, style in (("base", before, "o--"), ("finetuned", after, "o-")):
        if res:
            dims = sorted(res)
            ax.plot(dims, [res[d]["ndcg@10"] for d in dims], style, label=label)
    ax.set_xscale("log", base=2)
    all_dims = sorted({d for res in (before, after) if res for d in res})
    ax.set_xticks(all_dims, [str(d) for d in all_dims])
    ax.minorticks_off()
    ax.set_xlabel("embedding dimension (Matryoshka truncation)")
    ax.set_ylabel("NDCG@10")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Retrieval quality by dimension")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(out_dir: str | Path, before: dict[int, dict], after: dict[int, dict] | None,
                  extra: dict[str, Any] | None = None) -> str:
    """eval.json, eval.md and eval.png in ``out_dir``. Returns the markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(before, after)
    payload = {"base": {str(d): m for d, m in before.items()},
               "finetuned": {str(d): m for d, m in (after or {}).items()}, **(extra or {})}
    (out / "eval.json").write_text(json.dumps(payload, indent=2))
    (out / "eval.md").write_text(table + "\n")
    plot(before, after, out / "eval.png")
    return table
