"""`ray-vdr make-training-data` (jobs/make_training_data.py): unlabeled documents in, a training set out.

Pipeline (each stage streams on Ray Data and publishes parts named by their rows' ids; the driver holds counts,
document ids and the small sets shown below, never pages)::

    queries.sources ─► the corpus job (ray_vdr.corpus.embed) with the base embedder: pages, their text, an index
                   ─► lines on many pages (a groupby count) ─► the boilerplate set
                   ─► generate (text / callable tasks, or a VLM) → per-query filters → generated/
                   ─► queries generated for several pages (a groupby count) ─► the duplicates set
                   ─► the split: by document, or page ranges inside large documents (ray_vdr.queries.split)
                   ─► consistency filter, hard negatives, train or eval (actor pool) → train/, eval/ + rejects
                   ─► rejected-pages.parquet, card.json, README.md

Output under ``queries.output``: ``corpus/`` (the base embedder's index of the pages), ``generated/`` (each page's
queries, kept or rejected with the reason, or why it has none), ``rejects/`` (queries rejected later: duplicates,
in the gap around an eval page range, inconsistent, too few negatives), ``train/`` and ``eval/``,
``rejected-pages.parquet``, ``make.json`` (the settings: a rerun with others is refused) and the card.

Resumable and exactly-once: a rerun skips the pages already generated for and the queries already mined or rejected,
and a final pass keeps each page's candidates and each row once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ray_vdr.config import VDRConfig
from ray_vdr.queries.generate import GENERATED, REJECTS
from ray_vdr.queries.split import EVAL, TRAIN, SplitPlan, plan_split, short_eval_warning
from ray_vdr.storage import is_file, list_parts, read_bytes, read_table, write_bytes, write_table

logger = logging.getLogger(__name__)

__all__ = ["TrainingDataResult", "run"]

SETTINGS_FILE = "make.json"
REJECTED_PAGES = "rejected-pages.parquet"


@dataclass
class TrainingDataResult:
    output: str
    summary: dict[str, Any]
    card: str


def _column(output: str, folder: str, columns: list[str]) -> pa.Table:
    """Some columns of every part under ``output/folder`` (an empty table when there are none)."""
    parts = [read_table(f"{output}/{folder}/{name}", columns) for name in list_parts(f"{output}/{folder}")]
    return pa.concat_tables(parts) if parts else pa.table({c: pa.array([], pa.string()) for c in columns})


def _base_model(cfg: VDRConfig) -> str:
    from ray_vdr.models.load import ensure_model_files

    if cfg.queries.base_model:
        return cfg.queries.base_model
    if cfg.model.builds_reranker:
        raise ValueError("queries.base_model is unset and model builds a reranker: name an embedder")
    return ensure_model_files(cfg.model)


def _settings(cfg: VDRConfig, model: str, fingerprint: str) -> dict[str, Any]:
    """What shapes the data: a rerun into the same output must use the same, or the splits would mix two datasets."""
    q = cfg.queries
    keep = ("generator", "callable", "per_page", "text_kinds", "min_words", "max_words", "max_chars",
            "boilerplate_share", "boilerplate_min_pages", "dedupe", "consistency_k", "num_negatives", "eval_negatives",
            "exclude_same_document", "eval_fraction", "split", "min_eval_rows", "page_gap", "seed")
    vlm = q.vlm.model_dump(include={"model", "prompt", "max_tokens", "temperature", "max_pixels"})
    mine = cfg.mine.model_dump(include={"rank_min", "rank_max", "margin", "duplicate_similarity", "sampling"})
    return {**{k: getattr(q, k) for k in keep}, "vlm": vlm if q.generator == "vlm" else None, "mine": mine,
            "base_model": model, "base_fingerprint": fingerprint}


def _check_settings(output: str, settings: dict[str, Any]) -> None:
    from ray_vdr.corpus.store import IndexMismatch

    uri = f"{output}/{SETTINGS_FILE}"
    if is_file(uri):
        earlier = json.loads(read_bytes(uri))
        changed = sorted(k for k in settings if earlier.get(k) != settings[k])
        if changed:
            raise IndexMismatch(f"{output} holds training data made with other settings ({', '.join(changed)} "
                                "differ): write into a new queries.output, or restore the settings to resume")
    write_bytes(json.dumps(settings, indent=2).encode(), uri)


def _shuffle_partitions(n_pages: int) -> int:
    """Partitions of a groupby over a corpus's lines or queries: one per 2,000 pages, at most Ray Data's default
    (200), whose fixed cost per partition dominates small corpora (a minute of a 500-page run on 2 CPUs)."""
    return max(1, min(200, -(-n_pages // 2000)))


def _boilerplate(pages, n_pages: int, cfg: VDRConfig) -> set[str]:
    """Lines on at least ``boilerplate_share`` of the pages: a groupby count over each page's distinct lines."""
    from ray_vdr.queries.filters import boilerplate_lines
    from ray_vdr.queries.text import normalize_line, page_lines

    def lines(batch: pa.Table) -> pa.Table:
        out = [line for text in batch.column("text").to_pylist()
               for line in {normalize_line(x) for x in page_lines(text)} if any(c.isalpha() for c in line)]
        return pa.table({"line": pa.array(out, pa.string())})

    q = cfg.queries
    counts = pages.select_columns(["text"]).map_batches(lines, batch_format="pyarrow",
                                                        num_cpus=q.cpus_per_task).groupby(
        "line", num_partitions=_shuffle_partitions(n_pages)).count()
    bar = max(q.boilerplate_min_pages, q.boilerplate_share * n_pages)
    frequent = counts.map_batches(lambda b: b.filter(pc.greater_equal(b.column("count()"), bar)),
                                  batch_format="pyarrow").take_all()
    found = boilerplate_lines({r["line"]: r["count()"] for r in frequent}, n_pages, share=q.boilerplate_share,
                              min_pages=q.boilerplate_min_pages)
    logger.info("%d boilerplate lines (on at least %.0f of %d pages)", len(found), bar, n_pages)
    return found


def _duplicates(output: str, n_pages: int, cfg: VDRConfig) -> dict[str, int]:
    """Query keys generated for more than one page, with their page count (a groupby count)."""
    import ray.data

    from ray_vdr.queries.filters import query_key
    from ray_vdr.queries.pairs import candidates_only

    if not cfg.queries.dedupe or not list_parts(f"{output}/{GENERATED}"):
        return {}

    def keys(batch: pa.Table) -> pa.Table:
        return pa.table({"key": [query_key(q) for q in candidates_only(batch).column("query").to_pylist()]})

    ds = ray.data.read_parquet(f"{output}/{GENERATED}", num_cpus=cfg.queries.cpus_per_task)
    ds = ds.select_columns(["query", "reason"])
    counts = ds.map_batches(keys, batch_format="pyarrow").groupby(
        "key", num_partitions=_shuffle_partitions(n_pages)).count()
    repeated = counts.map_batches(lambda b: b.filter(pc.greater(b.column("count()"), 1)), batch_format="pyarrow")
    return {r["key"]: r["count()"] for r in repeated.take_all()}


def _split(output: str, corpus: str, duplicates: dict[str, int], cfg: VDRConfig) -> SplitPlan:
    """The split (ray_vdr.queries.split) of the indexed pages, from each page's candidate queries that are no
    duplicates: one row per page and per generated query in the driver, as the accounting reads them."""
    from ray_vdr.corpus.store import read_ids
    from ray_vdr.queries.filters import query_key

    q = cfg.queries
    pages: dict[str, list[int]] = {}
    for r in read_ids(corpus).select(["doc_id", "page"]).to_pylist():
        pages.setdefault(r["doc_id"], []).append(r["page"])
    generated = _column(output, GENERATED, ["doc_id", "page", "query", "reason"]).to_pylist()
    counts = Counter((r["doc_id"], r["page"]) for r in generated
                     if r["reason"] is None and r["query"] and query_key(r["query"]) not in duplicates)
    return plan_split(pages, counts, mode=q.split, eval_fraction=q.eval_fraction, min_eval_rows=q.min_eval_rows,
                      page_gap=q.page_gap, seed=q.seed)


def _drain(ds, what: str) -> tuple[Counter, float]:
    """Consume a stage's per-batch counts; log progress."""
    totals: Counter = Counter()
    t0 = time.perf_counter()
    for n, row in enumerate(ds.iter_rows(), start=1):
        totals.update({k: v for k, v in row.items() if isinstance(v, int | float)})
        if n % 50 == 0:
            logger.info("%s: %d batches, %s", what, n, dict(totals))
    return totals, time.perf_counter() - t0


def _generate(cfg: VDRConfig, output: str, corpus: str, boilerplate: set[str],
              done: set[str]) -> tuple[Counter, float]:
    """Queries for the corpus's pages not in ``done`` (those with generated queries or a page reject already)."""
    import ray
    import ray.data

    from ray_vdr.cluster import skip_known
    from ray_vdr.queries import generate as g

    q, v = cfg.queries, cfg.queries.vlm
    columns = ["key", "doc_id", "source", "page", *(["text"] if q.generator == "text" else []),
               *(["text", "image"] if q.generator == "callable" else []), *(["image"] if q.generator == "vlm" else [])]
    pages = ray.data.read_parquet(f"{corpus}/pages", num_cpus=q.cpus_per_task).select_columns(columns)
    pages = pages.map_batches(skip_known, batch_format="pyarrow", num_cpus=q.cpus_per_task,
                              fn_kwargs={"column": "key", "known_ref": [ray.put(done)]})
    kwargs = {"cfg": q.model_dump(mode="json"), "output": output, "boilerplate_ref": [ray.put(boilerplate)]}
    logger.info("generating queries (%s) for the pages not done before (%d done)", q.generator, len(done))
    if q.generator in ("text", "callable"):
        ds = pages.map_batches(g.text_stage, batch_size=q.batch_size, batch_format="pyarrow", fn_kwargs=kwargs,
                               num_cpus=q.cpus_per_task)
    else:
        use_gpu = cfg.scaling.use_gpu
        engine = v.engine if v.engine != "auto" else (
            "vllm" if use_gpu and importlib.util.find_spec("vllm") is not None else "transformers")
        if engine == "vllm":
            answers = g.vllm_processor(v, q.per_page)(pages)
        else:
            answers = pages.map_batches(g.VLMGenerator, batch_size=v.batch_size, batch_format="pyarrow",
                                        compute=ray.data.ActorPoolStrategy(size=v.replicas), num_cpus=v.cpus_per_actor,
                                        num_gpus=1 if use_gpu else 0,
                                        fn_constructor_kwargs={"cfg": q.model_dump(mode="json"), "use_gpu": use_gpu})
        ds = answers.map_batches(g.publish_answers, batch_size=q.batch_size, batch_format="pyarrow", fn_kwargs=kwargs,
                                 num_cpus=q.cpus_per_task)
    return _drain(ds, "generation")


def _mine(cfg: VDRConfig, output: str, corpus: str, model: str, duplicates: dict[str, int],
          split: SplitPlan, chaos: dict | None) -> tuple[Counter, float]:
    import ray
    import ray.data

    from ray_vdr.cluster import skip_known
    from ray_vdr.queries.pairs import QueryMiner, candidates_only, drop_duplicates

    if not list_parts(f"{output}/{GENERATED}"):
        return Counter(), 0.0
    q, m = cfg.queries, cfg.mine
    done = set()
    for folder in (TRAIN, EVAL, REJECTS):
        done.update(_column(output, folder, ["row_id"]).column("row_id").to_pylist())
    generated = _column(output, GENERATED, ["row_id", "reason"])
    if set(candidates_only(generated).column("row_id").to_pylist()) <= done:
        logger.info("every generated query was placed by an earlier run: mining skipped")
        return Counter(), 0.0
    ds = ray.data.read_parquet(f"{output}/{GENERATED}", num_cpus=q.cpus_per_task)
    ds = ds.map_batches(candidates_only, batch_format="pyarrow", num_cpus=q.cpus_per_task)
    ds = ds.map_batches(skip_known, batch_format="pyarrow", num_cpus=q.cpus_per_task,
                        fn_kwargs={"column": "row_id", "known_ref": [ray.put(done)]})
    ds = ds.map_batches(drop_duplicates, batch_format="pyarrow", num_cpus=q.cpus_per_task,
                        fn_kwargs={"duplicates_ref": [ray.put(duplicates)], "output": output})
    use_gpu = cfg.scaling.use_gpu
    ds = ds.map_batches(QueryMiner, batch_size=q.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=m.actors),
                        num_cpus=m.cpus_per_actor, num_gpus=1 if use_gpu else 0,
                        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "index": corpus, "model": model,
                                               "split_ref": [ray.put(split)], "output": output,
                                               "use_gpu": use_gpu, "chaos": chaos})
    return _drain(ds, "mining")


def _account(output: str, corpus: str) -> dict[str, Any]:
    """Pages in = pages with a kept query + pages rejected; write every rejected page with its reason."""
    from ray_vdr.corpus.store import REJECTS, read_ids

    ids = read_ids(corpus).select(["key", "doc_id", "source", "page"])
    corpus_rejects = _column(corpus, REJECTS, ["key", "doc_id", "source", "page", "reason", "detail"])
    kept = set()
    for split in (TRAIN, EVAL):
        kept.update(_column(output, split, ["page_key"]).column("page_key").to_pylist())
    generated = _column(output, GENERATED, ["page_key", "query", "reason", "detail"]).to_pylist()
    page_rejects = {r["page_key"]: r for r in generated if r["query"] is None}
    query_rejects = [r for r in generated if r["query"] is not None and r["reason"] is not None]
    query_rejects += _column(output, REJECTS, ["page_key", "query", "reason"]).to_pylist()
    per_page: dict[str, Counter] = {}
    for r in query_rejects:
        per_page.setdefault(r["page_key"], Counter())[r["reason"]] += 1
    rows = [{**r, "stage": "corpus"} for r in corpus_rejects.to_pylist()]
    for page in ids.to_pylist():
        if page["key"] in kept:
            continue
        if page["key"] in page_rejects:
            why = page_rejects[page["key"]]
            rows.append({**page, "stage": "generate", "reason": why["reason"], "detail": why["detail"]})
        else:
            reasons = per_page.get(page["key"], Counter())
            detail = ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items())) or "no query reached the miner"
            rows.append({**page, "stage": "filters", "reason": "no_kept_query", "detail": detail})
    schema = pa.schema([("key", pa.string()), ("doc_id", pa.string()), ("source", pa.string()), ("page", pa.int32()),
                        ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
    write_table(pa.Table.from_pylist(rows, schema=schema), f"{output}/{REJECTED_PAGES}")
    pages_in = ids.num_rows + corpus_rejects.num_rows
    by_reason = Counter(r["reason"] for r in rows)
    if pages_in != len(kept) + len(rows):  # every page is kept or rejected with its reason: anything else is a bug
        raise RuntimeError(f"page accounting: {pages_in} pages in, {len(kept)} kept + {len(rows)} rejected")
    return {"pages": {"in": pages_in, "kept": len(kept), "rejected": len(rows), "rejected_by_reason": dict(by_reason)},
            "queries_rejected": dict(Counter(r["reason"] for r in query_rejects)),
            "queries_generated": sum(r["query"] is not None for r in generated),
            "documents": len(set(ids.column("doc_id").to_pylist()))}


def run(cfg: VDRConfig, chaos: dict | None = None) -> TrainingDataResult:
    """Make the training set described by ``cfg.queries`` (module doc); returns where it went and its summary.
    ``chaos`` ({"after_batches", "marker", "sleep"}) kills a mining actor once, or slows it: failure drills, tests."""
    from ray_vdr.cluster import init_ray
    from ray_vdr.corpus import embed
    from ray_vdr.corpus.store import PAGES
    from ray_vdr.queries.card import write_card
    from ray_vdr.queries.generate import ensure_generator, load_callable
    from ray_vdr.storage import dedupe_parts, now_iso

    q = cfg.queries
    if not q.sources:
        raise FileNotFoundError("queries.sources is empty: give folders, files or URIs of PDFs, page images or Parquet")
    if q.generator == "callable":
        load_callable(q.callable)  # fail here, not in every task
    if q.generator == "vlm":
        ensure_generator(q.vlm)
    start = time.time()
    output = q.output.rstrip("/")
    corpus = f"{output}/corpus"
    model = _base_model(cfg)
    seconds: dict[str, float] = {}

    # 1. the pages, their text and the base embedder's index of them: the corpus job
    icfg = cfg.model_copy(deep=True)
    icfg.index.sources, icfg.index.output, icfg.index.model = q.sources, corpus, model
    t0 = time.time()
    built = embed.run(icfg)
    seconds["pages and corpus index"] = time.time() - t0
    _check_settings(output, _settings(cfg, model, built.manifest.model.fingerprint))
    init_ray()
    import ray.data

    n_pages = built.manifest.vectors
    pages = ray.data.read_parquet(f"{corpus}/pages", num_cpus=q.cpus_per_task).select_columns(["text"])

    # 2. boilerplate, 3. generation and the per-query filters (for the pages that have no generation part yet)
    t0 = time.time()
    done = set(_column(output, GENERATED, ["page_key"]).column("page_key").to_pylist())
    todo = set(_column(corpus, PAGES, ["key"]).column("key").to_pylist()) - done
    boilerplate = _boilerplate(pages, n_pages, cfg) if todo else set()
    seconds["boilerplate"] = time.time() - t0
    generated, gen_seconds = _generate(cfg, output, corpus, boilerplate, done) if todo else (Counter(), 0.0)
    seconds["generation"] = gen_seconds
    if not todo:
        logger.info("every page's queries were generated by an earlier run: boilerplate and generation skipped")
    dedupe_parts([f"{output}/{GENERATED}"], "page_key", unique_rows=False)

    # 4. duplicates across the corpus, 5. the split (by document or page ranges), 6. consistency and negatives
    t0 = time.time()
    duplicates = _duplicates(output, n_pages, cfg)
    split = _split(output, corpus, duplicates, cfg) if n_pages else SplitPlan("by_document")
    seconds["duplicates and split"] = time.time() - t0
    mined, seconds["consistency and negatives"] = _mine(cfg, output, corpus, model, duplicates, split, chaos)
    for folder in (TRAIN, EVAL, REJECTS):
        dedupe_parts([f"{output}/{folder}"], "row_id")

    # 7. the accounting and the card
    account = _account(output, corpus)
    splits = {s: sum(read_table(f"{output}/{s}/{n}", ["row_id"]).num_rows for n in list_parts(f"{output}/{s}"))
              for s in (TRAIN, EVAL)}
    rejected_queries = account.pop("queries_rejected")
    generated_queries = account.pop("queries_generated")
    checked = mined.get("queries", 0) - mined.get("page_not_indexed", 0) - mined.get("split_gap", 0)
    short = short_eval_warning(split, splits[EVAL], q.min_eval_rows) if q.eval_fraction and n_pages else None
    summary = {
        "name": output.rsplit("/", 1)[-1], "output": output, "made_at": now_iso(), "sources": q.sources,
        "dpi": cfg.index.dpi, "base_model": model, "documents": account.pop("documents"),
        "generator": {"name": q.generator, "per_page": q.per_page, "text_kinds": q.text_kinds, "callable": q.callable,
                      "model": q.vlm.model if q.generator == "vlm" else None,
                      "prompt": q.vlm.prompt if q.generator == "vlm" else None},
        "consistency": f"its own page in the base embedder's top {q.consistency_k}" if q.consistency_k else "off",
        "consistency_checked": checked, "consistency_kept": checked - mined.get("inconsistent", 0),
        "mining": {"rank_min": cfg.mine.rank_min, "rank_max": cfg.mine.rank_max, "margin": cfg.mine.margin,
                   "exclude_same_document": q.exclude_same_document, "train_negatives": q.num_negatives,
                   "eval_negatives": q.eval_negatives},
        "split": {"requested": q.split, "eval_fraction": q.eval_fraction, "min_eval_rows": q.min_eval_rows,
                  **split.summary(), "warnings": [*split.warnings, *([short] if short else [])]},
        **account,
        "queries": {"generated": generated_queries, "rejected_by_reason": rejected_queries},
        "splits": splits, "boilerplate_lines": len(boilerplate), "duplicate_queries": len(duplicates),
        "this_run": {"pages_generated_for": generated.get("pages", 0), "queries_mined": mined.get("queries", 0)},
        "seconds": {k: round(v, 2) for k, v in seconds.items()} | {"total": round(time.time() - start, 2)},
        "rates": {"pages_per_second": round(generated.get("pages", 0) / gen_seconds, 2) if gen_seconds else 0.0,
                  "queries_per_second": round(generated.get("candidates", 0) / gen_seconds, 2) if gen_seconds else 0.0},
    }
    card = write_card(output, summary)
    logger.info("training data in %s: %s", output, {k: summary[k] for k in ("pages", "splits")})
    return TrainingDataResult(output, summary, card)
