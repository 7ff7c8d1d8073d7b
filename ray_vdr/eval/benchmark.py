"""``ray-vdr benchmark``: public retrieval benchmarks (ViDoRe / MTEB layouts) scored as their leaderboards score them.

For each model and task::

    corpus files ─► the corpus job (Ray Data: decode, embed at full dimension, Parquet shards), cached per dataset
                    and model under ``benchmark.cache``: a rerun, or a later benchmark of the same model, embeds
                    nothing; an interrupted one embeds only what is missing
                 ─► a scoring task (Ray; a GPU when the cluster has one): encode the queries once, and at each
                    Matryoshka dimension truncate, rank every corpus page (trec_eval's tie order), and rerank each
                    query's top candidates at each depth; graded NDCG@k as pytrec_eval / MTEB, MRR, recall, MAP
                 ─► ``<output>/results/<model>/<task>.json`` (a rerun skips tasks scored with the same settings)

then the report (:mod:`ray_vdr.eval.benchmark_report`): leaderboard-shaped Markdown and JSON, per language, a plot.
The scoring core (:func:`score_task`) takes arrays, qrels and an encoder; it uses no Ray. A multi-vector embedder's
corpus is a multi-vector index (its token vectors as ``index.late`` stores and pools them), scored by exact MaxSim
of every query against every page's stored token vectors at each dimension.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_vdr.config import BenchmarkModel, VDRConfig
from ray_vdr.eval.benchmark_data import BenchmarkTask, QuerySet, read_queries, resolve_tasks
from ray_vdr.eval.matryoshka import truncated
from ray_vdr.eval.metrics import mean_metrics, ranking_metrics, rerank_order, trec_order
from ray_vdr.models.binding import EmbedderBinding
from ray_vdr.storage import is_file, read_json, write_bytes

logger = logging.getLogger(__name__)

KS = (1, 5, 10)
FIRST_STAGE = 100  # candidates ranked per query, or the deepest rerank (the measures here stop at 10)


def setting_name(dim: int, depth: int | None = None) -> str:
    return f"dim {dim}" + (f" + rerank@{depth}" if depth else "")


# ---------------------------------------------------------------------------------------------------------------------
# scoring (no Ray)


def first_stage(scores: np.ndarray, ids: list[str], depth: int = FIRST_STAGE) -> list[list[str]]:
    """Each query's top ``depth`` corpus ids by its row of ``scores`` (queries x corpus: cosine, or MaxSim) in
    trec_eval's order (score descending, ties by id descending); items tied with the last one kept are all ranked, so
    a tie never depends on the cut."""
    depth = min(depth, len(ids))
    out = []
    for row in scores:
        kth = np.partition(row, len(row) - depth)[len(row) - depth] if depth < len(row) else row.min()
        keep = np.flatnonzero(row >= kth)
        out.append(trec_order({ids[j]: float(row[j]) for j in keep})[: max(depth, 1)])
    return out


def _metrics(ranked: list[str], gains: dict[str, float]) -> dict[str, float]:
    m = ranking_metrics(ranked, gains, ks=KS, measures=("ndcg", "recall"))
    m |= ranking_metrics(ranked, gains, ks=(10,), measures=("mrr", "map"))
    return m


def _means(rows: dict[str, dict[str, float]], languages: dict[str, str]) -> tuple[dict, dict]:
    """(the task's scores, per language). A multilingual task scores as MTEB scores it: the mean of its language
    subsets' means (each subset: that language's queries against the whole corpus)."""
    by_lang: dict[str, list] = {}
    for qid, r in rows.items():
        if qid in languages:
            by_lang.setdefault(languages[qid], []).append(r)
    per_lang = {lang: mean_metrics(rs) for lang, rs in sorted(by_lang.items())}
    if not per_lang or len(by_lang) == 1 and len(by_lang[next(iter(by_lang))]) == len(rows):
        return mean_metrics(list(rows.values())), per_lang
    return mean_metrics(list(per_lang.values())), per_lang


def score_task(queries: QuerySet, q_full: np.ndarray | list[np.ndarray], pages: np.ndarray | list[np.ndarray],
               ids: list[str], rows: np.ndarray, dims: list[int], depths: list[int], rerank=None) -> dict[str, Any]:
    """{"scores": {setting: metrics}, "by_language": {setting: {language: metrics}}} for queries (``q_full``, full
    dimension, in ``queries`` order) against the corpus ``ids``, whose vectors are ``pages[rows]`` (two ids may
    share a page); token vectors (lists of arrays) are scored by MaxSim. ``rerank(qid, [corpus ids]) -> scores``
    reorders the top of each depth."""
    qids = list(queries.queries)
    settings, languages = {}, {}
    for dim in dims:
        if isinstance(pages, list):
            from ray_vdr.models.multivector import maxsim_scores

            scores = maxsim_scores(q_full, [pages[r] for r in rows], dim)
        else:
            scores = truncated(q_full, dim) @ truncated(pages, dim)[rows].T
        ranked = first_stage(scores, ids, max([FIRST_STAGE, *depths]))
        variants = {setting_name(dim): ranked}
        if rerank is not None:
            for depth in depths:
                variants[setting_name(dim, depth)] = [
                    rerank_order(r, rerank(qid, r[:depth]), depth) for qid, r in zip(qids, ranked, strict=True)]
        for name, lists in variants.items():
            per_query = {qid: _metrics(r, queries.qrels[qid]) for qid, r in zip(qids, lists, strict=True)}
            settings[name], languages[name] = _means(per_query, queries.languages)
    return {"scores": settings, "by_language": languages if queries.languages else {}}


# ---------------------------------------------------------------------------------------------------------------------
# the corpus: the corpus job's output, read back as (corpus id → page vector)


def _live_pages(index: str, tokens: bool = False) -> pa.Table:
    from ray_vdr.corpus.store import PAGES, read_ids
    from ray_vdr.storage import read_table

    live = set(read_ids(index).filter(pc.field("live")).column("key").to_pylist())
    pages = read_table(f"{index}/{PAGES}", columns=["key", "doc_id", "content", "embedding"] + ["tokens"] * tokens)
    return pages.filter(pc.is_in(pages.column("key"), pa.array(sorted(live), pa.string())))


def corpus_rows(task: BenchmarkTask, pages: pa.Table) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """(corpus ids, the page row of each, counts). BEIR: each corpus id; an id whose image repeats another's was
    stored once (pages are keyed by content) and is mapped to that page by hashing its image. Single table: the
    distinct page images, by ``image_filename`` (else by content key)."""
    from ray_vdr.corpus.pages import page_key
    from ray_vdr.data.images import ImageRejected, image_bytes
    from ray_vdr.eval.benchmark_data import read_columns

    content = pages.column("content").to_pylist()
    if task.layout == "single":
        ids = [str(d) for d in pages.column("doc_id").to_pylist()] if task.id_column else content
        return ids, np.arange(len(ids)), {"duplicates": 0}
    doc_ids = [str(d) for d in pages.column("doc_id").to_pylist()]
    row_of = {d: i for i, d in enumerate(doc_ids)}
    by_content = {c: i for i, c in enumerate(content)}
    col = task.id_column
    all_ids = [str(i) for i in read_columns(task.files["corpus"], [col]).column(col).to_pylist()]
    missing = [i for i in all_ids if i not in row_of]
    duplicates = 0
    if missing:  # rare: read the images of the missing ids only, in batches
        import pyarrow.parquet as pq

        from ray_vdr.storage import fs_path

        wanted = set(missing)
        for f in task.files["corpus"]:
            fs, path = fs_path(f)
            with fs.open_input_file(path) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=64, columns=[col, "image"]):
                    for cid, img in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                        if str(cid) in wanted:
                            try:
                                hit = by_content.get(page_key(image_bytes(img)))
                            except ImageRejected:
                                hit = None
                            if hit is not None:
                                row_of[str(cid)] = hit
                                duplicates += 1
    ids = [i for i in all_ids if i in row_of]
    return ids, np.asarray([row_of[i] for i in ids], dtype=np.int64), {"duplicates": duplicates}


class _Reranker:
    """Reranker scores of (query, page) pairs, each pair scored once across dimensions and depths."""

    def __init__(self, model, index: str, pages: pa.Table, task_ids: list[str], rows: np.ndarray,
                 queries: dict[str, str], batch_size: int):
        self.model, self.index, self.queries, self.batch_size = model, index, queries, batch_size
        self.key_of = dict(zip(task_ids, pages.column("key").take(pa.array(rows)).to_pylist(), strict=True))
        self.scores: dict[tuple[str, str], float] = {}
        self.images: dict[str, Any] = {}
        self.pairs = 0

    def prefetch(self, wanted: dict[str, list[str]]) -> None:
        """Score every (query, candidate) pair not scored yet, in batches; images read once per page."""
        from PIL import Image

        from ray_vdr.corpus.store import PAGES
        from ray_vdr.storage import read_table

        todo = [(q, c) for q, cs in wanted.items() for c in cs if (q, c) not in self.scores]
        need = sorted({self.key_of[c] for _, c in todo} - set(self.images))
        if need:
            t = read_table(f"{self.index}/{PAGES}", columns=["key", "image"], filters=[("key", "in", need)])
            for key, data in zip(t.column("key").to_pylist(), t.column("image").to_pylist(), strict=True):
                self.images[key] = Image.open(io.BytesIO(data)).convert("RGB")
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            s = self.model.predict([(self.queries[q], self.images[self.key_of[c]]) for q, c in chunk],
                                   batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
            self.scores.update(zip(chunk, np.asarray(s, dtype=np.float32).reshape(-1).tolist(), strict=True))
            self.pairs += len(chunk)

    def __call__(self, qid: str, candidates: list[str]) -> list[float]:
        self.prefetch({qid: candidates})
        return [self.scores[(qid, c)] for c in candidates]


def _score_remote(cfg_json: dict, model: dict, binding: dict, task: dict, index: str, dims: list[int]) -> dict:
    """Runs as one Ray task: read the queries, the corpus vectors and the qrels, encode, score."""
    from ray_vdr.cluster import worker_device, worker_logging
    from ray_vdr.corpus.late import unpack_tokens
    from ray_vdr.corpus.store import read_manifest
    from ray_vdr.models.encoder import IndexEncoder
    from ray_vdr.models.load import Runtime, load_reranker

    worker_logging()
    cfg = VDRConfig.model_validate(cfg_json)
    bc = cfg.benchmark
    task = BenchmarkTask(**task)
    device = worker_device(cfg.scaling.use_gpu, bc.cpus)
    t0 = time.perf_counter()
    queries = read_queries(task, bc.max_queries)
    late = read_manifest(index).late
    pages = _live_pages(index, tokens=late is not None)
    ids, rows, counts = corpus_rows(task, pages)
    if not ids:
        raise ValueError(f"benchmark task {task.name}: no page of its corpus could be embedded (every one rejected: "
                         f"{index}/rejects)")
    if late is not None:  # a multi-vector index: each page's stored token vectors
        vectors = [unpack_tokens(b, late.token_dim, late.storage) for b in pages.column("tokens").to_pylist()]
        full = late.token_dim
    else:
        vectors = np.asarray(pages.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                             dtype=np.float32).reshape(pages.num_rows, -1)
        full = vectors.shape[1]
    encoder = IndexEncoder(EmbedderBinding.model_validate(binding), Runtime(cfg.model.dtype,
                                                                          cfg.model.attn_implementation, device))
    t1 = time.perf_counter()
    # the pages' dimension: the model's own, before any truncation saved with it (Matryoshka dims are cut from it)
    q = encoder.encode_queries(list(queries.queries.values()), full, bc.batch_size)
    t2 = time.perf_counter()
    rerank = None
    if model.get("reranker"):
        m = cfg.reranker.model
        rr = load_reranker(model["reranker"], Runtime(m.dtype, m.attn_implementation, device),
                           min_pixels=m.min_pixels, max_pixels=m.max_pixels, trust_remote_code=m.trust_remote_code)
        rerank = _Reranker(rr, index, pages, ids, rows, queries.queries, bc.batch_size)
    out = score_task(queries, q, vectors, ids, rows, dims, bc.rerank_depths, rerank)
    return {**out, "queries": len(queries.queries), "corpus": len(ids), "pages": pages.num_rows, **counts,
            "languages_present": sorted(set(queries.languages.values())), "device": device,
            "seconds": {"load": round(t1 - t0, 2), "encode_queries": round(t2 - t1, 2),
                        "score": round(time.perf_counter() - t2, 2)},
            "rerank_pairs": rerank.pairs if rerank else 0}


# ---------------------------------------------------------------------------------------------------------------------
# the job


def models_of(cfg: VDRConfig) -> list[BenchmarkModel]:
    """The configured models, each named; none configured: the base model and this config's trained embedder (with
    its trained reranker), those that exist."""
    from ray_vdr.models.load import trained_reranker

    models = list(cfg.benchmark.models)
    if not models:
        trained = cfg.run.uri("model")
        models = [BenchmarkModel(name="base", embedder=cfg.model.name_or_path)]
        if is_file(f"{trained}/modules.json"):
            models.append(BenchmarkModel(name="finetuned", embedder=trained, reranker=trained_reranker(cfg)))
    return [m if m.name else m.model_copy(update={"name": posixpath.basename(m.embedder.rstrip("/"))})
            for m in models]


def _dims(cfg: VDRConfig, full: int) -> list[int]:
    dims = cfg.benchmark.dims or [d for d in cfg.train.matryoshka_dims or [] if d <= full] or [full]
    return sorted({min(d, full) for d in dims}, reverse=True)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def embed_corpus(cfg: VDRConfig, task: BenchmarkTask, model: BenchmarkModel, binding: EmbedderBinding,
                 full_dim: int) -> tuple[str, int]:
    """The task's corpus embedded by the corpus job under the cache, one index per dataset and encoding (the model's
    identity, prompts, pixel bounds): (its folder, pages embedded now)."""
    from ray_vdr.corpus.embed import run as embed

    cache = cfg.benchmark.cache or f"{cfg.run.storage_path.rstrip('/')}/benchmark-cache"
    where = hashlib.blake2b(task.root.encode(), digest_size=4).hexdigest()
    spec = binding.model_dump_json(exclude={"path"}) + (cfg.index.late.model_dump_json(exclude={"candidates"})
                                                        if binding.multi_vector else "")
    encoding = hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()
    out = f"{cache.rstrip('/')}/{_slug(task.name)}-{where}/{encoding}"
    ix = cfg.index.model_copy(update={
        "sources": task.corpus_files, "output": out, "model": model.embedder, "mode": "sync", "dim": full_dim,
        "metadata": None, "parquet_image_column": "image", "parquet_id_column": task.id_column,
        "parquet_text_column": None, "index_type": "flat", "quantization": "none", "shards": 1})
    result = embed(cfg.model_copy(update={"index": ix}))
    s = result.summary
    logger.info("corpus of %s for %s: %d pages embedded now, %d before, %d rejected (%s)", task.name, model.name,
                s.pages_embedded, s.pages_done_before, s.pages_rejected, out)
    return out, s.pages_embedded


def _rejects(index: str) -> list[dict[str, Any]]:
    from ray_vdr.corpus.store import REJECTS, read_manifest
    from ray_vdr.storage import read_table

    if read_manifest(index) is None:
        return []
    try:
        t = read_table(f"{index}/{REJECTS}", columns=["doc_id", "page", "reason", "detail"])
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return []
    return t.to_pylist()


def run(cfg: VDRConfig) -> dict[str, Any]:
    """Score every model on every task; write per-task results and the reports. Returns the report (as JSON)."""
    import ray

    from ray_vdr.cluster import init_ray
    from ray_vdr.corpus.embed import index_binding
    from ray_vdr.eval.benchmark_report import write_report
    from ray_vdr.models.load import embedding_dimension, local_model

    bc = cfg.benchmark
    tasks = resolve_tasks(bc.tasks, bc.data_dir, bc.split)
    models = models_of(cfg)
    output = bc.output or cfg.run.uri("benchmark")
    init_ray()
    score = ray.remote(_score_remote).options(num_gpus=1 if cfg.scaling.use_gpu else 0, num_cpus=bc.cpus)
    results: list[dict[str, Any]] = []
    total = len(tasks) * len(models)
    for model in models:
        binding = index_binding(cfg, model.embedder)
        full = embedding_dimension(local_model(model.embedder))
        dims = _dims(cfg, full)
        for task in tasks:
            n = len(results) + 1
            settings = {"embedder": binding.signature, "reranker": model.reranker, "dims": dims,
                        "depths": bc.rerank_depths if model.reranker else [], "max_queries": bc.max_queries,
                        "task": task.root, "split": bc.split}
            path = f"{output}/results/{_slug(model.name)}/{_slug(task.name)}.json"
            if is_file(path) and (done := read_json(path)).get("config") == settings:
                logger.info("[%d/%d] %s on %s: scored before (%s)", n, total, model.name, task.name, path)
                results.append(done)
                continue
            logger.info("[%d/%d] %s on %s: embedding the corpus", n, total, model.name, task.name)
            t0 = time.perf_counter()
            index, embedded = embed_corpus(cfg, task, model, binding, full)
            t1 = time.perf_counter()
            logger.info("[%d/%d] %s on %s: scoring", n, total, model.name, task.name)
            scored = ray.get(score.remote(cfg.model_dump(mode="json"), model.model_dump(),
                                          binding.model_dump(), asdict(task), index, dims))
            rejects = _rejects(index)
            record = {"model": model.model_dump(), "task": {k: v for k, v in asdict(task).items() if k != "files"},
                      "config": settings, **scored, "rejects": len(rejects), "reject_examples": rejects[:20],
                      "pages_embedded": embedded,
                      "index": index, "seconds": {"embed_corpus": round(t1 - t0, 2), **scored["seconds"],
                                                  "total": round(time.perf_counter() - t0, 2)}}
            write_bytes(json.dumps(record, indent=2).encode(), path)
            main = scored["scores"][setting_name(dims[0])]
            logger.info("[%d/%d] %s on %s: %s %.4f at dim %d (%d queries, %d pages, %d rejects) in %.1f s", n, total,
                        model.name, task.name, task.main_metric, main[task.main_metric], dims[0],
                        scored["queries"], scored["corpus"], len(rejects), record["seconds"]["total"])
            results.append(record)
    report = write_report(output, results, references=bc.references)
    _update_cards(report, models)
    return report


def _update_cards(report: dict[str, Any], models: list[BenchmarkModel]) -> None:
    """The benchmark section of each benchmarked model folder's card (README.md, which is no part of the model's
    fingerprint), for models with a card where this job can write; hub models are left alone."""
    from ray_vdr.eval.benchmark_report import add_to_model_card, card_section
    from ray_vdr.storage import read_bytes

    names: dict[str, list[str]] = {}
    for m in models:
        names.setdefault(m.embedder.rstrip("/"), []).append(m.name)
    for embedder, labels in names.items():
        card = f"{embedder}/README.md"
        if not is_file(card):
            continue
        try:
            write_bytes(add_to_model_card(read_bytes(card).decode(), card_section(report, labels)).encode(), card)
            logger.info("model card %s: benchmark section written", card)
        except OSError as e:  # a read-only model folder: the report stands on its own
            logger.warning("model card %s not updated: %s", card, e)
