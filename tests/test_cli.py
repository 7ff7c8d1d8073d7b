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


def _help(capsys, command: str) -> str:
    from ray_vdr.cli import main

    try:
        main([command, "--help"])
    except SystemExit as e:
        assert e.code == 0
    return capsys.readouterr().out


def test_help_lists_the_config_sections_each_command_reads(capsys):
    """Every subcommand's --help (a command missing from COMMAND_SECTIONS fails the parser's construction) names the
    sections it reads with their schema descriptions, and none it does not read."""
    from ray_vdr.config import VDRConfig
    from ray_vdr.config_help import COMMAND_SECTIONS

    for command, sections in COMMAND_SECTIONS.items():
        text = _help(capsys, command).split("config sections this command reads:")[1]
        listed = [line.split()[0] for line in text.splitlines() if line.startswith("  ")]
        assert listed == list(sections), command
        for s in sections:
            assert f"  {s:<10} {VDRConfig.model_fields[s].description}" in text
        assert "ray-vdr config --show SECTION" in text and "SECTION.FIELD=VALUE" in text
    assert "--show [SECTION]" in _help(capsys, "config")


def test_config_show_prints_fields_with_type_default_and_description(capsys):
    from ray_vdr.cli import main
    from ray_vdr.config import ServeAuthConfig, VDRConfig

    assert main(["config", "--show"]) == 0
    out = capsys.readouterr().out
    for name, field in VDRConfig.model_fields.items():
        assert f"  {name:<10} {field.description}" in out
    assert "read by: serve, promote" in out  # the serve section's line
    assert main(["config", "--show", "serve"]) == 0
    out = capsys.readouterr().out
    assert "serve.port: int (>= 1, <= 65535) = 8000\n    HTTP port of the Serve proxy.\n" in out
    assert "serve.auth.keys_file: str | None = null\n" in out
    assert " ".join(ServeAuthConfig.model_fields["keys_file"].description.split()[:6]) in out
    assert 'serve.dtype: "auto" | "float32" | "bfloat16" | "float16" = "auto"' in out
    assert "section.field=value" in out
    assert main(["config", "--show", "data.train"]) == 0
    out = capsys.readouterr().out
    assert "data.train: section | None = null" in out and "data.train.uri: str (required)" in out
    assert "data.query_column" not in out


def test_config_show_rejects_unknown_sections(capsys):
    from ray_vdr.cli import main

    assert main(["config", "--show", "severs"]) == 2
    err = capsys.readouterr().err
    assert "unknown config section 'severs'" in err and "model, data, train, scaling" in err and "serve" in err
    assert main(["config", "--show", "serve.ath"]) == 2
    assert "serve has no field 'ath'; its fields are: index, model" in capsys.readouterr().err
    assert main(["config", "--show", "serve.port.x"]) == 2
    assert "serve.port is a field, not a section" in capsys.readouterr().err
    assert main(["config", "--show", "serve", "-c", str(ROOT / "configs/demo.yaml")]) == 2
    assert "reads no --config" in capsys.readouterr().err
