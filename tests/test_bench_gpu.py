"""bench/gpu.sh, the one prepared GPU run, in its CPU dry run: every figure is printed and written, with Ray, DeepSpeed
and FAISS unimportable, as on the GPU image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Put first on PYTHONPATH, this makes the packages the GPU image lacks look absent to every process of the run: no
# module spec (importlib.util.find_spec answers None, so transformers sees no DeepSpeed), no import, no distribution.
HIDE_PACKAGES = '''
import sys

HIDDEN = {"ray", "deepspeed", "faiss"}
HIDDEN_DISTRIBUTIONS = {"ray", "deepspeed", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12"}


class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        found = getattr(self.finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs)
        return (d for d in found if (d.metadata["Name"] or "").lower().replace("_", "-") not in HIDDEN_DISTRIBUTIONS)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
'''


@pytest.fixture
def gpu_image_env(tmp_path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_PACKAGES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "RAY_VDR_GPU_DRY_RUN": "1"}
    check = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, importlib.util as u\n"
                            "print([u.find_spec(n) for n in ('ray', 'deepspeed', 'faiss')],"
                            " [d.name for d in m.distributions() if d.name in ('ray', 'deepspeed', 'faiss-cpu')])\n"
                            "import ray"], env=env, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "[None, None, None] []", check.stdout + check.stderr
    assert "ModuleNotFoundError: No module named 'ray'" in check.stderr
    return env


def test_the_dry_run_measures_every_gpu_figure_without_ray_deepspeed_or_faiss(gpu_image_env, tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=gpu_image_env, capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "out"
    report = json.loads((out / "gpu.json").read_text())
    assert report["settings"]["mode"].startswith("dry-run") and report["command"] == "python -m bench.gpu --dry-run"
    steps = report["steps"]
    assert list(steps) == ["prepare", "train", "train_small", "embed", "rerank"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    for name in ("train", "train-small", "embed", "rerank"):  # one JSON file per step's figures
        assert json.loads((out / f"{name}.json").read_text())["status"] == "ok"

    f = report["figures"]
    train, small = steps["train"]["result"], steps["train_small"]["result"]
    assert f["train_samples_per_s"] > 0 and f["embed_pages_per_s"] > 0
    assert train["forward_flops_per_sample"] > 0
    assert f["train_flops_per_sample"] == 4 * train["forward_flops_per_sample"]  # the cached loss: 1 + 1 + 2 passes
    assert f["mfu"] == pytest.approx(f["train_samples_per_s"] * f["train_flops_per_sample"] / 989e12)
    assert 0 < f["mfu"] <= 1
    assert f["train_peak_bytes"] == train["peak_bytes"] > 0 and f["small_batch_peak_bytes"] == small["peak_bytes"] > 0
    assert f["memory_ratio"] == pytest.approx(train["peak_bytes"] / small["peak_bytes"])
    for head in ("logit", "dense"):
        assert f[f"rerank_{head}"]["train_pairs_per_s"] > 0 and f[f"rerank_{head}"]["score_pairs_per_s"] > 0

    table = proc.stdout[proc.stdout.index("| figure | value |"):]
    assert "not measured" not in table
    for label in ("samples/s after the first step", "peak memory (process RSS), batch 4", "MFU",
                  "peak memory, batch 4 ÷ batch 2", "pages/s", "logit head", "dense head"):
        assert label in table, label
    assert f"| MFU | {f['mfu']:.3g} |" in table
    assert "/tmp" not in json.dumps(report) and "$WORK" in steps["train"]["command"]
