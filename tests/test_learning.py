"""Learning proofs on the README's main config, run as tests on a real local Ray cluster.

1. The tiny Qwen3-VL embedder trained by 2 Ray Train workers on synthetic pages must retrieve the held-out eval
   pages far better than before training. Measured on the CPU machine (2026-11-22): NDCG@10 at dim 64 went
   0.007 → 0.243 (dims 32/16: 0.000 → 0.257, 0.008 → 0.252). Without per-epoch shuffling it reached only 0.10, and a
   broken loss, sharding or collator leaves it near the random 0.01-0.05, so the margin below catches those.
2. The reranker stage on top of it: index the training pages with the trained embedder, mine hard negatives from
   that index, train the tiny reranker (built on the embedder, Dense head) with BinaryCrossEntropyLoss on 2 Ray Train
   workers, and evaluate both stages on the eval split: the trained reranker must rank better than the same reranker
   untrained at every rerank depth. See the test for the measured figures and margins.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ray_vdr.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory):
    """The demo config's data and embedder training, once for this module: (config, TrainResult)."""
    from ray_vdr.data.synthetic import write_synthetic
    from ray_vdr.train import run

    tmp = tmp_path_factory.mktemp("demo")
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"synthetic.output_dir={tmp}/data", f"data.train.uri={tmp}/data/train",
        f"data.eval.uri={tmp}/data/eval", f"model.name_or_path={tmp}/model", f"run.storage_path={tmp}",
        "synthetic.jsonl=false", "train.eval_every=null",
        f"reranker.model.name_or_path={tmp}/reranker-base", f"index.output={tmp}/train-index",
    ])
    write_synthetic(cfg.synthetic)
    return cfg, run(cfg)


def test_demo_config_learns(demo_run):
    _, result = demo_run
    m = result.metrics
    assert m["ndcg@10"] >= 0.12, result.eval_table
    assert m["ndcg@10"] >= m["ndcg@10_base"] + 0.1, result.eval_table
    report = json.loads((Path(result.model_uri) / "eval.json").read_text())
    for dim, after in report["finetuned"].items():
        assert after["ndcg@10"] >= report["base"][dim]["ndcg@10"] + 0.05, (dim, result.eval_table)


def test_reranker_trained_on_mined_negatives_improves_the_ranking(demo_run):
    """Train pages → index (trained embedder) → mined negatives → reranker on Ray Train → two-stage evaluation."""
    from ray_vdr import index, mine, rerank, two_stage
    from ray_vdr.search import RerankScorer

    cfg, _ = demo_run
    cfg.index.sources = [cfg.data.train.uri]  # the training pages (Parquet): the corpus negatives are mined from
    cfg.mine.queries = cfg.data.train.model_copy(update={"limit": 512})  # half the training queries (suite time)
    cfg.reranker.train.eval_every = None  # evaluated before and after training only
    cfg.reranker.train.strategy = "deepspeed"  # the embedder's DeepSpeed path (ZeRO-1) trains the reranker too
    cfg.reranker.train.zero_stage = 1
    index.run(cfg)
    mined = mine.run(cfg).summary
    assert mined["rows_mined"] > 0.9 * (mined["rows_mined"] + mined["rows_rejected"]), mined

    result = rerank.run(cfg)
    m = result.metrics
    assert m["world_size"] == 2 and result.rows_trained == 2 * mined["rows_mined"], m  # 2 epochs, every row

    base = cfg.model_copy(deep=True)  # the same reranker before training: the reference for the learning margin
    base.evaluate.reranker = cfg.reranker.model.name_or_path
    base.evaluate.output = f"{cfg.run.storage_path}/eval-untrained"
    before = two_stage.run(base)["results"]
    after = two_stage.run(cfg)["results"]
    print("untrained reranker:\n" + two_stage.markdown_table(before))
    print("trained reranker:\n" + two_stage.markdown_table(after))
    # Measured (2026-11-22, 2 CPU cores): NDCG@10 of embed + rerank at depths 10/20/50 went 0.290/0.176/0.046 with
    # the untrained reranker → 0.321/0.209/0.091 trained (+0.031/+0.033/+0.045); embed only: 0.325. The trained tiny
    # reranker does not beat the embedder alone on CPU in this budget (see docs/benchmarks.md): the margin is over the
    # untrained reranker. A loss with flipped labels ranks worse than untrained; a collapsed head (constant scores)
    # is caught below.
    gains = [after[f"rerank@{d}"]["ndcg@10"] - before[f"rerank@{d}"]["ndcg@10"] for d in cfg.evaluate.rerank_depths]
    assert min(gains) > 0 and sum(gains) / len(gains) >= 0.015, (gains, before, after)
    assert Path(cfg.run.uri("eval"), "eval.png").stat().st_size > 0

    # the serving endpoint's scorer loads the trained reranker from its saved path and scores as the model does
    import pyarrow.parquet as pq
    from sentence_transformers import CrossEncoder

    from ray_vdr.search import pil_pages

    cells = pq.read_table(cfg.data.eval.uri, columns=["image"]).column("image").to_pylist()[:8]
    pairs = [("What was the revenue?", page) for page in pil_pages([c["bytes"] for c in cells])]
    reference = CrossEncoder(result.model_uri, device="cpu").predict(pairs)
    assert RerankScorer(result.model_uri, cfg.serve, device="cpu").score(pairs) == pytest.approx(reference, abs=1e-5)
    assert np.ptp(reference) > 1e-3, f"the trained reranker scores every page alike: {reference}"
