"""GradCache under every strategy, held to one reference: one optimizer step of the cached loss (CachedMNRL in
MatryoshkaLoss, in-batch negatives gathered across 2 gloo workers) under DDP and DeepSpeed ZeRO-1/2/3 must give
the loss, gradient norm and updated parameters of a single process training plain MNRL + Matryoshka on the same
global batch (fp32). The bf16 runs (bf16 weights, fp32 gradient accumulation; CPU bf16 stands in for the GPU) are
held to the same reference at bf16 tolerances. The multi-vector embedder (its cached loss in its MatryoshkaLoss,
MaxSim over token vectors) is held to its plain loss in the same way."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_vdr.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
ONE_STEP = ["train.max_steps=1", "train.per_device_batch_size=4", "train.mini_batch_size=2", "train.warmup_ratio=0",
            "train.weight_decay=0", "train.save_every=null", "train.eval_every=null", "train.log_every=1",
            "data.eval=null", "synthetic=null", "model.builder=load"]


_REFERENCES: dict[tuple, tuple[float, float, dict]] = {}  # by precision and rows: a strategy does not change it


def _reference(cfg, rows: pa.Table) -> tuple[float, float, dict]:
    """Plain MNRL + Matryoshka, one process, the whole global batch, one step with the same arguments."""
    key = (cfg.train.precision, tuple(rows.column("row_id").to_pylist()), str(cfg.model.lora), cfg.model.kind)
    if key not in _REFERENCES:
        _REFERENCES[key] = _train_reference(cfg, rows)
    return _REFERENCES[key]


def _train_reference(cfg, rows: pa.Table) -> tuple[float, float, dict]:
    import tempfile

    import datasets
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer

    from ray_vdr.models.load import build_model
    from ray_vdr.train.recipes import build_loss
    from ray_vdr.train.trainer import training_arguments

    multi = cfg.model.kind == "multi_vector"
    model = build_model(cfg.model, device="cpu")
    if cfg.model.lora is not None:
        from ray_vdr.models.lora import add_lora, merge_lora

        add_lora(model, cfg.model.lora, cfg.train.seed)
    plain = cfg.model_copy(deep=True)
    plain.train = plain.train.model_copy(update={"loss": "mnrl", "strategy": "ddp", "zero_stage": 1})
    cols = ["image", "negative_0"]
    features = datasets.Features({"query": datasets.Value("string"), **{c: datasets.Image() for c in cols}})
    data = {"query": rows.column("query").to_pylist()} | {
        c: [{"bytes": b, "path": None} for b in rows.column(c).to_pylist()] for c in cols}
    prompts = {"query": model.prompts.get("query")} | {c: model.prompts.get("document") for c in cols}
    args = training_arguments(plain, 1, tempfile.mkdtemp(), False, {k: v for k, v in prompts.items() if v})
    args.per_device_train_batch_size = rows.num_rows
    if multi:
        from sentence_transformers.multi_vector_encoder import (
            MultiVectorEncoderTrainer,
            MultiVectorEncoderTrainingArguments,
        )

        args = training_arguments(plain, 1, tempfile.mkdtemp(), False, {k: v for k, v in prompts.items() if v},
                                  args_cls=MultiVectorEncoderTrainingArguments)
        args.per_device_train_batch_size = rows.num_rows
    trainer_cls = MultiVectorEncoderTrainer if multi else SentenceTransformerTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=datasets.Dataset.from_dict(
        data, features=features), loss=build_loss(model, plain.train, gather=False))
    out = trainer.train()
    grad_norm = next(float(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h)
    adapters = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    if cfg.model.lora is not None:
        merge_lora(model)  # the worker saves the merged model
    return out.training_loss, grad_norm, {k: v.detach().clone() for k, v in model.state_dict().items()} | {
        "adapters": adapters}


# fp32: DDP and ZeRO-2 (bucketed reduction, the stage that fails upstream). bf16 (DeepSpeed's BF16_Optimizer): ZeRO-1
# and ZeRO-3 (sharded weights). Each case costs ~50 s of suite time; ZeRO-1 fp32 also trains in tests/eval/test_mine.py
# and the worker-failure test.
# Multi-vector (MultiVectorEncoder, its cached loss in its MatryoshkaLoss, MaxSim): ZeRO-3 fp32; DDP and ZeRO-2 passed
# the same test (2026-12-06) and are left out for the suite's time.
@pytest.mark.parametrize("strategy,precision,config", [
    ("ddp", "fp32", "demo"), ("zero2", "fp32", "demo"), ("zero1", "bf16", "demo"), ("zero3", "bf16", "demo"),
    ("zero3", "fp32", "demo-colvdr")])
def test_cached_loss_equals_plain_reference(ray_local, synthetic, tiny_qwen, tmp_path, strategy, precision, config):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

    from ray_vdr.config import DataConfig
    from ray_vdr.data.triplets import TripletSpec, validate_batch
    from ray_vdr.train.run import run

    syn, _ = synthetic
    extra = ["train.strategy=ddp"] if strategy == "ddp" else ["train.strategy=deepspeed",
                                                               f"train.zero_stage={strategy[-1]}"]
    cfg = load_config(ROOT / f"configs/{config}.yaml", [
        f"model.name_or_path={tiny_qwen}", f"data.train.uri={syn.output_dir}/train", f"run.storage_path={tmp_path}",
        *ONE_STEP, *extra, f"train.precision={precision}", "run.name=demo"])
    result = run(cfg)
    assert result.metrics["step"] == 1
    assert result.metrics["peak_memory_bytes"] > 100 * 2**20  # a worker holding torch and the model

    # the global batch the workers trained, in rank order
    audit = pq.read_table(tmp_path / "demo" / "row_ids").sort_by([("rank", "ascending")])
    ids = audit.column("row_id").to_pylist()
    assert len(ids) == 8
    table, _ = validate_batch(pq.read_table(f"{syn.output_dir}/train"), TripletSpec.from_config(DataConfig(),
                                                                                                split="train"))
    by_id = {r: i for i, r in enumerate(table.column("row_id").to_pylist())}
    rows = table.take([by_id[i] for i in ids])

    loss, grad_norm, params = _reference(cfg, rows)
    params = {k: v for k, v in params.items() if k != "adapters"}
    model_cls = MultiVectorEncoder if cfg.model.kind == "multi_vector" else SentenceTransformer
    trained = model_cls(result.model_uri, device="cpu").state_dict()
    lr = cfg.train.lr
    if precision == "bf16":
        # bf16 forwards: the loss within 0.2 %, the gradient norm within 2 % (measured: 0.05 % and 0.5 %). The
        # weights are bf16: each must be within one step (2·lr) of the reference's plus bf16 rounding, and at most
        # 3 % of them off by more than half a step (measured: 1.0-1.1 %, where bf16 noise flips a small gradient).
        assert result.metrics["train_loss"] == pytest.approx(loss, rel=2e-3)
        assert result.metrics["last_grad_norm"] == pytest.approx(grad_norm, rel=2e-2)
        off = 0
        for name, ref in params.items():
            diff = (trained[name].float() - ref).abs() - ref.abs() * 2**-8
            assert float(diff.max()) <= 2.1 * lr, name
            off += int((diff > lr / 2).sum())
        assert off <= 0.03 * sum(ref.numel() for ref in params.values()), off
        return
    assert result.metrics["train_loss"] == pytest.approx(loss, rel=1e-4)
    assert result.metrics["last_grad_norm"] == pytest.approx(grad_norm, rel=1e-3)
    # The first AdamW step moves each weight by about lr * sign(g): equal within float error, except for the few
    # weights whose gradient is ~0, where float reduction order can flip the sign. Allow those (at most 1 in
    # 10,000, never more than one step apart); the loss and gradient-norm checks above hold the magnitude.
    off = sum(int(((trained[n] - ref).abs() > 2e-5).sum()) for n, ref in params.items())
    total = sum(ref.numel() for ref in params.values())
    assert off <= total * 1e-4, (off, total)
    for name, ref in params.items():
        torch.testing.assert_close(trained[name], ref, rtol=0, atol=2 * lr, msg=name)


# ZeRO-3 (sharded weights, merged under the full-weight gather); DDP and ZeRO-2 passed the same test (2026-12-06)
# and are left out for the suite's time
@pytest.mark.parametrize("strategy", ["zero3"])
def test_lora_under_ddp_equals_single_process_lora_and_trains_only_adapters(ray_local, synthetic, tiny_qwen,
                                                                             tmp_path, strategy):
    """``model.lora``: one step of the cached loss on 2 workers gives the loss, gradient norm and adapters of a
    single process training the same seeded adapters on the same global batch; only adapter parameters trained (the
    merged model differs from the base in the adapted layers' weights only), and the adapters are saved alone."""
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from ray_vdr.config import DataConfig
    from ray_vdr.data.triplets import TripletSpec, validate_batch
    from ray_vdr.train.run import run

    syn, _ = synthetic
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"model.name_or_path={tiny_qwen}", f"data.train.uri={syn.output_dir}/train", f"run.storage_path={tmp_path}",
        *ONE_STEP, "train.lr=1e-2", "model.lora={rank: 4, dropout: 0.0}",
        *(["train.strategy=ddp"] if strategy == "ddp" else ["train.strategy=deepspeed",
                                                             f"train.zero_stage={strategy[-1]}"])])
    result = run(cfg)
    audit = pq.read_table(tmp_path / "demo" / "row_ids").sort_by([("rank", "ascending")])
    table, _ = validate_batch(pq.read_table(f"{syn.output_dir}/train"), TripletSpec.from_config(DataConfig(),
                                                                                                split="train"))
    by_id = {r: i for i, r in enumerate(table.column("row_id").to_pylist())}
    rows = table.take([by_id[i] for i in audit.column("row_id").to_pylist()])
    loss, grad_norm, params = _reference(cfg, rows)
    print(f"LoRA {strategy}: loss {result.metrics['train_loss']:.6f} vs {loss:.6f}, gradient norm "
          f"{result.metrics['last_grad_norm']:.6f} vs {grad_norm:.6f} (2 workers vs one process)")
    assert result.metrics["train_loss"] == pytest.approx(loss, rel=1e-4)
    assert result.metrics["last_grad_norm"] == pytest.approx(grad_norm, rel=1e-3)

    params = dict(params)  # the reference is shared between the cases
    adapters = params.pop("adapters")
    saved = load_file(str(Path(result.model_uri) / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(adapters) > 0
    lr, off, total = cfg.train.lr, 0, 0
    for name, ref in adapters.items():  # ST: "0.model.<name>.lora_B.default.weight"; PEFT: "<name>.lora_B.weight"
        got = saved[name.split(".", 2)[2].replace(".default.", ".")]
        torch.testing.assert_close(got, ref, rtol=0, atol=2 * lr, msg=name)  # never more than one step apart
        off, total = off + int(((got - ref).abs() > 2e-5).sum()), total + ref.numel()
    print(f"adapter elements off by more than 2e-5: {off} of {total}")
    # as the full-weight cases: AdamW's first step moves each weight by ~lr·sign(g), so a gradient of ~0 can flip
    # with the reduction order; allow those few
    assert off <= total * 1e-3, (off, total)
    assert any(float(v.abs().max()) > 0 for k, v in adapters.items() if "lora_B" in k), "the adapters trained"

    trained = SentenceTransformer(result.model_uri, device="cpu").state_dict()
    base = SentenceTransformer(str(tiny_qwen), device="cpu").state_dict()
    assert not any("lora_" in k for k in trained), "the saved model is merged: no adapter layers"
    adapted = {k.replace(".lora_B.default.weight", ".weight") for k in adapters if "lora_B" in k}
    changed = {k for k, v in trained.items() if not torch.equal(v, base[k])}
    assert changed == adapted, sorted(changed ^ adapted)[:5]
    for name, ref in params.items():
        torch.testing.assert_close(trained[name], ref, rtol=0, atol=1e-3, msg=name)  # merged: B·A·scale, B ~ lr
