"""Hard-negative mining from our own corpus index: training queries → index search → triplets for the reranker.

Pipeline (streaming; the driver sees per-batch counts, never pages)::

    validated triplets (mine.queries, else data.train) ─► skip rows mined by an earlier run
        ─► map_batches(NegativeMiner): encode queries and positives, search the FAISS index, pick each query's
           negatives, read their pages from the index, publish one shard (actor pool)
        ─► driver: counts → progress and summary

For every query the miner looks at the pages ranked ``rank_min..rank_max`` and keeps the first ``num_negatives``
that are neither its positive (same content key) nor a near-duplicate of it (page-to-page cosine >=
``duplicate_similarity``) nor scored within ``margin`` of the positive (likely unlabeled positives). A query left
with fewer negatives is a reject with the reason, never a silently shorter row.

Output under ``mine.output``::

    triplets/part-<hash>.parquet  row_id, query, image, negative_0..k-1 (the triplet layout the trainers read), and
                                  positive_score, negative_scores, negative_ranks, negative_doc_ids
    rejects/part-<hash>.parquet   row_id, query, reason, detail
    input-rejects/                training rows that failed validation (reason per row)
    mine.json                     index, model, window, margin and k; a rerun must use the same

Resumable like the embedding job: a shard is named by the hash of its row ids and published atomically, and rows
already in a shard (mined or rejected) are skipped on a rerun.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from ray_vdr.config import MineConfig, VDRConfig
from ray_vdr.corpus.pages import page_key
from ray_vdr.corpus.store import IndexMismatch, read_manifest
from ray_vdr.data.triplets import TripletSpec
from ray_vdr.storage import is_file, list_parts, part_name, read_bytes, read_table, write_bytes, write_table

logger = logging.getLogger(__name__)

__all__ = [
    "IndexMiner",
    "MineResult",
    "MineSettings",
    "MineSummary",
    "Mined",
    "NegativeMiner",
    "run",
    "select_negatives",
]

TRIPLETS = "triplets"  # the reranker's training data: <output>/triplets
REJECTS = "rejects"
INPUT_REJECTS = "input-rejects"
BINDING_FILE = "mine.json"
REJECT_SCHEMA = pa.schema([("row_id", pa.string()), ("query", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string())])


class MineSettings(BaseModel):
    """What negatives were mined from and with (``mine.json``): a rerun must match, or it would mix two kinds."""

    model_config = ConfigDict(extra="forbid")

    index: str
    model_fingerprint: str | None
    dim: int
    num_negatives: int
    rank_min: int
    rank_max: int
    margin: float | None
    duplicate_similarity: float
    sampling: str
    seed: int
    last_run: MineSummary | None = None


class MineSummary(BaseModel):
    """One run of the mining job."""

    model_config = ConfigDict(extra="forbid")

    rows_mined: int
    rows_rejected: int
    rows_done_before: int
    input_rejects: int
    dropped_positive: int = 0
    dropped_same_document: int = 0
    dropped_near_duplicate: int = 0
    dropped_within_margin: int = 0
    rows_per_second: float = 0.0
    seconds: float = 0.0


@dataclass
class MineResult:
    output: str
    summary: MineSummary


def mined_schema(k: int) -> pa.Schema:
    return pa.schema(
        [("row_id", pa.string()), ("query", pa.string()), ("image", pa.binary())]
        + [(f"negative_{i}", pa.binary()) for i in range(k)]
        + [("positive_score", pa.float32()), ("negative_scores", pa.list_(pa.float32())),
           ("negative_ranks", pa.list_(pa.int32())), ("negative_doc_ids", pa.list_(pa.string()))]
    )


# ---------------------------------------------------------------------------------------------------------------------
# selection (pure)


DROP_REASONS = ("positive", "same_document", "near_duplicate", "within_margin")


def select_negatives(hits: list[dict[str, Any]], positive_key: str, positive_score: float,
                     similarity_to_positive: dict[int, float], cfg: MineConfig, row_id: str = "",
                     exclude_doc: str | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The negatives for one query among its search ``hits`` (rank order), and why other candidates were dropped.

    A hit is the positive when its content key is the positive's; ``similarity_to_positive`` maps a hit's vector
    position to its cosine with the positive page; pages of the document ``exclude_doc`` (the positive's own, which
    may answer the query too) are dropped when it is given. ``cfg.sampling`` "top" keeps the best-ranked eligible
    hits, "random" a sample of them drawn with a generator seeded by ``cfg.seed`` and ``row_id`` (a rerun draws the
    same).
    """
    import random

    eligible: list[dict[str, Any]] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    for hit in hits:
        if not cfg.rank_min <= hit["rank"] <= cfg.rank_max:
            continue
        if positive_key in (hit["key"], hit.get("content")):
            dropped["positive"] += 1
        elif exclude_doc is not None and hit["doc_id"] == exclude_doc:
            dropped["same_document"] += 1
        elif similarity_to_positive.get(hit["position"], -1.0) >= cfg.duplicate_similarity:
            dropped["near_duplicate"] += 1
        elif cfg.margin is not None and hit["score"] >= positive_score - cfg.margin:
            dropped["within_margin"] += 1
        else:
            eligible.append(hit)
            if cfg.sampling == "top" and len(eligible) == cfg.num_negatives:
                break
    if cfg.sampling == "random" and len(eligible) > cfg.num_negatives:
        rng = random.Random(f"{cfg.seed}:{row_id}")
        eligible = sorted(rng.sample(eligible, cfg.num_negatives), key=lambda h: h["rank"])
    return eligible, dropped


# ---------------------------------------------------------------------------------------------------------------------
# the Ray Data stages


def done_rows(output: str) -> set[str]:
    """Row ids already mined or rejected under ``output``."""
    done: set[str] = set()
    for kind in (TRIPLETS, REJECTS):
        for name in list_parts(f"{output}/{kind}"):
            done.update(read_table(f"{output}/{kind}/{name}", ["row_id"]).column("row_id").to_pylist())
    return done


@dataclass
class Mined:
    """One query's outcome: the negatives chosen (search hits), why other candidates were dropped, the positive's
    score and its rank among the hits (None when it is not among them)."""

    chosen: list[dict[str, Any]]
    dropped: dict[str, int]
    positive_score: float
    positive_rank: int | None
    hits: int


class IndexMiner:
    """Hard negatives from one corpus index: its FAISS index, page store and the embedder it was built with (loaded
    from the manifest's binding, so queries are encoded as the index's pages were). Shared by the mining job and the
    training-data job (:mod:`ray_vdr.queries.pairs`)."""

    def __init__(self, index: str, model: str, dtype: str = "auto", attn: str = "auto", use_gpu: bool = False,
                 cpus: float = 1.0):
        from ray_vdr.cluster import worker_device, worker_logging
        from ray_vdr.corpus.store import PageStore, open_index
        from ray_vdr.models.encoder import IndexEncoder
        from ray_vdr.models.load import Runtime

        worker_logging()
        self.index = open_index(index, model_path=model)
        self.dim = self.index.manifest.dim
        # encode as the index did (its binding: prompts, pixel bounds, remote code), with these files
        self.encoder = IndexEncoder(self.index.manifest.model.at(model),
                                    Runtime(dtype, attn, worker_device(use_gpu, cpus)), self.dim)
        self.pages = PageStore.of(self.index, cache_bytes=64 << 20)
        self.late = self.index.manifest.late  # a multi-vector index: token vectors, MaxSim

    def encode_queries(self, queries: list[str]) -> np.ndarray | list[np.ndarray]:
        return self.encoder.encode_queries(queries)

    def encode_pages(self, images: list[bytes]) -> np.ndarray | list[np.ndarray]:
        from ray_vdr.data.images import pil_pages

        return self.encoder.encode_pages(pil_pages(images), pooling=self.late.pooling if self.late else 1.0)

    def stored(self, positions: list[int]) -> np.ndarray | list[np.ndarray]:
        """The vectors the index stored for these positions (a multi-vector index: each page's token vectors)."""
        if self.late is not None:
            from ray_vdr.corpus.late import unpack_tokens

            return [unpack_tokens(b, self.dim, self.late.storage) for b in self.pages.get(positions, "tokens")]
        return np.asarray(self.pages.get(positions, "embedding"), dtype=np.float32).reshape(len(positions), self.dim)

    def score(self, query, page) -> float:
        """A query's score for a page, as the index ranks: cosine, or MaxSim."""
        if self.late is None:
            return float(query @ page)
        from ray_vdr.corpus.late import maxsim

        return float(maxsim(query, [page])[0])

    def similarities(self, a, others: list) -> list[float]:
        """Page-to-page similarity of ``a`` with each of ``others`` (near-duplicates): cosine, or, for token vectors,
        the mean over ``a``'s tokens of their best cosine with the other's (1 for the same page)."""
        if not others:
            return []
        if self.late is None:
            return (np.stack(others) @ a).tolist()
        return [self.score(a, b) / max(1, len(a)) for b in others]

    def mine(self, q: np.ndarray, p: np.ndarray, positive_keys: list[str], row_ids: list[str],
             cfgs: list[MineConfig], depth: int, exclude_docs: list[str | None] | None = None) -> list[Mined]:
        """Negatives for each (query vector, positive vector) pair, each row with its own MineConfig, from the top
        ``depth`` hits of the index."""
        hits = self.index.search(q, depth)
        # near-duplicate checks look at the hits in each row's rank window only (the search may go deeper: the
        # consistency filter's depth)
        window = [[h["position"] for h in row if cfg.rank_min <= h["rank"] <= cfg.rank_max]
                  for row, cfg in zip(hits, cfgs, strict=True)]
        positions = sorted({x for row in window for x in row})
        stored = dict(zip(positions, self.stored(positions), strict=True)) if positions else {}
        out = []
        for i, rid in enumerate(row_ids):
            pos_score = self.score(q[i], p[i])
            sims = dict(zip(window[i], self.similarities(p[i], [stored[x] for x in window[i]]), strict=True))
            chosen, why = select_negatives(hits[i], positive_keys[i], pos_score, sims, cfgs[i], rid,
                                           exclude_docs[i] if exclude_docs else None)
            rank = next((h["rank"] for h in hits[i] if positive_keys[i] in (h["key"], h.get("content"))), None)
            out.append(Mined(chosen, why, pos_score, rank, len(hits[i])))
        return out


class NegativeMiner:
    """Actor-pool stage: mines one batch of training rows and publishes it as one shard, returning only counts."""

    def __init__(self, index: str, model: str, mine: dict, dtype: str, attn: str, use_gpu: bool, cpus: float = 1.0):
        self.cfg = MineConfig.model_validate(mine)
        self.miner = IndexMiner(index, model, dtype, attn, use_gpu, cpus)
        self.output = mine["output"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        k = self.cfg.num_negatives
        out: dict[str, list] = {name: [] for name in mined_schema(k).names}
        rejects: list[dict[str, str]] = []
        dropped = dict.fromkeys(DROP_REASONS, 0)
        if batch.num_rows:
            queries = batch.column("query").to_pylist()
            positives = batch.column("image").to_pylist()
            row_ids = batch.column("row_id").to_pylist()
            mined = self.miner.mine(self.miner.encode_queries(queries), self.miner.encode_pages(positives),
                                    [page_key(p) for p in positives], row_ids, [self.cfg] * len(row_ids),
                                    self.cfg.rank_max)
            for i, m in enumerate(mined):
                for reason, count in m.dropped.items():
                    dropped[reason] += count
                if len(m.chosen) < k:
                    rejects.append({"row_id": row_ids[i], "query": queries[i][:200], "reason": "too_few_negatives",
                                    "detail": f"{len(m.chosen)} of {k} in ranks "
                                              f"{self.cfg.rank_min}..{self.cfg.rank_max}"
                                              f" of {m.hits} hits; dropped {m.dropped}"})
                    continue
                images = self.miner.pages.get([h["position"] for h in m.chosen], "image")
                out["row_id"].append(row_ids[i])
                out["query"].append(queries[i])
                out["image"].append(positives[i])
                for j, img in enumerate(images):
                    out[f"negative_{j}"].append(img)
                out["positive_score"].append(m.positive_score)
                out["negative_scores"].append([h["score"] for h in m.chosen])
                out["negative_ranks"].append([h["rank"] for h in m.chosen])
                out["negative_doc_ids"].append([h["doc_id"] for h in m.chosen])
        name = part_name(batch.column("row_id").to_pylist())
        table = pa.table(out, schema=mined_schema(k))
        if table.num_rows:
            write_table(table, f"{self.output}/{TRIPLETS}/{name}")
        if rejects:
            write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), f"{self.output}/{REJECTS}/{name}")
        return pa.table({"mined": [table.num_rows], "rejected": [len(rejects)],
                         **{reason: [count] for reason, count in dropped.items()},
                         "seconds": [time.perf_counter() - start]})


# ---------------------------------------------------------------------------------------------------------------------
# driver


def resolve(cfg: VDRConfig) -> tuple[str, str, str]:
    """(index, model, output) of the mining job, defaults filled in."""
    index = cfg.mine.index or cfg.index.output
    manifest = read_manifest(index)
    if manifest is None:
        raise FileNotFoundError(f"no corpus index at {index}: build it first (jobs/embed_corpus.py) or set mine.index")
    model = cfg.mine.model or manifest.model.path
    return index, model, cfg.mine.output or cfg.run.uri("mined")


def _settings(cfg: MineConfig, index: str, manifest) -> MineSettings:
    keep = ("num_negatives", "rank_min", "rank_max", "margin", "duplicate_similarity", "sampling", "seed")
    return MineSettings(index=index, model_fingerprint=manifest.model.fingerprint, dim=manifest.dim,
                        **{name: getattr(cfg, name) for name in keep})


def run(cfg: VDRConfig) -> MineResult:
    """Mine ``cfg.mine.num_negatives`` hard negatives per training query from the corpus index."""
    import ray
    import ray.data

    from ray_vdr.cluster import init_ray, skip_known
    from ray_vdr.data.sources import build_dataset, count_rejects

    start = time.time()
    index, model, output = resolve(cfg)
    source = cfg.mine.queries or cfg.data.train
    if source is None:
        raise FileNotFoundError("mine.queries and data.train are both unset: nothing to mine for")
    settings = _settings(cfg.mine, index, read_manifest(index))
    if is_file(f"{output}/{BINDING_FILE}"):
        earlier = MineSettings.model_validate(json.loads(read_bytes(f"{output}/{BINDING_FILE}")))
        changed = sorted(k for k in MineSettings.model_fields if k != "last_run"
                         and getattr(earlier, k) != getattr(settings, k))
        if changed:
            raise IndexMismatch(f"{output} holds negatives mined with other settings ({', '.join(changed)} differ): "
                                "mine into a new mine.output or restore the settings to resume")
    write_bytes(settings.model_dump_json(indent=2).encode(), f"{output}/{BINDING_FILE}")
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    done = done_rows(output)
    logger.info("mining %d negatives per query from %s (ranks %d..%d) into %s; %d rows done before",
                cfg.mine.num_negatives, index, cfg.mine.rank_min, cfg.mine.rank_max, output, len(done))
    # only the query and the positive matter here: existing negative columns are neither needed nor validated
    spec = dataclasses.replace(TripletSpec.from_config(cfg.data, split="train"), negative_columns=())
    ds = build_dataset(source, spec, f"{output}/{INPUT_REJECTS}", batch_size=cfg.data.batch_size,
                       num_cpus=cfg.data.cpus_per_task)
    ds = ds.map_batches(skip_known, batch_format="pyarrow", num_cpus=cfg.data.cpus_per_task,
                        fn_kwargs={"column": "row_id", "known_ref": [ray.put(done)]})
    use_gpu = cfg.scaling.use_gpu
    ds = ds.map_batches(NegativeMiner, batch_size=cfg.mine.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=cfg.mine.actors), num_cpus=cfg.mine.cpus_per_actor,
                        num_gpus=1 if use_gpu else 0,
                        fn_constructor_kwargs={"index": index, "model": model,
                                               "mine": {**cfg.mine.model_dump(), "output": output},
                                               "dtype": cfg.model.dtype, "attn": cfg.model.attn_implementation,
                                               "use_gpu": use_gpu, "cpus": cfg.mine.cpus_per_actor})
    totals = dict.fromkeys(("mined", "rejected", *DROP_REASONS, "batches"), 0)
    t0 = time.perf_counter()
    for row in ds.iter_rows():
        for key in ("mined", "rejected", *DROP_REASONS):
            totals[key] += row[key]
        totals["batches"] += 1
        if totals["batches"] % 20 == 0:
            logger.info("%d batches: %d rows mined, %d rejected (%.1f rows/s)", totals["batches"], totals["mined"],
                        totals["rejected"], (totals["mined"] + totals["rejected"]) / (time.perf_counter() - t0))
    seconds = time.perf_counter() - t0
    summary = MineSummary(
        rows_mined=totals["mined"], rows_rejected=totals["rejected"], rows_done_before=len(done),
        input_rejects=sum(count_rejects(f"{output}/{INPUT_REJECTS}").values()),
        **{f"dropped_{reason}": totals[reason] for reason in DROP_REASONS},
        rows_per_second=round((totals["mined"] + totals["rejected"]) / seconds, 2) if seconds else 0.0,
        seconds=round(time.time() - start, 2))
    settings.last_run = summary
    write_bytes(settings.model_dump_json(indent=2).encode(), f"{output}/{BINDING_FILE}")
    logger.info("mining summary: %s", summary)
    return MineResult(output, summary)
