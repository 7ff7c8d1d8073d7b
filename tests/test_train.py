"""The first distributed training path: demo config, 2 gloo workers on a private local Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_vdr.config import load_config
from ray_vdr.train import derive_max_steps

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_max_steps_derivation():
    cfg = load_config(ROOT / "configs/demo.yaml")  # 2 workers x 16
    assert derive_max_steps(cfg, 256) == 8
    assert derive_max_steps(cfg, 100) == 3  # the last partial global batch is dropped
    with pytest.raises(ValueError, match="fewer than one global batch"):
        derive_max_steps(cfg, 10)
    with pytest.raises(ValueError, match="max_steps is required"):
        derive_max_steps(cfg, None)


def test_demo_training_on_two_workers(ray_local, synthetic, tiny_qwen, tmp_path):
    from sentence_transformers import SentenceTransformer

    from ray_vdr.train import run

    syn, summary = synthetic
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"model.name_or_path={tiny_qwen}", "model.builder=load",
        f"data.train.uri={syn.output_dir}/train", f"data.eval.uri={syn.output_dir}/eval",
        f"run.storage_path={tmp_path}", "train.per_device_batch_size=8", "synthetic=null",
    ])
    result = run(cfg)
    assert result.metrics["distributed_type"] == "DistributedType.MULTI_CPU"
    assert result.metrics["world_size"] == 2
    assert result.metrics["step"] == summary["train_rows"] // 16
    model = SentenceTransformer(result.model_uri, device="cpu")
    assert model.truncate_dim == 32 and model.encode_query(["q"]).shape == (1, 32)
    saved = json.loads((Path(result.model_uri) / "ray_vdr_train.json").read_text())
    assert saved["config"]["train"]["per_device_batch_size"] == 8
