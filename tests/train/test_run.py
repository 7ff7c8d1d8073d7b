"""Distributed training: demo config, 2 gloo workers on a private local Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_vdr.config import load_config
from ray_vdr.train.run import plan_steps
from tests.run_checks import check_exactly_once_and_in_sync

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_step_plan():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.epochs=1"])  # 2 workers x 16
    assert plan_steps(cfg, 256) == (8, 128, 256)
    assert plan_steps(load_config(ROOT / "configs/demo.yaml", ["train.epochs=3"]), 256) == (24, 384, 768)
    assert plan_steps(cfg, 100) == (4, 50, 100)  # the final partial batch is trained too
    assert plan_steps(load_config(ROOT / "configs/demo.yaml", ["train.epochs=0.5"]), 256) == (4, 4, 128)
    assert plan_steps(load_config(ROOT / "configs/demo.yaml", ["train.max_steps=3"]), None) == (3, 3, 96)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        plan_steps(cfg, 10)
    with pytest.raises(ValueError, match="max_steps is required"):
        plan_steps(cfg, None)


def test_lr_schedule_follows_rows():
    from ray_vdr.train.trainer import lr_factor

    assert lr_factor(0.0, 0.1) == 0.0 and lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0) and lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1) == 0.0 and lr_factor(1.7, 0.1) == 0.0 and lr_factor(0.5, 0.0) == 0.5


def test_stream_order_depends_on_the_seed_not_on_which_read_task_ends_first(ray_local):
    """The feeder reads rows in the same order whichever read task finishes first (the same seed used to train on
    different batches run to run: docs/bench/notes/learning.md, 2026-12-04); another seed gives another order."""
    import time

    import ray.data

    from ray_vdr.config import TrainConfig
    from ray_vdr.train.run import seeded_stream

    def order(slow_block: int, seed: int) -> list[int]:
        def delay(batch):
            if batch["id"][0] // 16 == slow_block:
                time.sleep(0.5)  # this block's task finishes after the others
            return batch

        stream = seeded_stream(ray.data.range(64, override_num_blocks=4).map_batches(delay, batch_size=None),
                               TrainConfig(seed=seed))
        # read as the feeder reads it: a local shuffle buffer seeded per epoch
        batches = stream.iter_batches(batch_size=8, local_shuffle_buffer_size=16, local_shuffle_seed=seed)
        return [int(i) for batch in batches for i in batch["id"]]

    first = order(slow_block=0, seed=12)
    assert sorted(first) == list(range(64))
    assert order(slow_block=3, seed=12) == first
    assert order(slow_block=0, seed=13) != first


def _config(synthetic, tiny_qwen, tmp_path, *overrides: str):
    syn, _ = synthetic
    return load_config(ROOT / "configs/demo.yaml", [
        f"model.name_or_path={tiny_qwen}", "model.builder=load",
        f"data.train.uri={syn.output_dir}/train", f"data.eval.uri={syn.output_dir}/eval",
        f"run.storage_path={tmp_path}", "train.per_device_batch_size=8", "train.epochs=1", "synthetic=null",
        *overrides,
    ])


def test_preflight_errors_name_the_problem(tmp_path, tiny_qwen, synthetic):
    from ray_vdr.train.run import preflight

    syn, _ = synthetic
    ok = [f"model.name_or_path={tiny_qwen}", "model.builder=load", f"run.storage_path={tmp_path}",
          f"data.train.uri={syn.output_dir}/train", f"data.eval.uri={syn.output_dir}/eval"]
    preflight(load_config(ROOT / "configs/demo.yaml", ok))
    with pytest.raises(FileNotFoundError, match="model.name_or_path: no model at"):
        preflight(load_config(ROOT / "configs/demo.yaml", [*ok, f"model.name_or_path={tmp_path}/missing"]))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        preflight(load_config(ROOT / "configs/demo.yaml", [*ok, "model.name_or_path=org/not-cached-model"]))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="run.storage_path: cannot write"):
        preflight(load_config(ROOT / "configs/demo.yaml", [*ok, f"run.storage_path={blocker}"]))


# Checkpoints and failures: 48 rows, global batch 16, 2 epochs (6 planned steps; more in fact, since the tiny
# synthetic set repeats pages and duplicate-free batches come out smaller); a checkpoint every 2 steps (save_every
# 0.34 of the plan), the latest 2 kept. A kill after step 5 resumes from the checkpoint of step 4 — or of step 2,
# when Ray Train's controller had not yet registered step 4's report as the worker died; a kill after step 7 from
# step 6 (or 4).
RESUMABLE = ["train.epochs=2", "train.save_every=0.34", "train.eval_every=null", "run.keep_checkpoints=2",
             "train.strategy=deepspeed"]
EPOCHS = 2


def _base_ndcg(cfg, synthetic) -> float:
    """NDCG@10 of the untrained model, loaded as the workers load it."""
    from ray_vdr.data.triplets import TripletSpec, validate_batch
    from ray_vdr.eval.matryoshka import MatryoshkaRetrievalEvaluator, eval_set_from_table
    from ray_vdr.models.load import build_model

    syn, _ = synthetic
    rows, _ = validate_batch(pq.read_table(f"{syn.output_dir}/eval"), TripletSpec.from_config(cfg.data, split="eval"))
    model = build_model(cfg.model, device="cpu")
    return MatryoshkaRetrievalEvaluator(eval_set_from_table(rows), [64], batch_size=8)(model)[64]["ndcg@10"]


def test_interrupted_run_resumes_and_recovers_exactly_once(ray_local, synthetic, tiny_qwen, tmp_path):
    """One DeepSpeed run (ZeRO-1, the default stage, with the cached loss; every stage is also held to a plain-MNRL
    reference in tests/train/test_gradcache.py), interrupted twice, both ways a run resumes:

    1. rank 1 is SIGKILLed after step 5 with run.max_failures=0: the run fails and saves no model;
    2. the same run name again, with run.max_failures=1: it resumes from its latest checkpoint (model, optimizer,
       scheduler, data position), and rank 1 is killed once more, after step 7: Ray Train restarts the worker group,
       which rewinds to the latest checkpoint again.

    Every row is then trained exactly once per epoch, the ranks end in sync with the optimizer's own step count
    continued, the eval table still compares with the untrained model, the latest 2 checkpoints are kept, and a
    rerun of the finished run trains nothing. (DDP recovers through the same feeder, state files and checkpoints; it
    trains, evaluates and saves in tests/test_jobs.py.)"""
    from ray.train import TrainingFailedError

    from ray_vdr.train.run import run

    _, summary = synthetic
    first, second = tmp_path / "killed-at-5", tmp_path / "killed-at-7"
    with pytest.raises(TrainingFailedError):
        run(_config(synthetic, tiny_qwen, tmp_path, *RESUMABLE, "run.max_failures=0"),
            chaos={"rank": 1, "step": 5, "marker": str(first)})
    assert first.exists() and not (tmp_path / "demo" / "model").exists()

    cfg = _config(synthetic, tiny_qwen, tmp_path, *RESUMABLE, "run.max_failures=1")
    result = run(cfg, chaos={"rank": 1, "step": 7, "marker": str(second)})
    assert second.exists(), "the resumed run's worker was not killed"
    assert result.metrics["distributed_type"] == "DistributedType.DEEPSPEED"
    assert result.metrics["resumed_from_step"] in (4, 6) and result.metrics["step"] >= 7
    check_exactly_once_and_in_sync(result, tmp_path / "demo", summary.train_rows, epochs=EPOCHS)
    # Ray Train kept the latest 2 checkpoints: the last intermediate one and the final model
    kept = sorted(p for p in (tmp_path / "demo").iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert len(kept) == 2
    last_step = json.loads((kept[0] / "ray_vdr_state.json").read_text())["step"]
    assert last_step % 2 == 0 and result.metrics["step"] - 2 < last_step < result.metrics["step"] + 1
    assert (kept[1] / "ray_vdr_train.json").exists()
    # the eval table still compares with the model before any training (kept in the checkpoint, not re-measured
    # on the resumed weights)
    report = json.loads((Path(result.model_uri) / "eval.json").read_text())
    assert report["base"]["64"]["ndcg@10"] == pytest.approx(_base_ndcg(cfg, synthetic), abs=1e-6)

    # once finished, a rerun does not train again
    again = run(cfg)
    assert again.model_uri == result.model_uri and again.metrics["step"] == result.metrics["step"]
    assert again.rows_trained == result.rows_trained


def test_multi_vector_embedder_learns_on_two_workers(ray_local, tmp_path):
    """model.kind multi_vector (configs/demo-colvdr.yaml): the tiny Qwen3-VL becomes a MultiVectorEncoder (a token
    head of 64 dims, MaxSim) and trains with Sentence Transformers' cached multi-vector MNRL inside its MatryoshkaLoss
    on 2 DDP workers fed by the feeder: every row exactly once per epoch, ranks in sync, and it learns to retrieve the
    40 held-out queries' pages among 200.

    Measured (2026-12-06, the demo's synthetic data, 512 rows x 2 epochs, 34 steps, 42-52 s of training here): the
    mean rank of a question's own page among the 200 went 105.0 (random: 100.5, standard deviation ~9 over 40
    questions) → 33.8, 45.7 and 47.4 in three runs, 60.0 with half the rows; NDCG@10 at dim 64 0.018 → 0.057-0.137 (too
    few queries to hold a bar on it alone). The bar sits ~3 standard deviations below random; a loss that does not
    reach the token vectors, or scoring that ignores them, stays at random."""
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

    from ray_vdr.config import ModelConfig, SyntheticConfig
    from ray_vdr.data.synthetic import write_synthetic
    from ray_vdr.models.load import build_model
    from ray_vdr.models.processor import install_image_only_processor
    from ray_vdr.train.run import run

    data = tmp_path / "data"
    write_synthetic(SyntheticConfig(output_dir=str(data), train_queries=512, eval_queries=40, num_negatives=1,
                                    eval_negatives=4, seed=0, jsonl=False))
    cfg = load_config(ROOT / "configs/demo-colvdr.yaml", [
        f"synthetic.output_dir={data}", f"data.train.uri={data}/train", f"data.eval.uri={data}/eval",
        f"model.name_or_path={tmp_path}/model", f"run.storage_path={tmp_path}/runs", "run.name=mv", "train.epochs=2"])
    result = run(cfg)
    m = result.metrics
    assert m["world_size"] == 2 and m["distributed_type"] == "DistributedType.MULTI_CPU", m
    check_exactly_once_and_in_sync(result, tmp_path / "runs" / "mv", 512, epochs=2)
    report = json.loads((Path(result.model_uri) / "eval.json").read_text())
    base, finetuned = report["base"]["32"]["mean_rank"], report["finetuned"]["32"]["mean_rank"]  # by MaxSim
    print(f"own page's mean rank at dim 32: {base:.1f} -> {finetuned:.1f}\n{result.eval_table}")
    assert base >= 85 and finetuned <= 75, (base, finetuned, result.eval_table)
    assert m["eval_dim"] == 64 and m["ndcg@10"] > m["ndcg@10_base"], result.eval_table

    install_image_only_processor()
    model = MultiVectorEncoder(result.model_uri, device="cpu")
    tokens = model.encode_query(["What was the revenue?"])[0]
    assert model.truncate_dim == 32 and tokens.ndim == 2 and tokens.shape[1] == 32
    with pytest.raises(ValueError, match="multi-vector model"):  # not loaded as a single-vector one by mistake
        build_model(ModelConfig(name_or_path=result.model_uri), "cpu")
