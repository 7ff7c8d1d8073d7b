"""The command line and the jobs/ entrypoints, run as users run them (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_synthetic_job_writes_the_dataset(tmp_path):
    out = tmp_path / "syn"
    proc = subprocess.run(
        [sys.executable, "jobs/make_synthetic.py", "-c", "configs/demo.yaml", f"synthetic.output_dir={out}",
         "synthetic.train_queries=10", "synthetic.eval_queries=2", "synthetic.page_width=128",
         "synthetic.page_height=160"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_rows"] == 10 and summary["eval_corpus_pages"] == 10
    assert str(out) in proc.stdout


def test_console_script_reports_config_errors():
    proc = subprocess.run(
        [sys.executable, "-m", "ray_vdr.cli", "train", "-c", "configs/demo.yaml", "scaling.num_wrkers=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "scaling.num_wrkers: unknown field" in proc.stderr
    assert "ray" not in proc.stdout.lower()  # failed before any Ray work


def test_embed_names_what_is_missing(tmp_path, capsys):
    from ray_vdr.cli import main

    assert main(["embed", "-c", str(ROOT / "configs/demo.yaml"), "index.sources=[]"]) == 2
    assert "index.sources is empty" in capsys.readouterr().err
    assert main(["embed", "-c", str(ROOT / "configs/demo.yaml"), f"index.sources=[{tmp_path / 'none'}]",
                 f"index.model={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reranker_commands_name_what_is_missing(tmp_path, capsys):
    """mine, train-reranker and evaluate before the steps they build on: exit 2 with what to do, no traceback."""
    from ray_vdr.cli import main

    base = ["-c", str(ROOT / "configs/demo.yaml"), f"run.storage_path={tmp_path}", f"index.output={tmp_path}/index"]
    assert main(["mine", *base]) == 2
    assert "no corpus index at" in capsys.readouterr().err
    assert main(["train-reranker", *base, f"reranker.model.name_or_path={tmp_path}/reranker"]) == 2
    assert "no trained embedder" in capsys.readouterr().err
    assert main(["evaluate", *base]) == 2
    assert "evaluate.model is not set" in capsys.readouterr().err


def test_unreachable_hub_is_one_line_naming_the_field(tmp_path, capsys, monkeypatch):
    """No network: a hub dataset (the reference recipe's data.train) or a hub model that is not cached is one line
    that names the field and the remedies, before any Ray work — never a connection error's traceback. The network
    is replaced by a failing one (no test reaches the Hub)."""
    import huggingface_hub

    from ray_vdr.cli import main

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")

    class Offline(huggingface_hub.HfFileSystem):
        glob = no_network

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", Offline)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    recipe = str(ROOT / "configs/qwen3vl-2b-vdr.yaml")
    assert main(["train", "-c", recipe, f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.name_or_path:") and "cannot be reached (ConnectionError" in err
    assert "HF_HUB_OFFLINE=1" in err and len(err.splitlines()) == 1, err
    assert main(["train", "-c", recipe, f"run.storage_path={tmp_path}", f"model.name_or_path={tmp_path}",
                 "model.builder=tiny-qwen3vl", "train.matryoshka_dims=[64]", "output.truncate_dim=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.train.uri: the Hub dataset 'tomaarsen/llamaindex-vdr-en-train-preprocessed'")
    assert "cannot be reached" in err and len(err.splitlines()) == 1, err


def test_make_training_data_names_what_is_missing(tmp_path, capsys):
    from ray_vdr.cli import main

    config = str(ROOT / "configs/demo-own-docs.yaml")
    assert main(["make-training-data", "-c", config, "queries.sources=[]"]) == 2
    assert "queries.sources is empty" in capsys.readouterr().err
    assert main(["make-training-data", "-c", config, f"queries.sources=[{tmp_path}]", "queries.generator=callable",
                 "queries.callable=no_such_module:f"]) == 2
    assert "queries.callable: 'no_such_module:f' cannot be loaded" in capsys.readouterr().err
