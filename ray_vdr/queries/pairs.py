"""Generated queries → training rows: the corpus-wide duplicate filter, then, per query, the consistency filter and
hard negatives mined with the base embedder from the corpus index, into the train or eval split.

:func:`drop_duplicates` (a task stage) rejects queries generated for more than one page. :class:`QueryMiner` (an
actor-pool stage) encodes each remaining query as the index encodes queries, searches the corpus index, keeps the
query only if its own page ranks within ``queries.consistency_k`` (the round-trip filter), and picks its negatives
with the mining job's rule (:func:`ray_vdr.eval.mine.select_negatives`: the rank window, the positive and its
near-duplicates, the margin against unlabeled positives, and the query's own document). The positive's vector is the
one the index stored for its page, not encoded again. A row goes to ``eval/`` when its page is an eval page (of an
eval document, or in a document's eval page range: :class:`ray_vdr.queries.split.SplitPlan`), else to ``train/``, in
the triplet layout the trainers read; a query on a page in the gap around an eval range (``split_gap``) or without
enough negatives is a reject.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ray_vdr.cluster import chaos_strike, fetch_once
from ray_vdr.config import VDRConfig
from ray_vdr.eval.mine import DROP_REASONS, IndexMiner
from ray_vdr.queries.filters import query_key
from ray_vdr.queries.generate import REJECTS, ROW_SCHEMA
from ray_vdr.queries.split import EVAL, GAP, TRAIN
from ray_vdr.storage import part_name, write_table

__all__ = ["QueryMiner", "candidates_only", "drop_duplicates", "split_schema"]


def split_schema(k: int) -> pa.Schema:
    """A row of the train or eval split: the triplet layout the trainers read (query, image, negative_0..k-1), where
    it came from, and what the miner saw."""
    return pa.schema(
        [("row_id", pa.string()), ("query", pa.string()), ("image", pa.binary())]
        + [(f"negative_{i}", pa.binary()) for i in range(k)]
        + [("doc_id", pa.string()), ("page", pa.int32()), ("source", pa.string()), ("page_key", pa.string()),
           ("query_source", pa.string()), ("positive_rank", pa.int32()), ("positive_score", pa.float32()),
           ("negative_scores", pa.list_(pa.float32())), ("negative_doc_ids", pa.list_(pa.string()))]
    )


def _rejects(rows: list[dict], stage: str, reasons: list[tuple[str, str]]) -> pa.Table:
    return pa.Table.from_pylist([{**{k: r[k] for k in ("row_id", "page_key", "doc_id", "page", "source", "query",
                                                      "query_source")},
                                  "stage": stage, "reason": reason, "detail": detail[:500]}
                                 for r, (reason, detail) in zip(rows, reasons, strict=True)], schema=ROW_SCHEMA)


def candidates_only(batch: pa.Table) -> pa.Table:
    """map_batches stage: the generated queries that passed generation's filters (no reason set)."""
    return batch.filter(pc.is_null(batch.column("reason")))


def drop_duplicates(batch: pa.Table, *, duplicates_ref: list, output: str) -> pa.Table:
    """map_batches stage: queries whose key was generated for several pages become rejects (duplicate_query)."""
    duplicates: dict[str, int] = fetch_once(duplicates_ref[0])
    if not duplicates or not batch.num_rows:
        return batch
    keys = [query_key(q) for q in batch.column("query").to_pylist()]
    dup = pa.array([k in duplicates for k in keys])
    gone = batch.filter(dup).to_pylist()
    if gone:
        reasons = [("duplicate_query", f"generated for {duplicates[query_key(r['query'])]} pages") for r in gone]
        name = part_name([r["row_id"] for r in gone])
        write_table(_rejects(gone, "dedupe", reasons), f"{output}/{REJECTS}/{name}")
    return batch.filter(pc.invert(dup))


class QueryMiner:
    """Actor-pool stage: consistency filter, hard negatives and split for one batch of generated queries; publishes
    the batch's train rows, eval rows and rejects as one part each and returns counts."""

    def __init__(self, cfg: dict, index: str, model: str, split_ref: list, output: str, use_gpu: bool,
                 chaos: dict | None = None):
        self.cfg = VDRConfig.model_validate(cfg)
        q, m = self.cfg.queries, self.cfg.mine
        self.miner = IndexMiner(index, model, self.cfg.model.dtype, self.cfg.model.attn_implementation, use_gpu,
                                m.cpus_per_actor)
        self.position = {key: i for i, key in enumerate(self.miner.index.ids.column("key").to_pylist())}
        self.split = fetch_once(split_ref[0])
        self.need = {TRAIN: q.num_negatives, EVAL: q.eval_negatives}
        self.rules = {s: m.model_copy(update={"num_negatives": max(1, k), "seed": q.seed})
                      for s, k in self.need.items()}
        self.depth = max(m.rank_max, q.consistency_k or 0)
        self.output, self.chaos, self.batches = output, chaos, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        q = self.cfg.queries
        rows = batch.to_pylist()
        out: dict[str, list[dict[str, Any]]] = {TRAIN: [], EVAL: []}
        rejected: list[dict] = []
        reasons: list[tuple[str, str]] = []
        dropped = dict.fromkeys(DROP_REASONS, 0)
        known, splits = [], []
        for r in rows:
            side = self.split.side(r["doc_id"], r["page"])
            if r["page_key"] not in self.position:
                rejected.append(r)
                reasons.append(("page_not_indexed", "its page is not in the corpus index"))
            elif side == GAP:
                first, last = self.split.ranges[r["doc_id"]]
                rejected.append(r)
                reasons.append(("split_gap", f"page {r['page']} is within {self.split.page_gap} pages of its "
                                f"document's eval pages {first}-{last}: in neither split"))
            else:
                known.append(r)
                splits.append(side)
        if known:
            positions = [self.position[r["page_key"]] for r in known]
            mined = self.miner.mine(self.miner.encode_queries([r["query"] for r in known]),
                                    self.miner.stored(positions), [r["page_key"] for r in known],
                                    [r["row_id"] for r in known], [self.rules[s] for s in splits], self.depth,
                                    [r["doc_id"] for r in known] if q.exclude_same_document else None)
            for r, split, position, m in zip(known, splits, positions, mined, strict=True):
                for reason, count in m.dropped.items():
                    dropped[reason] += count
                k = q.consistency_k
                if k is not None and (m.positive_rank is None or m.positive_rank > k):
                    where = f"rank {m.positive_rank}" if m.positive_rank else f"not in the top {m.hits}"
                    rejected.append(r)
                    reasons.append(("inconsistent", f"the base embedder puts its page at {where} (top {k} kept)"))
                    continue
                need = self.need[split]
                chosen = m.chosen[:need]
                if len(chosen) < need:
                    rejected.append(r)
                    reasons.append(("too_few_negatives", f"{len(chosen)} of {need} ({split}) in ranks "
                                    f"{self.rules[split].rank_min}..{self.rules[split].rank_max}; dropped {m.dropped}"))
                    continue
                images = self.miner.pages.get([position] + [h["position"] for h in chosen], "image")
                out[split].append({
                    "row_id": r["row_id"], "query": r["query"], "image": images[0],
                    **{f"negative_{j}": img for j, img in enumerate(images[1:])},
                    "doc_id": r["doc_id"], "page": r["page"], "source": r["source"], "page_key": r["page_key"],
                    "query_source": r["query_source"], "positive_rank": m.positive_rank,
                    "positive_score": m.positive_score, "negative_scores": [h["score"] for h in chosen],
                    "negative_doc_ids": [h["doc_id"] for h in chosen]})
        name = part_name([r["row_id"] for r in rows])
        for split, split_rows in out.items():
            if split_rows:
                write_table(pa.Table.from_pylist(split_rows, schema=split_schema(self.need[split])),
                            f"{self.output}/{split}/{name}")
        if rejected:
            write_table(_rejects(rejected, "mine", reasons), f"{self.output}/{REJECTS}/{name}")
        self.batches += 1
        chaos_strike(self.chaos, self.batches, "mining")
        counts = {"queries": len(rows), "train": len(out[TRAIN]), "eval": len(out[EVAL]),
                  "inconsistent": sum(r[0] == "inconsistent" for r in reasons),
                  "too_few_negatives": sum(r[0] == "too_few_negatives" for r in reasons),
                  "page_not_indexed": sum(r[0] == "page_not_indexed" for r in reasons),
                  "split_gap": sum(r[0] == "split_gap" for r in reasons)}
        return pa.table({**{k: [v] for k, v in counts.items()}, **{f"dropped_{k}": [v] for k, v in dropped.items()},
                         "seconds": [time.perf_counter() - start]})
