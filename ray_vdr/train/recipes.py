"""The training recipes, as plain records of functions: the embedder (single- or multi-vector) and the reranker.

Both run through the same machinery (ray_vdr.train.run and .worker: streaming, duplicate-free global batches,
checkpoints and resume, DeepSpeed, the per-rank audit trail). A :class:`Recipe` holds what differs:

- **embedder**: a SentenceTransformer, :func:`build_loss` — (Cached)MultipleNegativesRankingLoss inside
  MatryoshkaLoss — and retrieval evaluation at every Matryoshka dim;
- **multi_vector** (``model.kind: multi_vector``): a MultiVectorEncoder (one vector per token or image patch, MaxSim),
  Sentence Transformers' multi-vector (Cached)MNRL inside its MatryoshkaLoss, and the same retrieval evaluation;
- **reranker**: a CrossEncoder, BinaryCrossEntropyLoss over (query, page, 1/0) pairs made from each triplet
  (:func:`rerank_pairs`), and the positive's rank among its hard negatives.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ray_vdr.config import TrainConfig, VDRConfig
from ray_vdr.models.multivector import is_multi_vector_model

__all__ = ["EMBEDDER", "MULTI_VECTOR", "RECIPES", "RERANKER", "Evaluation", "Recipe", "build_loss", "rerank_metrics",
           "rerank_pairs", "rerank_samples"]


@dataclass(frozen=True)
class Evaluation:
    """What a recipe measures on the eval split while it trains (before, every ``train.eval_every``, after), how it
    prints, what the final metrics keep, and the reports saved with the model."""

    what: str
    measure: Callable[[], dict]
    table: Callable[[dict], str]
    summary: Callable[[dict, dict], dict[str, float]]
    write_reports: Callable[[Path, dict, dict], None]


@dataclass(frozen=True)
class Recipe:
    name: str
    check: Callable[[VDRConfig], None]
    """Refuse a config this recipe cannot train (in the driver, before any worker starts)."""
    build: Callable[[VDRConfig, str], Any]
    """The model, on a device."""
    loss: Callable[[Any, VDRConfig, int], Any]
    """The loss for (model, config, world size)."""
    trainer: Callable[[], type]
    """The streaming trainer class (imported in the worker)."""
    args_cls: Callable[[], type | None]
    """The training-arguments class (None: Sentence Transformers' default)."""
    schema: Callable[[list[str]], Any]
    """An empty `datasets` dataset declaring the columns the trainer's collator sees."""
    transform: Callable[[list[dict]], list[dict]] | None
    """Per-device rows → the collator's features (None: the rows as they are)."""
    prompts: Callable[[Any, list[str]], dict[str, str] | str | None]
    """The training prompts for (model, image columns)."""
    evaluation: Callable[[pa.Table, Any, VDRConfig], Evaluation]
    """The evaluation of (eval split table, model, config)."""
    before_save: Callable[[Any, VDRConfig], None]
    """Settings the saved model carries."""


# ---------------------------------------------------------------------------------------------------------------------
# The embedder


def build_loss(model, train: TrainConfig, *, gather: bool):
    """(Cached)MultipleNegativesRankingLoss, optionally inside MatryoshkaLoss. In-batch negatives span all ranks.
    A MultiVectorEncoder gets Sentence Transformers' multi-vector versions of both (MaxSim scores; the Matryoshka
    dims cut its token vectors)."""
    if is_multi_vector_model(model):
        from sentence_transformers.multi_vector_encoder.losses import (
            CachedMultiVectorMultipleNegativesRankingLoss as Cached,
        )
        from sentence_transformers.multi_vector_encoder.losses import MultiVectorMatryoshkaLoss as Matryoshka
        from sentence_transformers.multi_vector_encoder.losses import MultiVectorMultipleNegativesRankingLoss as Plain
        from sentence_transformers.multi_vector_encoder.scoring import colbert_scores, mean_colbert_scores

        # the scoring function given, not read from the model at each step: under DDP the loss holds the wrapped
        # model, which has no ``similarity``
        scores = mean_colbert_scores if model.similarity_fn_name == "meanmaxsim" else colbert_scores
        kwargs = {"similarity_fct": scores, "gather_across_devices": gather}
    else:
        from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as Matryoshka
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Plain

        from ray_vdr.train.gradcache import PageCachedMNRL as Cached  # pages collated per mini-batch (gradcache.py)

        kwargs = {"gather_across_devices": gather}
    if train.loss == "cached_mnrl":
        loss = Cached(model, mini_batch_size=train.mini_batch_size, **kwargs)
    else:
        loss = Plain(model, **kwargs)
    if train.matryoshka_dims:
        dim = model.get_embedding_dimension()
        if dim is not None and train.matryoshka_dims[0] > dim:
            raise ValueError(f"train.matryoshka_dims starts at {train.matryoshka_dims[0]} but the model outputs {dim}")
        loss = Matryoshka(model, loss, matryoshka_dims=train.matryoshka_dims)
    return loss


def _embedder_check(cfg: VDRConfig) -> None:
    if cfg.train.loss == "bce":
        raise ValueError("train.loss 'bce' trains rerankers (jobs/train_reranker.py), not the embedder")


# ---------------------------------------------------------------------------------------------------------------------
# The multi-vector embedder (model.kind: multi_vector)


def _multi_vector_check(cfg: VDRConfig) -> None:
    _embedder_check(cfg)
    if cfg.train.matryoshka_dims and cfg.train.matryoshka_dims[0] > cfg.model.token_dim:
        raise ValueError(f"train.matryoshka_dims starts at {cfg.train.matryoshka_dims[0]}, above model.token_dim "
                         f"{cfg.model.token_dim}")


def _multi_vector_trainer() -> type:
    from ray_vdr.train.trainer import StreamingMultiVectorTrainer

    return StreamingMultiVectorTrainer


def _multi_vector_args() -> type:
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainingArguments

    return MultiVectorEncoderTrainingArguments


def _build(cfg: VDRConfig, device: str, reranker: bool = False):
    """The model to train; with ``model.lora``, its LoRA adapters added (seeded by ``train.seed``: equal on every
    rank)."""
    from ray_vdr.models.load import build_model

    model = build_model(cfg.model, device=device, reranker=reranker)
    if cfg.model.lora is not None:
        from ray_vdr.models.lora import add_lora

        add_lora(model, cfg.model.lora, cfg.train.seed)
    return model


def _embedder_trainer() -> type:
    from ray_vdr.train.trainer import StreamingTrainer

    return StreamingTrainer


def _embedder_schema(image_columns: list[str]):
    """A `datasets.IterableDataset` that only declares the columns: ST reads names and prompts from it, while the
    batches themselves come from the feeder."""
    import datasets

    features = datasets.Features({"query": datasets.Value("string"), **{c: datasets.Image() for c in image_columns}})
    return datasets.IterableDataset.from_generator(_no_rows, features=features)


def _no_rows():
    """The schema dataset's generator: at module level, so that datasets' fingerprint pickles it by reference (dill
    disassembles a nested function to find its globals, printing the bytecode into every worker's log)."""
    yield from ()


def _embedder_prompts(model, image_columns: list[str]) -> dict[str, str]:
    doc_prompt = model.prompts.get("document")
    prompts = {"query": model.prompts.get("query")} | {c: doc_prompt for c in image_columns}
    return {k: v for k, v in prompts.items() if v}


def _retrieval_evaluation(table: pa.Table, model, cfg: VDRConfig) -> Evaluation:
    """Retrieval of the eval split's pages at every Matryoshka dim (the eval split's pages are the corpus)."""
    from ray_vdr.eval.matryoshka import (
        MatryoshkaRetrievalEvaluator,
        eval_dims,
        eval_set_from_table,
        markdown_table,
        write_reports,
    )

    eval_set = eval_set_from_table(table)
    dims = eval_dims(model.get_embedding_dimension(), cfg.train.matryoshka_dims)
    evaluator = MatryoshkaRetrievalEvaluator(eval_set, dims, batch_size=min(16, cfg.train.per_device_batch_size))

    def summary(before: dict, after: dict) -> dict[str, float]:
        d = dims[0]
        return {"eval_dim": d, "ndcg@10_base": before[d]["ndcg@10"], "ndcg@10": after[d]["ndcg@10"],
                "mrr@10": after[d]["mrr@10"], "recall@10": after[d]["recall@10"]}

    def reports(out: Path, before: dict, after: dict) -> None:
        write_reports(out, before, after, {"eval_queries": len(eval_set.queries), "eval_corpus": len(eval_set.corpus)})

    return Evaluation("retrieval", lambda: evaluator(model), markdown_table, summary, reports)


def _truncate(model, cfg: VDRConfig) -> None:
    model.truncate_dim = cfg.output.truncate_dim


# ---------------------------------------------------------------------------------------------------------------------
# The reranker


def rerank_pairs(rows: list[dict]) -> list[dict]:
    """A reranker's training features from triplet rows: (query, positive, 1) and (query, negative_i, 0) each."""
    pairs = []
    for r in rows:
        pairs.append({"query": r["query"], "document": r["image"], "label": 1.0})
        pairs.extend({"query": r["query"], "document": r[c], "label": 0.0} for c in r if c.startswith("negative_"))
    return pairs


def rerank_samples(table: pa.Table) -> list[dict]:
    """Each validated eval row as {query, positive: [page], negative: [pages]} (PIL images)."""
    from PIL import Image

    def img(data: bytes):
        return Image.open(io.BytesIO(data)).convert("RGB")

    negs = sorted(c for c in table.column_names if c.startswith("negative_"))
    return [{"query": r["query"], "positive": [img(r["image"])], "negative": [img(r[c]) for c in negs]}
            for r in table.to_pylist()]


def _reranker_check(cfg: VDRConfig) -> None:
    if cfg.train.loss != "bce":
        raise ValueError(f"a reranker trains with train.loss 'bce', not {cfg.train.loss!r}")


def _reranker_loss(model, cfg: VDRConfig, world: int):
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    return BinaryCrossEntropyLoss(model)


def _reranker_trainer() -> type:
    from ray_vdr.train.trainer import StreamingCrossEncoderTrainer

    return StreamingCrossEncoderTrainer


def _reranker_args() -> type:
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

    return CrossEncoderTrainingArguments


def _reranker_schema(image_columns: list[str]):
    """An empty map-style dataset declaring the pair columns (CrossEncoderTrainer refuses iterable ones; the batches
    come from the feeder)."""
    import datasets

    features = datasets.Features({"query": datasets.Value("string"), "document": datasets.Image(),
                                  "label": datasets.Value("float32")})
    return datasets.Dataset.from_dict({"query": [], "document": [], "label": []}, features=features)


def _reranker_prompts(model, image_columns: list[str]) -> str | None:
    """The model's default prompt (the judge instruction): training must see pairs as predict() renders them."""
    name = model.default_prompt_name
    return model.prompts.get(name) or None if name else None


def rerank_metrics(reranker, samples: list[dict], batch_size: int = 16) -> dict[str, float]:
    """NDCG@10 and MRR@10 of a reranker ranking each sample's positive among its hard negatives (samples as
    :func:`rerank_samples` makes them)."""
    import numpy as np

    from ray_vdr.eval.metrics import mean_metrics, rank, ranking_metrics

    pairs = [(s["query"], page) for s in samples for page in (*s["positive"], *s["negative"])]
    scores = np.asarray(reranker.predict(pairs, batch_size=batch_size, convert_to_numpy=True,
                                         show_progress_bar=False), dtype=np.float32).reshape(-1)
    rows, at = [], 0
    for s in samples:
        n = len(s["positive"]) + len(s["negative"])
        rows.append(ranking_metrics(rank(scores[at:at + n])[0].tolist(), set(range(len(s["positive"])))))
        at += n
    return {m: v for m, v in mean_metrics(rows).items() if m in ("ndcg@10", "mrr@10")}


def _rerank_evaluation(table: pa.Table, model, cfg: VDRConfig) -> Evaluation:
    """Each eval query's positive ranked among its hard negatives by the reranker."""
    samples = rerank_samples(table)
    batch_size = min(16, cfg.train.per_device_batch_size)
    names = ("ndcg@10", "mrr@10")

    def table_of(results: dict) -> str:
        return "| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n" + " | ".join(
            f"{results[m]:.4f}" for m in names).join(("| ", " |"))

    def summary(before: dict, after: dict) -> dict[str, float]:
        return {"ndcg@10_base": before["ndcg@10"], "ndcg@10": after["ndcg@10"], "mrr@10": after["mrr@10"]}

    def reports(out: Path, before: dict, after: dict) -> None:
        rows = [f"| {m} | {before[m]:.4f} | {after[m]:.4f} | {after[m] - before[m]:+.4f} |" for m in names]
        head = ["| metric | base | finetuned | Δ |", "|---|---|---|---|"]
        (out / "eval.md").write_text("\n".join([*head, *rows]) + "\n")
        (out / "eval.json").write_text(json.dumps({"base": before, "finetuned": after, "eval_queries": len(samples)},
                                                  indent=2))

    return Evaluation("reranking", lambda: rerank_metrics(model, samples, batch_size), table_of, summary, reports)


def _nothing(model, cfg: VDRConfig) -> None:
    pass


def _embedder_loss(model, cfg: VDRConfig, world: int):
    return build_loss(model, cfg.train, gather=world > 1)


def _reranker_build(cfg: VDRConfig, device: str):
    return _build(cfg, device, reranker=True)


EMBEDDER = Recipe(name="embedder", check=_embedder_check, build=_build, loss=_embedder_loss,
                  trainer=_embedder_trainer, args_cls=lambda: None, schema=_embedder_schema, transform=None,
                  prompts=_embedder_prompts, evaluation=_retrieval_evaluation, before_save=_truncate)
MULTI_VECTOR = Recipe(name="multi_vector", check=_multi_vector_check, build=_build, loss=_embedder_loss,
                      trainer=_multi_vector_trainer, args_cls=_multi_vector_args, schema=_embedder_schema,
                      transform=None, prompts=_embedder_prompts, evaluation=_retrieval_evaluation,
                      before_save=_truncate)
RERANKER = Recipe(name="reranker", check=_reranker_check, build=_reranker_build, loss=_reranker_loss,
                  trainer=_reranker_trainer, args_cls=_reranker_args, schema=_reranker_schema, transform=rerank_pairs,
                  prompts=_reranker_prompts, evaluation=_rerank_evaluation, before_save=_nothing)
RECIPES: dict[str, Recipe] = {r.name: r for r in (EMBEDDER, MULTI_VECTOR, RERANKER)}
