"""Retrieval evaluation at every Matryoshka dimension with Sentence Transformers' InformationRetrievalEvaluator.

The eval split is laid out like the reference (each row: a query, its positive page and hard-negative pages); all
pages together form the corpus. Queries and pages are embedded once per evaluation at full dimension and each
dimension's evaluator reads truncated copies, so evaluating 7 Matryoshka dims costs one encoding pass, not 7.
Plain arrays and PIL images in, metrics out: no Ray here.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from PIL import Image
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

_IR_LOGGER = "sentence_transformers.sentence_transformer.evaluation.information_retrieval"

# metric key in InformationRetrievalEvaluator output → name in our reports
METRICS = {"ndcg@10": "ndcg@10", "mrr@10": "mrr@10", "recall@1": "recall@1", "recall@5": "recall@5",
           "recall@10": "recall@10"}


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


class _EmbeddingCache:
    """Full-dimension embeddings of one evaluation pass, shared by the per-dimension evaluators."""

    def __init__(self) -> None:
        self.store: dict[str, Any] = {}


def _cached_ir_evaluator_cls():
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    class CachedIREvaluator(InformationRetrievalEvaluator):
        """InformationRetrievalEvaluator that truncates embeddings computed once at full dimension."""

        def __init__(self, *args, cache: _EmbeddingCache, **kwargs):
            super().__init__(*args, **kwargs)
            self.cache = cache

        def embed_inputs(self, model, sentences, encode_fn_name=None, prompt_name=None, prompt=None, **kwargs):
            key = encode_fn_name or "encode"
            if key not in self.cache.store:
                dim, self.truncate_dim = self.truncate_dim, None
                try:
                    self.cache.store[key] = super().embed_inputs(model, sentences, encode_fn_name, prompt_name,
                                                                 prompt, **kwargs)
                finally:
                    self.truncate_dim = dim
            full = self.cache.store[key]
            return full[:, : self.truncate_dim] if self.truncate_dim else full

    return CachedIREvaluator


class MatryoshkaRetrievalEvaluator:
    """Runs InformationRetrievalEvaluator at each dimension; callable like an ST evaluator (returns flat metrics).

    ``results`` after a call: {dim: {"ndcg@10": …, "mrr@10": …, "recall@1": …, "recall@5": …, "recall@10": …}}.
    """

    def __init__(self, eval_set: EvalSet, dims: list[int], *, name: str = "vdr", batch_size: int = 16):
        cls = _cached_ir_evaluator_cls()
        self.cache = _EmbeddingCache()
        self.dims = dims
        self.name = name
        self.evaluators = {
            d: cls(eval_set.queries, eval_set.corpus, eval_set.relevant, cache=self.cache, truncate_dim=d,
                   name=f"{name}_{d}", batch_size=batch_size, mrr_at_k=[10], ndcg_at_k=[10],
                   accuracy_at_k=[1, 5, 10], precision_recall_at_k=[1, 5, 10], map_at_k=[10], write_csv=False)
            for d in dims
        }
        self.primary_metric = f"{name}_{dims[0]}_cosine_ndcg@10"
        self.greater_is_better = True
        self.results: dict[int, dict[str, float]] = {}

    def __call__(self, model: SentenceTransformer, output_path: str | None = None, epoch: int = -1,
                 steps: int = -1) -> dict[str, float]:
        self.cache.store.clear()  # the weights may have changed since the last call
        flat: dict[str, float] = {}
        ir_logger = logging.getLogger(_IR_LOGGER)
        level = ir_logger.level
        ir_logger.setLevel(logging.WARNING)  # one table for all dims replaces its per-metric lines
        try:
            for d, ev in self.evaluators.items():
                metrics = ev(model, output_path=output_path, epoch=epoch, steps=steps)
                prefix = f"{self.name}_{d}_cosine_"
                self.results[d] = {ours: float(metrics[prefix + theirs]) for theirs, ours in METRICS.items()}
                flat.update(metrics)
        finally:
            ir_logger.setLevel(level)
            self.cache.store.clear()
        return flat


def evaluate(model: SentenceTransformer, eval_set: EvalSet, dims: list[int], batch_size: int = 16) -> dict[int, dict]:
    ev = MatryoshkaRetrievalEvaluator(eval_set, dims, batch_size=batch_size)
    ev(model)
    return ev.results


def eval_dims(model_dim: int | None, matryoshka_dims: list[int] | None) -> list[int]:
    if matryoshka_dims:
        return list(matryoshka_dims)
    if model_dim is None:
        raise ValueError("cannot tell the embedding dimension to evaluate at")
    return [model_dim]


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def markdown_table(before: dict[int, dict], after: dict[int, dict] | None = None) -> str:
    """One row per dim: base metrics, and finetuned metrics with the NDCG@10 gain when ``after`` is given."""
    names = list(METRICS.values())
    if after is None:
        head = "| dim | " + " | ".join(names) + " |"
        rows = [f"| {d} | " + " | ".join(f"{before[d][m]:.4f}" for m in names) + " |" for d in before]
    else:
        head = "| dim | " + " | ".join(f"{m} base → finetuned" for m in names) + " | Δ ndcg@10 |"
        rows = [
            f"| {d} | " + " | ".join(f"{before[d][m]:.4f} → {after[d][m]:.4f}" for m in names)
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
