"""Shared fixtures. The whole suite runs offline: no hub, no GPU."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's metrics pipeline is off in the suite's clusters; the one cluster whose metrics a test scrapes turns it back on
# (tests/ray_cluster.py). On CI (2026-12-02) a Ray 2.60 worker died of SIGSEGV in its OpenTelemetry collector thread
# (opentelemetry::sdk::metrics::MetricReader::Collect) and took a job with it; with these off no process runs that
# thread.
os.environ.setdefault("RAY_enable_open_telemetry", "0")
os.environ.setdefault("RAY_enable_metrics_collection", "0")
# Ray Train's controller polls its workers every 2 s by default, so each started, finished or failed worker group is
# noticed ~1 s late; the suite runs ~25 trainings, several with restarts. Its clusters inherit this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train 2.60 starts a PreemptionWatcher actor for each worker group (it watches for nodes a cloud is about to take
# back: nothing to watch on one local node), a process of its own: 2.5 of a one-step fit's 57 CPU-seconds here.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest  # noqa: E402

from ray_vdr.config import SyntheticConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A tiny Qwen3-VL embedder folder (real module stack, random weights), built once per session."""
    from ray_vdr.models.builders import build_qwen3vl_embedder

    return build_qwen3vl_embedder(tmp_path_factory.mktemp("models") / "tiny-qwen3vl", max_pixels=64 * 64)


SIGNED_NORMALIZE = '''"""A custom Sentence Transformers module shipped in the model folder: Normalize, then negate."""

from sentence_transformers.base.modules.normalize import Normalize


class SignedNormalize(Normalize):
    def forward(self, features):
        features = super().forward(features)
        features["sentence_embedding"] = -features["sentence_embedding"]
        return features
'''


@pytest.fixture(scope="session")
def tiny_remote_code(tiny_qwen, tmp_path_factory):
    """The tiny Qwen3-VL embedder with a module of its own code (``signed_normalize.py`` in the folder, named in
    modules.json): Sentence Transformers loads it only with ``trust_remote_code=True``, as a hub model with custom
    code. Its vectors are the tiny model's, negated."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("models") / "tiny-remote-code"
    shutil.copytree(tiny_qwen, path)
    (path / "signed_normalize.py").write_text(SIGNED_NORMALIZE)
    modules = json.loads((path / "modules.json").read_text())
    modules[-1]["type"] = "signed_normalize.SignedNormalize"
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    return path


@pytest.fixture(scope="session")
def tiny_colqwen(tiny_qwen, tmp_path_factory):
    """The tiny Qwen3-VL as a saved multi-vector embedder (MultiVectorEncoder: its transformer, a seeded 32-d token
    head, random weights), as a multi-vector training run saves one."""
    from ray_vdr.config import ModelConfig
    from ray_vdr.models.load import build_model

    path = tmp_path_factory.mktemp("models") / "tiny-colqwen3vl"
    build_model(ModelConfig(name_or_path=str(tiny_qwen), kind="multi_vector", token_dim=32, dtype="float32",
                            attn_implementation="sdpa"), "cpu").save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory):
    """A tiny Qwen3-VL reranker folder (CrossEncoder, real module stack, random weights), built once per session."""
    from ray_vdr.models.builders import build_qwen3vl_reranker

    return build_qwen3vl_reranker(tmp_path_factory.mktemp("models") / "tiny-qwen3vl-reranker", max_pixels=64 * 64)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    from ray_vdr.models.builders import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic VDR dataset (Parquet + JSONL) and its config."""
    from ray_vdr.data.synthetic import write_synthetic

    cfg = SyntheticConfig(output_dir=str(tmp_path_factory.mktemp("synthetic")), train_queries=48, eval_queries=6,
                          page_width=224, page_height=288, seed=3)
    summary = write_synthetic(cfg, rows_per_file=16)
    return cfg, summary


@pytest.fixture(scope="session")
def shared_ray(tmp_path_factory):
    """The suite's shared private local Ray cluster (tests/ray_cluster.py): consecutive modules reuse it."""
    from tests.ray_cluster import SharedCluster

    shared = SharedCluster(lambda: tmp_path_factory.mktemp("ray"))
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def ray_local(shared_ray, request):
    """A private local Ray cluster for the module; never attaches to a stray cluster on the machine. It has 2
    logical CPUs, or the module's RAY_CPUS; the module before it may have used it too (tests/ray_cluster.py)."""
    return shared_ray.get(getattr(request.module, "RAY_CPUS", 2))


@pytest.fixture(scope="session")
def page_pngs(synthetic) -> list[bytes]:
    """The distinct page images (PNG bytes) of the synthetic eval corpus: 30 pages."""
    import pyarrow.parquet as pq

    syn, _ = synthetic
    table = pq.read_table(f"{syn.output_dir}/eval")
    seen: dict[bytes, None] = {}
    for col in ("image", "negative_0", "negative_1", "negative_2", "negative_3"):
        for cell in table.column(col).to_pylist():
            seen.setdefault(cell["bytes"] if isinstance(cell, dict) else cell)
    return list(seen)
