"""The reranker pieces without Ray: both head styles, the pairs a triplet becomes, and the reranker's training run
(its config, and where serving and evaluation find its model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_vdr.config import DataConfig, load_config
from ray_vdr.data.triplets import TripletSpec, validate_batch
from ray_vdr.eval.matryoshka import eval_set_from_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def eval_set(synthetic):
    cfg, _ = synthetic
    accepted, _ = validate_batch(pq.read_table(Path(cfg.output_dir) / "eval"),
                                 TripletSpec.from_config(DataConfig(), split="eval"))
    return eval_set_from_table(accepted)


def test_dense_head_reranker_built_on_an_embedder(tiny_qwen, tmp_path, eval_set):
    """'A reranker built on a VLM': the embedder's backbone (a Qwen3VLModel folder), last-token pooling, a Dense
    layer to one score; it loads with CrossEncoder(path) and scores (query, page image) pairs."""
    from sentence_transformers import CrossEncoder

    from ray_vdr.models.builders import wrap_reranker
    from ray_vdr.models.processor import install_image_only_processor

    install_image_only_processor()
    path = wrap_reranker(tiny_qwen, tmp_path / "dense", head="dense")
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Dense"]
    dense = json.loads((path / modules[2]["path"] / "config.json").read_text())
    assert dense["out_features"] == 1 and dense["module_output_name"] == "scores"
    model = CrossEncoder(str(path), device="cpu")
    assert model.num_labels == 1 and model.default_prompt_name == "rerank"
    pages = list(eval_set.corpus.values())[:3]
    scores = model.predict([("What was the revenue?", p) for p in pages])
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1)) and len(set(scores.round(6))) == 3

    # the logit head needs "yes"/"no" as single tokens: the embedder's tokenizer does not have them
    with pytest.raises(ValueError, match="one token"):
        wrap_reranker(tiny_qwen, tmp_path / "logit", head="logit")


def test_a_triplet_becomes_one_positive_and_k_negative_pairs():
    from ray_vdr.train.recipes import rerank_pairs

    rows = [{"query": "q1", "image": "P1", "negative_0": "N1", "negative_1": "M1"}, {"query": "q2", "image": "P2",
                                                                                      "negative_0": "N2",
                                                                                      "negative_1": "M2"}]
    pairs = rerank_pairs(rows)
    assert [(p["query"], p["document"], p["label"]) for p in pairs] == [
        ("q1", "P1", 1.0), ("q1", "N1", 0.0), ("q1", "M1", 0.0),
        ("q2", "P2", 1.0), ("q2", "N2", 0.0), ("q2", "M2", 0.0)]


def test_reranker_training_config_reads_the_mined_triplets():
    from ray_vdr.train.reranker import training_config

    cfg = load_config(ROOT / "configs/demo.yaml", ["run.name=r1", "run.storage_path=/data/runs"])
    t = training_config(cfg)
    assert t.run.name == "r1-reranker" and t.train.loss == "bce" and t.output.truncate_dim is None
    assert t.data.train.uri == "/data/runs/r1/mined/triplets" and t.data.num_negatives == cfg.mine.num_negatives
    assert t.model.builder == cfg.reranker.model.builder
    if t.model.builder == "reranker-from-vlm":
        assert t.model.base_model == "/data/runs/r1/model", "built on the embedder this config trained"
    with pytest.raises(ValueError, match="matryoshka"):
        load_config(ROOT / "configs/demo.yaml", ["reranker.train.matryoshka_dims=[32]"])


def test_serving_and_evaluation_default_to_the_trained_reranker(tmp_path):
    from ray_vdr.eval.two_stage import resolve
    from ray_vdr.models.load import trained_reranker

    cfg = load_config(ROOT / "configs/demo.yaml", ["run.name=r2", f"run.storage_path={tmp_path}"])
    (tmp_path / "r2" / "model").mkdir(parents=True)
    (tmp_path / "r2" / "model" / "modules.json").write_text("[]")
    assert trained_reranker(cfg) is None and resolve(cfg)[1] is None, "no reranker run yet: embed only"
    saved = tmp_path / "r2-reranker" / "model"
    saved.mkdir(parents=True)
    (saved / "modules.json").write_text("[]")
    assert trained_reranker(cfg) == str(saved) and resolve(cfg)[1] == str(saved)
