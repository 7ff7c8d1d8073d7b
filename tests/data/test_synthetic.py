from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from ray_vdr.config import SyntheticConfig
from ray_vdr.data.render import page_png
from ray_vdr.data.synthetic import generate, write_synthetic


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.parquet")):
        t = pq.read_table(f)
        for col in t.column_names:
            h.update(repr(t.column(col).to_pylist()).encode())
    return h.hexdigest()


def test_deterministic_from_seed(tmp_path, monkeypatch):
    """The same seed gives the same data, drawn in this process (a) or on every core (b: 2 pages a worker)."""
    from ray_vdr.data import render

    kw = dict(train_queries=12, eval_queries=3, page_width=160, page_height=200, jsonl=False)
    a = write_synthetic(SyntheticConfig(output_dir=str(tmp_path / "a"), seed=7, **kw))
    pools = []

    class Pool(ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(render, "PAGES_PER_WORKER", 2)
    monkeypatch.setattr(render, "ProcessPoolExecutor", Pool)
    b = write_synthetic(SyntheticConfig(output_dir=str(tmp_path / "b"), seed=7, **kw))
    if (os.cpu_count() or 1) > 1:
        assert len(pools) == 1 and pools[0] >= 2, "drawn on every core"
    write_synthetic(SyntheticConfig(output_dir=str(tmp_path / "c"), seed=8, **kw))
    assert a == b
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_schema_and_eval_layout(synthetic):
    cfg, summary = synthetic
    out = Path(cfg.output_dir)
    train = pq.read_table(out / "train")
    ev = pq.read_table(out / "eval")
    assert train.num_rows == cfg.train_queries == summary.train_rows
    assert train.column_names == ["query_id", "query", "answer", "image", "negative_0"]
    assert ev.column_names == ["query_id", "query", "answer", "image", *[f"negative_{i}" for i in range(4)]]
    # the reference eval layout: N queries, each with its positive and 4 negatives, all distinct → 5N pages
    pages = {c["path"] for col in ev.column_names[3:] for c in ev.column(col).to_pylist()}
    assert len(pages) == 5 * cfg.eval_queries == summary.eval_corpus_pages
    assert set(summary.templates) <= {"table", "bar", "line", "memo", "segments"}
    assert len(set(summary.templates)) >= 3
    meta = json.loads(train.schema.metadata[b"huggingface"])
    assert meta["info"]["features"]["image"] == {"_type": "Image"}


def test_loads_with_hf_datasets_as_images(synthetic):
    import datasets
    from PIL import Image

    cfg, _ = synthetic
    ds = datasets.load_dataset("parquet", data_files=str(Path(cfg.output_dir) / "train" / "*.parquet"), split="train")
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (cfg.page_width, cfg.page_height)


def test_queries_answerable_only_from_their_page():
    train, ev = generate(SyntheticConfig(train_queries=300, eval_queries=30, seed=1))
    pages = {}
    for row in train + ev:
        for p in (row.positive, *row.negatives):
            pages[p.page_id] = p
    # no two pages share (company, year): every fact lives on one page
    keys = [(p.company, p.year) for p in pages.values()]
    assert len(keys) == len(set(keys))
    for row in train + ev:
        pos = row.positive
        assert row.answer and pos.company in row.query and str(pos.year) in row.query
        assert sum(q.text == row.query for q in pos.queries) >= 1
        for neg in row.negatives:
            assert neg.page_id != pos.page_id
            assert neg.company == pos.company or neg.year == pos.year or neg.template == pos.template
    per_page = {}
    for row in train:
        per_page[row.positive.page_id] = per_page.get(row.positive.page_id, 0) + 1
    assert max(per_page.values()) <= 3


def test_jsonl_variant_points_at_files(synthetic):
    cfg, _ = synthetic
    out = Path(cfg.output_dir)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.train_queries
    for r in rows[:10]:
        assert (out / r["image"]).is_file() and (out / r["negative_0"]).is_file()


def test_page_renders_at_requested_size():
    train, _ = generate(SyntheticConfig(train_queries=5, eval_queries=1, seed=2))
    from io import BytesIO

    from PIL import Image

    img = Image.open(BytesIO(page_png(train[0].positive, 300, 400)))
    assert img.size == (300, 400) and img.mode == "RGB"


def test_rerun_with_fewer_rows_leaves_no_stale_files(tmp_path):
    import pyarrow.parquet as pq

    base = dict(output_dir=str(tmp_path), eval_queries=2, page_width=96, page_height=128)
    write_synthetic(SyntheticConfig(train_queries=20, **base), rows_per_file=5)
    write_synthetic(SyntheticConfig(train_queries=6, **base), rows_per_file=5)
    assert pq.read_table(tmp_path / "train").num_rows == 6
    assert len(list((tmp_path / "images").iterdir())) < 20
