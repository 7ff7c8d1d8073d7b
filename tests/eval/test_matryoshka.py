"""The eval split as queries, corpus and relevant pages, and the training reports (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_vdr.config import DataConfig
from ray_vdr.data.triplets import TripletSpec, validate_batch
from ray_vdr.eval.matryoshka import EvalSet, eval_set_from_table, markdown_table, write_reports


@pytest.fixture(scope="module")
def eval_set(synthetic):
    cfg, _ = synthetic
    table = pq.read_table(Path(cfg.output_dir) / "eval")
    accepted, rejects = validate_batch(table, TripletSpec.from_config(DataConfig(), split="eval"))
    assert not rejects
    return eval_set_from_table(accepted)


def test_eval_set_layout(eval_set, synthetic):
    cfg, _ = synthetic
    assert len(eval_set.queries) == cfg.eval_queries
    assert len(eval_set.corpus) == 5 * cfg.eval_queries
    assert all(len(r) == 1 for r in eval_set.relevant.values())


def test_unknown_relevant_id_is_an_error(eval_set):
    with pytest.raises(ValueError, match="not in the corpus"):
        EvalSet(eval_set.queries, eval_set.corpus, {**eval_set.relevant, "q": {"no-such-page"}})


def test_reports(tmp_path):
    before = {64: dict.fromkeys(["ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"], 0.1)}
    after = {64: dict.fromkeys(["ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"], 0.5)}
    table = write_reports(tmp_path, before, after, {"eval_queries": 3})
    assert "0.1000 → 0.5000" in table and "+0.4000" in table
    assert json.loads((tmp_path / "eval.json").read_text())["finetuned"]["64"]["ndcg@10"] == 0.5
    assert (tmp_path / "eval.png").stat().st_size > 1000
    assert markdown_table(before).splitlines()[2].startswith("| 64 | 0.1000")
