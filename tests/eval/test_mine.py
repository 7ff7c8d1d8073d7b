"""Hard-negative mining: the selection rule (no Ray), and the job on a real local Ray cluster over a real FAISS index
of the synthetic training pages — every training row mined or rejected exactly once, negatives from the rank window
and never the positive, a rerun that continues where an interrupted one stopped, and changed settings refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_vdr.config import MineConfig, load_config
from ray_vdr.eval.mine import select_negatives

ROOT = Path(__file__).resolve().parents[2]


def _hits(n: int) -> list[dict]:
    return [{"key": f"k{r}", "position": r, "rank": r, "score": 1.0 - r / 100, "doc_id": f"d{r}"}
            for r in range(1, n + 1)]


def test_selection_takes_the_window_and_drops_the_positive_copies_and_the_margin():
    cfg = MineConfig(num_negatives=2, rank_min=2, rank_max=6, margin=None, duplicate_similarity=0.99)
    chosen, dropped = select_negatives(_hits(10), "k3", 0.5, {4: 0.995}, cfg)
    assert [h["rank"] for h in chosen] == [2, 5], "rank 1 is outside the window, 3 is the positive, 4 its copy"
    assert dropped == {"positive": 1, "same_document": 0, "near_duplicate": 1, "within_margin": 0}
    # the positive's own document excluded: its other pages are dropped, the next hits taken
    hits = [{**h, "doc_id": "doc-a" if h["rank"] in (2, 5) else h["doc_id"]} for h in _hits(10)]
    chosen, dropped = select_negatives(hits, "k3", 0.5, {4: 0.995}, cfg, exclude_doc="doc-a")
    assert [h["rank"] for h in chosen] == [6] and dropped["same_document"] == 2

    # the margin: the positive scores 0.97, so candidates scoring >= 0.97 - 0.02 are dropped (ranks 1-5)
    cfg = MineConfig(num_negatives=2, rank_min=1, rank_max=10, margin=0.02, duplicate_similarity=0.99)
    chosen, dropped = select_negatives(_hits(10), "none", 0.97, {}, cfg)
    assert [h["rank"] for h in chosen] == [6, 7] and dropped["within_margin"] == 5

    # random sampling: k of the eligible hits in rank order, the same draw for the same row on every run
    cfg = MineConfig(num_negatives=3, rank_min=1, rank_max=10, margin=None, sampling="random", seed=1)
    draws = {tuple(h["rank"] for h in select_negatives(_hits(10), "k3", 0.5, {}, cfg, row_id=f"r{i}")[0])
             for i in range(20)}
    assert all(len(d) == 3 and list(d) == sorted(d) and 3 not in d for d in draws) and len(draws) > 5
    assert select_negatives(_hits(10), "k3", 0.5, {}, cfg, row_id="r1") == select_negatives(
        _hits(10), "k3", 0.5, {}, cfg, row_id="r1")

    # not enough left in the window: fewer than asked (the job turns that into a reject record)
    cfg = MineConfig(num_negatives=3, rank_min=1, rank_max=3, margin=None)
    chosen, _ = select_negatives(_hits(10), "k2", 0.5, {}, cfg)
    assert [h["rank"] for h in chosen] == [1, 3]


def test_config_refuses_a_window_smaller_than_k():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="fewer pages than num_negatives"):
        MineConfig(num_negatives=5, rank_min=3, rank_max=6)
    with pytest.raises(ValidationError, match="rank_min"):
        MineConfig(rank_min=9, rank_max=3)


def _mine(synthetic, tiny_qwen, tmp_path, *extra: str, resume: bool = True):
    """Embed the training pages, mine them; every row mined or rejected once, the window and order held. ``resume``:
    also an interrupted run's rerun and changed settings refused (index-independent: once, on the single-vector
    index)."""
    from ray_vdr.corpus import embed
    from ray_vdr.corpus.store import IndexMismatch
    from ray_vdr.eval import mine

    syn, _ = synthetic
    jsonl = Path(syn.output_dir) / "train.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    pages = sorted({str(jsonl.parent / r[c]) for r in rows for c in ("image", "negative_0")})
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"index.model={tiny_qwen}", f"index.sources={json.dumps(pages)}", f"index.output={tmp_path}/index",
        "index.batch_size=8", "index.dim=32", "synthetic=null", f"data.train.uri={syn.output_dir}/train",
        f"data.eval.uri={syn.output_dir}/eval", f"mine.output={tmp_path}/mined", "mine.num_negatives=2",
        "mine.rank_min=2", "mine.rank_max=8", "mine.margin=null", "mine.duplicate_similarity=1.0", "mine.batch_size=8",
        *extra])
    embed.run(cfg)
    result = mine.run(cfg)
    s = result.summary
    assert s.rows_mined + s.rows_rejected == len(rows) and s.input_rejects == 0

    def outcome():
        mined = pq.read_table(f"{result.output}/triplets")
        rejects = pq.read_table(f"{result.output}/rejects") if Path(result.output, "rejects").is_dir() else None
        ids = mined.column("row_id").to_pylist() + (rejects.column("row_id").to_pylist() if rejects else [])
        return mined, ids

    table, ids = outcome()
    assert len(ids) == len(set(ids)) == len(rows), "every training row mined or rejected, once"
    index_pages = set(pq.read_table(f"{tmp_path}/index/pages", columns=["image"]).column("image").to_pylist())
    for row in table.to_pylist():
        negatives = [row["negative_0"], row["negative_1"]]
        assert row["image"] not in negatives, "a negative is never the positive"
        assert all(n in index_pages for n in negatives), "negatives are pages of the index"
        assert all(2 <= r <= 8 for r in row["negative_ranks"])
        assert row["negative_ranks"] == sorted(row["negative_ranks"])
        assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)

    if not resume:
        return cfg, table
    # an interrupted run: the shards of one batch are lost; the rerun mines exactly those rows again
    shards = sorted(Path(result.output, "triplets").glob("part-*.parquet"))
    lost = pq.read_table(shards[0]).num_rows
    shards[0].unlink()
    again = mine.run(cfg).summary
    assert again.rows_done_before == len(rows) - lost and again.rows_mined + again.rows_rejected == lost
    _, ids = outcome()
    assert len(ids) == len(set(ids)) == len(rows)

    # negatives mined with other settings are not mixed into the same output
    cfg.mine.num_negatives = 3
    with pytest.raises(IndexMismatch, match="num_negatives"):
        mine.run(cfg)
    cfg.mine.num_negatives = 2
    return cfg, outcome()[0]


@pytest.fixture(scope="module")
def mined(ray_local, synthetic, tiny_qwen, tmp_path_factory):
    return _mine(synthetic, tiny_qwen, tmp_path_factory.mktemp("mine"))


@pytest.mark.slow
def test_mining_job_exactly_once_resumable_and_bound_to_its_settings(mined):
    _, table = mined
    assert table.num_rows > 0


@pytest.mark.slow
def test_mining_from_a_multi_vector_index(ray_local, synthetic, tiny_colqwen, tmp_path):
    """The same job over a multi-vector index (pooled token vectors, MaxSim): every row mined or rejected once, the
    window and order held (_mine; its resume and settings checks ran on the single-vector index: they do not depend
    on the index's kind); the scores are MaxSim, as the index ranks."""
    from ray_vdr.corpus.late import maxsim, unpack_tokens
    from ray_vdr.models.encoder import IndexEncoder
    from ray_vdr.models.load import embedder_binding

    cfg, table = _mine(synthetic, tiny_colqwen, tmp_path, "index.late.pooling=2", "index.late.k_sim=3",
                       "index.late.d_proj=8", "index.late.reps=4", resume=False)
    assert table.num_rows > 0
    row = table.slice(0, 1).to_pylist()[0]
    pages = pq.read_table(f"{tmp_path}/index/pages", columns=["image", "tokens"]).to_pylist()
    tokens = {p["image"]: unpack_tokens(p["tokens"], 32, "fp16") for p in pages}
    q = IndexEncoder(embedder_binding(cfg.model, str(tiny_colqwen))).encode_queries([row["query"]])[0]
    want = [float(maxsim(q, [tokens[row[f"negative_{i}"]]])[0]) for i in range(2)]
    np.testing.assert_allclose(row["negative_scores"], want, atol=2e-3)


@pytest.mark.slow
def test_reranker_pipeline_on_ray(mined):
    """The mined triplets train a reranker (Dense head built on the embedder) on 2 Ray Train workers under DeepSpeed
    ZeRO-1 — the embedder's machinery — and the two-stage evaluation and the serving scorer load what it saved.
    (That the reranker learns is shown in test_jobs.py; these tiny random models only check the plumbing.)"""
    import numpy as np
    from sentence_transformers import CrossEncoder

    from ray_vdr.data.images import pil_pages
    from ray_vdr.eval import two_stage
    from ray_vdr.train import reranker
    from ray_vdr.train.artifacts import FINAL_FILE
    from serving.core import RerankScorer

    cfg, table = mined
    out = Path(cfg.mine.output).parent
    cfg.reranker.model.name_or_path = str(out / "reranker-base")
    cfg.reranker.model.base_model = cfg.index.model  # the (random) tiny embedder: a reranker built on a VLM folder
    cfg.reranker.data = None
    for key, value in {"per_device_batch_size": 4, "epochs": 1.0, "strategy": "deepspeed", "zero_stage": 1,
                       "eval_every": None, "save_every": None}.items():
        setattr(cfg.reranker.train, key, value)
    cfg.run.storage_path, cfg.run.name = str(out / "runs"), "pipe"
    result = reranker.run(cfg)
    m = result.metrics
    assert m["distributed_type"] == "DistributedType.DEEPSPEED" and m["world_size"] == 2, m
    assert result.rows_trained + result.rows_dropped == table.num_rows, "every mined row once (1 epoch)"
    assert {"ndcg@10_base", "ndcg@10", "mrr@10"} <= set(m), "reranking evaluated before and after training"
    saved = Path(result.model_uri)
    assert json.loads((saved / FINAL_FILE).read_text())["config"]["train"]["loss"] == "bce"
    modules = [x["type"].rsplit(".", 1)[-1] for x in json.loads((saved / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense"]
    base = CrossEncoder(cfg.reranker.model.name_or_path, device="cpu")
    trained = CrossEncoder(str(saved), device="cpu")
    assert any(not np.allclose(a.detach(), b.detach()) for a, b in zip(base.parameters(), trained.parameters(),
                                                                        strict=True)), "training changed the weights"

    cfg.evaluate.model = cfg.index.model
    cfg.evaluate.rerank_depths = [5, 10]
    report = two_stage.run(cfg)
    assert report.reranker == result.model_uri, "evaluation defaults to the reranker this config trained"
    assert set(report.results) == {"embed only", "rerank@5", "rerank@10"}
    assert (Path(report.output) / "eval.png").stat().st_size > 0 and (Path(report.output) / "eval.md").is_file()

    pairs = [(row["query"], page) for row, page in zip(table.slice(0, 4).to_pylist(),
                                                       pil_pages(table.column("image").to_pylist()[:4]), strict=True)]
    scorer = RerankScorer(result.model_uri, cfg.serve, device="cpu")  # what the serving Reranker deployment runs
    assert scorer.score(pairs) == pytest.approx(trained.predict(pairs), abs=1e-5)
