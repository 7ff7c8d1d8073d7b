"""The demo's plan (ray_vdr/demo.py): every stage is a jobs/ entrypoint whose config loads, and the stages hand their
artifacts to each other. The plan's jobs run on a real Ray head in tests/test_jobs.py."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from ray_vdr import demo
from ray_vdr.cli import main
from ray_vdr.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/demo.yaml")


def _stage_configs(tmp_path, overrides=()):
    user = [f"run.storage_path={tmp_path}/runs", f"synthetic.output_dir={tmp_path}/data", *overrides]
    stages = demo.plan(load_config(CONFIG, user), "d")
    return stages, [load_config(CONFIG, demo.stage_overrides(s, user)) for s in stages]


def test_plan_ties_the_stages_together(tmp_path):
    stages, cfgs = _stage_configs(tmp_path)
    assert [s.command for s in stages] == ["make-data", "train", "embed", "embed", "mine", "train-reranker",
                                           "evaluate", "serve"]
    assert len({s.name for s in stages}) == len(stages)
    assert all((ROOT / s.job).is_file() for s in stages if s.job), "every batch stage is a jobs/ entrypoint"
    assert {c.run.uri() for c in cfgs} == {f"{tmp_path}/runs/d"}, "one run name for every stage"
    _, train, corpus, pages, mine, rerank, _, serve = cfgs
    data = f"{tmp_path}/data"
    assert corpus.index.sources == [f"{data}/images/eval"] and pages.index.sources == [f"{data}/images/train"]
    assert corpus.index.output != pages.index.output
    assert mine.mine.index == pages.index.output, "negatives come from the training pages, never the eval corpus"
    assert serve.serve.index == corpus.index.output
    assert serve.serve.live == serve.run.uri("live.json")  # `ray-vdr promote` with it switches the endpoint
    assert rerank.reranker.model.name_or_path == f"{tmp_path}/runs/d/reranker-base"
    assert stages[1].artifacts == (train.run.uri("model"),)


def test_user_overrides_reach_every_stage_and_stage_ones_win(tmp_path):
    stages, cfgs = _stage_configs(tmp_path, ["train.lr=5e-4", "index.output=/elsewhere", "run.name=mine"])
    assert all(c.train.lr == 5e-4 for c in cfgs)
    assert cfgs[2].index.output == f"{tmp_path}/runs/d/index", "the plan places the indexes"
    assert demo.run_name(load_config(CONFIG, ["run.name=mine"]), ["run.name=mine"]) == "mine", "the user's name"
    assert demo.run_name(load_config(CONFIG), []).startswith("demo-"), "a fresh demo run by default"
    merged = demo.stage_overrides(stages[2], ["index.output=/elsewhere", "train.lr=5e-4"])
    assert [o.split("=")[0] for o in merged].count("index.output") == 1


def test_plan_prints_ray_job_submit_commands(tmp_path, capsys):
    assert main(["demo", "-c", CONFIG, "--plan", f"run.storage_path={tmp_path}", "run.name=p"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 8
    for line in lines[:-1]:
        argv = shlex.split(line.replace("$RAY_ADDRESS", "http://head:8265"))
        assert argv[:6] == ["ray", "job", "submit", "--address", "http://head:8265", "--working-dir"]
        job, rest = argv[argv.index("--") + 2], argv[argv.index("--") + 3:]
        assert (ROOT / job).is_file() and rest[:2] == ["--config", CONFIG]
        cfg = load_config(rest[1], rest[2:])  # what the job would load
        assert cfg.run.name == "p" and cfg.run.storage_path == str(tmp_path)
    assert "ray-vdr serve" in lines[-1]


def test_demo_needs_a_synthetic_section(tmp_path, capsys):
    with pytest.raises(ConfigError, match="synthetic"):
        demo.plan(load_config(CONFIG, ["synthetic=null"]), "x")
    assert main(["demo", "-c", CONFIG, "--plan", "synthetic=null"]) == 2
    assert "synthetic" in capsys.readouterr().err
