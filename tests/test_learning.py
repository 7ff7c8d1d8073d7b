"""Learning proofs on the README's main config, run as tests on a real local Ray cluster.

1. The tiny Qwen3-VL embedder trained by 2 Ray Train workers on synthetic pages must retrieve the held-out eval
   pages far better than before training. Measured on the CPU machine (2026-11-22): NDCG@10 at dim 64 went
   0.007 → 0.243 (dims 32/16: 0.000 → 0.257, 0.008 → 0.252). Without per-epoch shuffling it reached only 0.10, and a
   broken loss, sharding or collator leaves it near the random 0.01-0.05, so the margin below catches those.
2. A reranker built on that embedder (Dense head) and trained with the reranker task's pieces must fit its training
   pairs (the loss falls below the label prior); the whole Ray pipeline — index, mining, reranker training on
   DeepSpeed, two-stage evaluation — runs in tests/test_mine.py.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def test_reranker_learns_on_the_trained_embedder(demo_run, tmp_path):
    """The reranker task's pieces — a Dense-head reranker built on the trained embedder, (query, page, 1/0) pairs from
    triplet rows, BinaryCrossEntropyLoss with the model's judge prompt, the streaming CrossEncoderTrainer — fit the
    training pairs: the loss falls below the label prior. In process (the Ray pipeline is tested in test_mine.py).
    Training from random weights instead stays at the prior (docs/benchmarks.md), and so would a broken head, loss
    or prompt.
    """
    import random

    import pyarrow.parquet as pq
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from ray_vdr.config import ModelConfig
    from ray_vdr.models.builders import wrap_reranker
    from ray_vdr.models.load import build_model
    from ray_vdr.search import pil_pages
    from ray_vdr.train import RerankerTask, rerank_pairs, streaming_trainer_cls, training_arguments

    cfg, result = demo_run
    path = wrap_reranker(result.model_uri, tmp_path / "reranker", head="dense")
    model = build_model(ModelConfig(name_or_path=str(path), min_pixels=1024, max_pixels=16384), "cpu", reranker=True)
    rng = random.Random(0)

    def rows_of(uri: str, n: int) -> list[dict]:
        table = pq.read_table(uri, columns=["query", "image"]).slice(0, n).to_pylist()
        pages = pil_pages([r["image"]["bytes"] for r in table])
        return [{"query": r["query"], "image": p} for r, p in zip(table, pages, strict=True)]

    train = rows_of(cfg.data.train.uri, 768)
    for r in train:  # negatives: other queries' pages (mostly another year or company)
        for k in range(3):
            r[f"negative_{k}"] = train[rng.randrange(len(train))]["image"]
    evals = rows_of(cfg.data.eval.uri, 40)

    def mrr() -> float:
        total = 0.0
        for i, r in enumerate(evals):
            pages = [r["image"]] + [evals[(i + j) % len(evals)]["image"] for j in (1, 7, 13, 19, 29)]
            s = model.predict([(r["query"], p) for p in pages], batch_size=6, show_progress_bar=False)
            total += 1.0 / (1 + int((s[1:] > s[0]).sum()))
        return total / len(evals)

    before = mrr()
    batches = [rerank_pairs(train[i:i + 8]) for i in range(0, len(train), 8)]
    task = RerankerTask()
    tcfg = cfg.model_copy(deep=True)
    tcfg.train = tcfg.train.model_copy(update={"lr": 1e-3})
    args = training_arguments(tcfg, len(batches), str(tmp_path / "out"), False, task.prompts(model, []),
                              args_cls=CrossEncoderTrainingArguments)
    args.logging_steps, args.save_strategy = len(batches) // 4, "no"
    trainer = streaming_trainer_cls(task.trainer_base())(
        model=model, args=args, train_dataset=task.schema([]), loss=BinaryCrossEntropyLoss(model),
        batch_stream=batches, progress=lambda: 1.0)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = mrr()
    print(f"reranker BCE by quarter: {losses}; MRR of the positive among 6 pages: {before:.3f} -> {after:.3f}")
    # Measured (2026-11-22): BCE by quarter 0.566, 0.561, 0.541, 0.509 (the label prior is 0.562); held-out MRR among
    # 6 pages 0.565 → 0.461, i.e. it fits the training pairs but does not yet generalise in this budget (reported in
    # docs/benchmarks.md, not asserted). A broken head, loss or prompt leaves the loss at the prior.
    assert losses[-1] <= 0.535 and losses[-1] <= losses[0] - 0.025, losses
