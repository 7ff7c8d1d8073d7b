"""mteb's own retrieval evaluation (``mteb.evaluate``, mteb 2.26) of a local embedder on a local t2i task, offline.

    mteb_scores("/tmp/task", "/tmp/model")  # -> {"ndcg_at_5": ..., "ndcg_at_10": ..., "main_score": ..., ...}

The task is a folder in ViDoRe's BEIR layout (``corpus``/``queries``/``qrels``, ``{split}-*.parquet``; what
``ray_vdr.eval.benchmark_fixture`` writes with ``layout="beir"``). It is declared like mteb's ViDoRe tasks
(``mteb/tasks/retrieval/eng/vidore_bench_retrieval.py``: ``category="t2i"``, ``modalities=["text", "image"]``,
ids ``query-{split}-{id}`` / ``corpus-{split}-{id}`` from their ``_load_data``), but its data comes from the
parquet files, not the hub. Scores are mteb's (``_evaluators/retrieval_metrics.py``, pytrec_eval underneath).

Settings that make mteb encode as ``IndexEncoder`` (``encode_query`` / ``encode_document``, cosine) does:

- the model is loaded by ``ray_vdr.models.load.load_embedder(embedder_binding(ModelConfig(), path))``, the same
  loader as ``IndexEncoder``: saved prompts and pixel bounds, fp32 on CPU, the image-only Qwen3-VL processor where
  torchvision is missing (a plain ``SentenceTransformer(path)`` cannot build the stock processor there);
- ``SentenceTransformerEncoderWrapper`` (``mteb/models/sentence_transformer_wrapper.py``) calls
  ``model.encode_query`` / ``model.encode_document`` (``_select_encode_function``) with ``prompt=`` the text that
  ``_resolve_prompt`` finds in ``model.prompts`` (``_resolve_model_prompts``) under the key ``"query"`` /
  ``"document"``: ``get_prompt_name`` in ``mteb/models/abs_encoder.py`` tries ``{task}-{type}``, ``{task}``,
  ``{tasktype}-{type}``, ``{tasktype}``, then ``{type}``; no such keys exist here, so it is the model's own
  query/document prompt, as ``encode_query`` / ``encode_document`` pick without one. ``TaskMetadata.prompt`` (the
  ViDoRe tasks' "Find a screenshot...") is only read by instruction wrappers (``AbsEncoder.get_instruction``), so
  it is left unset;
- the wrapper's ``ModelMeta`` from an in-memory model (``ModelMeta._from_sentence_transformer_model``,
  ``mteb/models/model_meta.py``) says ``modalities=["text"]``, and ``mteb.evaluate`` then refuses the task
  (``_check_model_modalities`` in ``mteb/evaluate.py``: "none overlap with ... document=['image']"); so it is set
  to ``["image", "text"]``, as ``_detect_modalities_from_sbert_config`` would read it from the model's
  ``sentence_bert_config.json``. Images then reach ``encode_document`` as ``{"image": PIL}`` dicts
  (``_batch_to_modality_dicts``), ``batch_size`` per call, decoded by ``datasets.Image`` like the hub's ViDoRe data;
- ranking: ``model.similarity`` (the model's ``similarity_fn_name``, cosine here) over all documents, top
  ``max(k_values)`` = 1000 (``AbsTaskRetrieval.k_values``, ``mteb/abstasks/retrieval.py``);
- no files: ``cache=None`` (no results folder, ``mteb/evaluate.py``), no ``prediction_folder``, ``co2_tracker=False``,
  datasets built in memory from pyarrow tables (no ``datasets`` cache files).

mteb rounds every retrieval metric to 5 decimals (``parse_metrics_from_scores`` in
``mteb/_evaluators/retrieval_metrics.py``): compare with an exact computation to 1e-5, not exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["mteb_scores"]


def _table(task_dir: Path, config: str, split: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((task_dir / config).glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {config}/{split}-*.parquet under {task_dir}")
    return pa.concat_tables(pq.read_table(f) for f in files)


def _load_split(task_dir: Path, split: str) -> tuple[Any, Any, dict[str, dict[str, int]]]:
    """Corpus, queries and qrels of one split, shaped as ViDoRe's ``_load_data`` shapes them."""
    from datasets import Dataset, Image

    corpus = Dataset(_table(task_dir, "corpus", split)).cast_column("image", Image())
    corpus = corpus.map(lambda x: {"id": f"corpus-{split}-{x['corpus-id']}", "modality": "image"},
                        remove_columns=["corpus-id"])
    queries = Dataset(_table(task_dir, "queries", split)).select_columns(["query-id", "query"])
    queries = queries.map(lambda x: {"id": f"query-{split}-{x['query-id']}", "text": x["query"], "modality": "text"},
                          remove_columns=["query-id", "query"])
    qrels: dict[str, dict[str, int]] = {}
    for row in _table(task_dir, "qrels", split).to_pylist():
        qid, cid = f"query-{split}-{row['query-id']}", f"corpus-{split}-{row['corpus-id']}"
        qrels.setdefault(qid, {})[cid] = int(row["score"])
    return corpus, queries, qrels


def _task(task_dir: Path, main_score: str, split: str):
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalT2IRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="LocalT2IRetrieval",
            description=f"Retrieve the pages relevant to each question (local task {task_dir}).",
            reference=None,
            dataset={"path": str(task_dir), "revision": "local"},
            type="DocumentUnderstanding",
            category="t2i",
            eval_splits=[split],
            eval_langs=["eng-Latn"],
            main_score=main_score,
            date=None,
            domains=None,
            task_subtypes=["Image Text Retrieval"],
            license=None,
            annotations_creators="derived",
            dialect=[],
            modalities=["text", "image"],
            sample_creation="found",
            bibtex_citation="",
        )

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            corpus, queries, qrels = _load_split(task_dir, split)
            self.corpus, self.queries, self.relevant_docs = {split: corpus}, {split: queries}, {split: qrels}
            self.data_loaded = True

    return LocalT2IRetrieval()


def _wrapped(model_path: Path, model: Any = None):
    from mteb.models import SentenceTransformerEncoderWrapper

    from ray_vdr.config import ModelConfig
    from ray_vdr.models.load import embedder_binding, load_embedder

    model = model or load_embedder(embedder_binding(ModelConfig(), str(model_path)))
    wrapper = SentenceTransformerEncoderWrapper(model)
    wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(
        update={"name": f"local/{model_path.name}", "revision": "local", "modalities": ["image", "text"]})
    return wrapper


def mteb_scores(task_dir: str | Path, model_path: str | Path, *, main_score: str = "ndcg_at_10",
                split: str = "test", batch_size: int = 8, model: Any = None) -> dict[str, float]:
    """mteb's scores for the embedder at ``model_path`` on the local task under ``task_dir`` (one split).

    ``model``: an already loaded SentenceTransformer for ``model_path`` (default: loaded as ``IndexEncoder`` does).
    Returns every numeric score of the split's single subset (``ndcg_at_10``, ``main_score``, ``recall_at_5``, ...).
    """
    import mteb

    task_dir, model_path = Path(task_dir), Path(model_path)
    result = mteb.evaluate(_wrapped(model_path, model), _task(task_dir, main_score, split), cache=None,
                           overwrite_strategy="always", co2_tracker=False, show_progress_bar=False,
                           encode_kwargs={"batch_size": batch_size, "show_progress_bar": False})
    if result.exceptions:
        raise RuntimeError(f"mteb failed: {result.exceptions}")
    (scores,) = result.task_results[0].scores[split]
    return {k: float(v) for k, v in scores.items() if isinstance(v, int | float) and not isinstance(v, bool)}
