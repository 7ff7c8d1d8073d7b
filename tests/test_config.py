from __future__ import annotations

from pathlib import Path

import pytest

from ray_vdr.config import ConfigError, TrainConfig, apply_overrides, load_config
from ray_vdr.train.deepspeed import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads_and_resolves_paths():
    cfg = load_config(ROOT / "configs/demo.yaml")
    assert cfg.model.builder == "tiny-qwen3vl"
    assert Path(cfg.model.name_or_path).is_absolute()
    assert Path(cfg.data.train.uri).is_absolute()
    assert Path(cfg.run.storage_path).is_absolute()
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu


def test_reference_recipe_is_exact():
    cfg = load_config(ROOT / "configs/qwen3vl-2b-vdr.yaml")
    m, t, d = cfg.model, cfg.train, cfg.data
    assert m.name_or_path == "Qwen/Qwen3-VL-Embedding-2B"  # a hub id stays a hub id
    assert (m.dtype, m.attn_implementation) == ("bfloat16", "flash_attention_2")
    assert (m.min_pixels, m.max_pixels) == (28 * 28, 600 * 600)
    assert (t.loss, t.mini_batch_size) == ("cached_mnrl", 1)
    assert t.matryoshka_dims == [2048, 1536, 1024, 512, 256, 128, 64]
    assert (t.per_device_batch_size, t.lr, t.warmup_ratio, t.epochs) == (64, 2e-5, 0.1, 1)
    assert (t.eval_every, t.save_every, t.log_every, cfg.run.keep_checkpoints) == (0.1, 0.1, 0.05, 2)
    assert t.precision == "bf16" and t.duplicate_free_batches
    assert d.train.uri == d.eval.uri == "tomaarsen/llamaindex-vdr-en-train-preprocessed"
    assert (d.train.hf_config, d.eval.hf_config) == ("train", "eval")
    assert d.negative_columns == ["negative_0"]
    assert d.eval_negative_columns == ["negative_0", "negative_1", "negative_2", "negative_3"]
    assert cfg.output.truncate_dim == 1024


def test_8b_variant_is_the_recipe_on_eight_gpus_under_zero2():
    """Qwen3-VL-Embedding-8B: the recipe's data, loss, lr and global batch 64 (8 workers x 8), ZeRO-2, 4096-d."""
    ref = load_config(ROOT / "configs/qwen3vl-2b-vdr.yaml")
    cfg = load_config(ROOT / "configs/qwen3vl-8b-vdr.yaml")
    t = cfg.train
    assert cfg.model.name_or_path == "Qwen/Qwen3-VL-Embedding-8B" and cfg.data == ref.data
    assert t.per_device_batch_size * cfg.scaling.num_workers == ref.train.per_device_batch_size == 64
    assert (t.loss, t.mini_batch_size, t.lr, t.precision) == ("cached_mnrl", 1, 2e-5, "bf16")
    assert t.matryoshka_dims[0] == 4096 and t.matryoshka_dims[1:] == [2048, 1024, 512, 256, 128, 64]
    assert (t.strategy, t.zero_stage, cfg.output.truncate_dim) == ("deepspeed", 2, 1024)
    ds = deepspeed_config(t, bf16=True)
    assert ds["zero_optimization"]["stage"] == 2 and ds["data_types"] == {"grad_accum_dtype": "fp32"}


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.lr=1e-4", "train.matryoshka_dims=[64, 32]",
                                                    "output.truncate_dim=32", "scaling.use_gpu=false",
                                                    "train.max_steps=null"])
    assert cfg.train.lr == 1e-4 and cfg.train.matryoshka_dims == [64, 32] and cfg.train.max_steps is None


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["train.lr=-1"], "train.lr", "greater than 0"),
        (["train.lrr=1"], "train.lrr", "unknown field"),
        (["model.dtype=fp8"], "model.dtype", "float32"),
        (["train.matryoshka_dims=[16, 32, 64]"], "train", "descending"),
        (["output.truncate_dim=48"], "<config>", "never trained"),
        (["train.precision=fp16"], "<config>", "use_gpu"),
        (["model.min_pixels=4096", "model.max_pixels=1024"], "model", "min_pixels"),
        (["scaling.resources_per_worker={GPU: 1}"], "scaling", "use_gpu is false"),
        (["train.mini_batch_size=64"], "train", "per_device_batch_size"),
        (["run.name=bad/name"], "run.name", "pattern"),
        (["data.image.min_side=0"], "data.image.min_side", "greater than 0"),
    ],
)
def test_invalid_values_name_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", overrides)
    msg = str(e.value)
    assert f"  {field}:" in msg and words in msg, msg


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("loss", ["mnrl", "cached_mnrl"])
def test_zero2_and_zero3_take_either_loss(stage, loss):
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.strategy=deepspeed", f"train.zero_stage={stage}",
                                                   f"train.loss={loss}"])
    ds = deepspeed_config(cfg.train, bf16=False)
    assert ds["zero_optimization"]["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == "auto"
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] and zero["contiguous_gradients"] and zero["reduce_bucket_size"] == 50_000_000
    cpu = deepspeed_config(cfg.train, bf16=False, cuda=False)["zero_optimization"]
    assert not cpu["overlap_comm"] and not cpu["contiguous_gradients"]  # only copies on CPU (docs/benchmarks.md)


def test_deepspeed_json_follows_typed_config():
    ds = deepspeed_config(TrainConfig(strategy="deepspeed", zero_stage=1), bf16=True)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}  # the cached loss's many backwards sum in fp32
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["gradient_accumulation_steps"] == "auto"


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": 1}, ["train.lr=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("does-not-exist.yaml")


def test_cli_rejects_bad_config_before_any_work(capsys):
    from ray_vdr.cli import main

    assert main(["config", "-c", str(ROOT / "configs/demo.yaml"), "train.per_device_batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "train.per_device_batch_size" in err
    assert main(["config", "-c", str(ROOT / "configs/demo.yaml")]) == 0
    assert "tiny-qwen3vl" in capsys.readouterr().out


def test_config_module_imports_no_torch_or_ray():
    import subprocess
    import sys

    code = "import sys, ray_vdr.config; print(any(m in sys.modules for m in ('torch', 'ray')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_field_is_described():
    from pydantic import BaseModel

    from ray_vdr import config

    undocumented = []
    for name in config.__all__:
        obj = getattr(config, name)
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            undocumented += [f"{name}.{f}" for f, info in obj.model_fields.items() if not info.description]
    assert not undocumented
