"""Synthetic Visual Document Retrieval data that looks like the real task.

Every page is a rendered document about one (company, year): a results table, a bar or line chart, a memo, or a
two-column segment report, in one of several fonts, with light scan noise. Each page answers 1-3 queries
("What was Northwind Logistics' Q3 2021 revenue?") that no other page answers, because no two pages share a
(company, year). Hard negatives share the company, the year or the template with the positive page, so they look
alike, but never contain the answer.

Output follows the llamaindex-vdr layout (tomaarsen/llamaindex-vdr-en-train-preprocessed): Parquet with ``query``,
``image`` and ``negative_0..negative_k`` (images stored as the Hugging Face Image struct {bytes, path}), plus
``query_id`` and ``answer`` for debugging. The eval split is laid out like the reference eval: N queries, each with
its positive and 4 hard negatives, all distinct pages, so the corpus holds 5N pages. Everything is a pure function
of the seed.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from ray_vdr.config import SyntheticConfig
from ray_vdr.data.facts import PALETTES, PREFIXES, SUFFIXES, TEMPLATES, YEARS, Page, make_queries, max_pages
from ray_vdr.data.render import FONT_FILES, page_png, render_pages

logger = logging.getLogger(__name__)

__all__ = ["SyntheticRow", "SyntheticSummary", "generate", "iter_pages", "write_synthetic"]


class SyntheticSummary(BaseModel):
    """What ``ray-vdr make-data`` wrote (``summary.json``)."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    train_rows: int
    train_pages: int
    eval_queries: int
    eval_corpus_pages: int
    templates: list[str]
    page_size: list[int]


class _PageFactory:
    """Hands out pages with globally unique (company, year), so each fact lives on exactly one page."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        keys = [(f"{p} {s}", y) for p in PREFIXES for s in SUFFIXES for y in YEARS]
        rng.shuffle(keys)
        self.order = keys  # popped from the end
        self.used: set[tuple[str, int]] = set()
        self.by_company: dict[str, list[tuple[str, int]]] = {}
        self.by_year: dict[int, list[tuple[str, int]]] = {}
        for k in keys:
            self.by_company.setdefault(k[0], []).append(k)
            self.by_year.setdefault(k[1], []).append(k)
        self.pages: list[Page] = []

    def _take(self, pool: list[tuple[str, int]]) -> tuple[str, int] | None:
        while pool:
            k = pool.pop()
            if k not in self.used:
                self.used.add(k)
                return k
        return None

    def new(self, like: Page | None = None) -> Page:
        """A fresh page; with ``like``, one sharing its company or year, or else its template."""
        key = None
        template = self.rng.choice(TEMPLATES)
        if like is not None:
            pools = [self.by_company[like.company], self.by_year[like.year]]
            self.rng.shuffle(pools)
            key = self._take(pools[0]) or self._take(pools[1])
            if key is None or self.rng.random() < 0.5:
                template = like.template
        key = key or self._take(self.order)
        if key is None:
            raise ValueError(f"synthetic data is limited to {max_pages()} distinct pages; ask for fewer rows")
        page = Page(
            page_id=len(self.pages),
            company=key[0],
            year=key[1],
            template=template,
            font=self.rng.randrange(len(FONT_FILES)),
            palette=self.rng.randrange(len(PALETTES)),
            seed=self.rng.randrange(2**31),
        )
        page.queries = make_queries(page, random.Random(page.seed))
        self.pages.append(page)
        return page


@dataclass
class SyntheticRow:
    query_id: str
    query: str
    answer: str
    positive: Page
    negatives: list[Page]


def generate(cfg: SyntheticConfig) -> tuple[list[SyntheticRow], list[SyntheticRow]]:
    """Plan the train and eval rows (pages are rendered lazily when written)."""
    rng = random.Random(cfg.seed)
    factory = _PageFactory(rng)
    # eval first: N queries, each with a fresh positive and eval_negatives fresh look-alike pages
    eval_rows = []
    for i in range(cfg.eval_queries):
        pos = factory.new()
        negs = [factory.new(like=pos) for _ in range(cfg.eval_negatives)]
        q = pos.queries[0]
        eval_rows.append(SyntheticRow(f"eval-{i:06d}", q.text, q.answer, pos, negs))
    # train: pages answer 1-3 queries each; negatives are other train pages that look alike
    train_rows: list[SyntheticRow] = []
    train_pages: list[Page] = []
    while len(train_rows) < cfg.train_queries:
        pos = factory.new(like=train_pages[-1] if train_pages and rng.random() < 0.5 else None)
        train_pages.append(pos)
        for q in pos.queries[: rng.randint(1, 3)]:
            if len(train_rows) == cfg.train_queries:
                break
            train_rows.append(SyntheticRow(f"train-{len(train_rows):06d}", q.text, q.answer, pos, []))
    index: dict[tuple[str, object], list[Page]] = {}
    for p in train_pages:
        for key in (("company", p.company), ("year", p.year), ("template", p.template)):
            index.setdefault(key, []).append(p)
    for row in train_rows:
        row.negatives = _pick_negatives(row.positive, index, cfg.num_negatives, rng, factory)
    rng.shuffle(train_rows)  # like a real dataset: a page's queries are not next to each other
    return train_rows, eval_rows


def _pick_negatives(
    pos: Page, index: dict[tuple[str, object], list[Page]], k: int, rng: random.Random, factory: _PageFactory
) -> list[Page]:
    """Look-alikes of ``pos`` (same company, year or template); fresh look-alike pages if the pool has too few."""
    if k == 0:
        return []
    alike: list[Page] = []
    for key in (("company", pos.company), ("year", pos.year), ("template", pos.template)):
        group = index.get(key, [])
        alike.extend(rng.sample(group, min(len(group), 4 * k)))
    alike = list({p.page_id: p for p in alike if p is not pos}.values())
    rng.shuffle(alike)
    out = alike[:k]
    while len(out) < k:
        out.append(factory.new(like=pos))
    return out


def _image_cell(png: bytes, name: str) -> dict:
    return {"bytes": png, "path": name}


_HF_IMAGE = {"_type": "Image"}


def _schema(n_neg: int) -> pa.Schema:
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("query_id", pa.string()), ("query", pa.string()), ("answer", pa.string()), ("image", img)]
    fields += [(f"negative_{i}", img) for i in range(n_neg)]
    features = {"query_id": {"dtype": "string", "_type": "Value"}, "query": {"dtype": "string", "_type": "Value"},
                "answer": {"dtype": "string", "_type": "Value"}, "image": _HF_IMAGE}
    features.update({f"negative_{i}": _HF_IMAGE for i in range(n_neg)})
    # Hugging Face `datasets` reads this metadata and decodes the struct columns as images
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema(fields, metadata=meta)


def _write_parquet(rows: list[SyntheticRow], n_neg: int, path: Path, width: int, height: int,
                   rows_per_file: int) -> int:
    path.mkdir(parents=True, exist_ok=True)
    schema = _schema(n_neg)
    n_files = 0
    for start in range(0, len(rows), rows_per_file):
        chunk = rows[start : start + rows_per_file]
        cols: dict[str, list] = {"query_id": [], "query": [], "answer": [], "image": []}
        for i in range(n_neg):
            cols[f"negative_{i}"] = []
        for r in chunk:
            cols["query_id"].append(r.query_id)
            cols["query"].append(r.query)
            cols["answer"].append(r.answer)
            cols["image"].append(_image_cell(page_png(r.positive, width, height), f"page-{r.positive.page_id:06d}.png"))
            for i, p in enumerate(r.negatives):
                cols[f"negative_{i}"].append(_image_cell(page_png(p, width, height), f"page-{p.page_id:06d}.png"))
        pq.write_table(pa.table(cols, schema=schema), path / f"part-{n_files:05d}.parquet")
        n_files += 1
    return n_files


def _write_jsonl(rows: list[SyntheticRow], path: Path, images: Path, width: int, height: int) -> None:
    images.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in rows:
            rec = {"query_id": r.query_id, "query": r.query, "answer": r.answer}
            for col, page in [("image", r.positive), *[(f"negative_{i}", p) for i, p in enumerate(r.negatives)]]:
                name = f"page-{page.page_id:06d}.png"
                if not (images / name).exists():
                    (images / name).write_bytes(page_png(page, width, height))
                rec[col] = f"{images.relative_to(path.parent).as_posix()}/{name}"
            fh.write(json.dumps(rec) + "\n")


def iter_pages(rows: list[SyntheticRow]) -> Iterator[Page]:
    seen: set[int] = set()
    for r in rows:
        for p in (r.positive, *r.negatives):
            if p.page_id not in seen:
                seen.add(p.page_id)
                yield p


def write_synthetic(cfg: SyntheticConfig, rows_per_file: int = 256) -> SyntheticSummary:
    """Generate and write the dataset under ``cfg.output_dir``. Returns a summary (also written as summary.json).

    Layout::

        train/part-*.parquet   query, image, negative_0..k-1 (+ query_id, answer)
        eval/part-*.parquet    query, image, negative_0..3: N queries over a 5N-page corpus
        train.jsonl, eval.jsonl            the same rows as JSONL over image files:
        images/train/, images/eval/        each split's pages (the splits share none): the eval corpus to index
    """
    out = Path(cfg.output_dir)
    for owned in ("train", "eval", "images"):  # a smaller rerun must not leave stale part files behind
        shutil.rmtree(out / owned, ignore_errors=True)
    train_rows, eval_rows = generate(cfg)
    w, h = cfg.page_width, cfg.page_height
    render_pages(iter_pages(train_rows + eval_rows), w, h)
    _write_parquet(train_rows, cfg.num_negatives, out / "train", w, h, rows_per_file)
    _write_parquet(eval_rows, cfg.eval_negatives, out / "eval", w, h, rows_per_file)
    if cfg.jsonl:
        _write_jsonl(train_rows, out / "train.jsonl", out / "images" / "train", w, h)
        _write_jsonl(eval_rows, out / "eval.jsonl", out / "images" / "eval", w, h)
    summary = SyntheticSummary(
        seed=cfg.seed, train_rows=len(train_rows), train_pages=sum(1 for _ in iter_pages(train_rows)),
        eval_queries=len(eval_rows), eval_corpus_pages=sum(1 for _ in iter_pages(eval_rows)),
        templates=sorted({p.template for p in iter_pages(train_rows + eval_rows)}), page_size=[w, h])
    (out / "summary.json").write_text(summary.model_dump_json(indent=2))
    logger.info("synthetic dataset written to %s: %s", out, summary)
    return summary
