"""What the bench scripts share: the record of a run, timing and percentiles, probes, bench models and pages, FAISS
search measurement, and the endpoint over HTTP through the library's client.

Every script runs from the repo root as ``python -m bench.<name>`` and imports this module, never another script
(bench/report.py reads the scripts' ``render`` functions). Nothing here imports Ray, FAISS or torch at import time:
bench/gpu.py runs where Ray and FAISS are not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ray_vdr.client import EndpointClient

ROOT = Path(__file__).resolve().parents[1]
K = 10  # the top-k of every search measured here
# no bench downloads a model or a dataset, and none reports usage (set before transformers or Ray read them)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# -- the record of a run ----------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU count, GPU (if any), and the versions that move the figures."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(), "gpu": None}
    for pkg in ("torch", "ray", "sentence-transformers", "transformers", "deepspeed", "faiss-cpu", "faiss-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[pkg] = metadata.version(pkg)
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def command_line() -> str:
    """This run's command from the repo root (``python -m bench.<name> ...``), without --json/--out (machine paths)."""
    script = Path(sys.argv[0]).resolve()
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--json", "--out"):
            skip = True
            continue
        if not a.startswith(("--json=", "--out=")):
            argv.append(a)
    name = ("-m " + ".".join(script.relative_to(ROOT).with_suffix("").parts) if script.is_relative_to(ROOT)
            else script.name)
    return " ".join(["python", name, *argv])


def write_json(path: str | None, report: dict[str, Any]) -> None:
    """Write ``report`` with the date, the machine and the command line to ``path`` (``--json``; None = skip).
    Machine paths (``out``, ``json``) are left out of the recorded arguments."""
    if not path:
        return
    if isinstance(report.get("args"), dict):
        report = {**report, "args": {k: v for k, v in report["args"].items() if k not in ("out", "json", "probe")}}
    out = {**report, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command_line()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"results: {path}")


def parser(doc: str, json_help: str = "bench/report.py renders docs/benchmarks.md from it") -> argparse.ArgumentParser:
    """A bench script's arguments: its docstring as the help, and ``--json`` (where the results are recorded)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help=f"also write the results as JSON here ({json_help})")
    return p


# -- timing and percentiles -------------------------------------------------------------------------------------------


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and the milliseconds it took."""
    began = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - began) * 1000


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (numpy, linear between the nearest ranks); NaN when there are none."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def p50_p99(ms: list[float], prefix: str = "") -> dict[str, float]:
    """``{prefix}p50_ms`` and ``{prefix}p99_ms`` of ``ms``."""
    return {f"{prefix}p50_ms": percentile(ms, 50), f"{prefix}p99_ms": percentile(ms, 99)}


# -- processes and clusters -------------------------------------------------------------------------------------------


def run_probe(module: str, args: argparse.Namespace, probe: str, **overrides: Any) -> dict:
    """Run ``python -m module --probe probe`` from the repo root with the parsed arguments (and overrides) in a fresh
    process (clean memory, fresh thread pools); its last stdout line is the JSON result."""
    argv = [sys.executable, "-m", module, "--probe", probe]
    for k, v in {**vars(args), **overrides}.items():
        if k not in ("probe", "json") and v is not None:  # None: the option's default
            argv += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {probe} {overrides} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, **init: Any) -> Iterator[None]:
    """A private local Ray cluster for the block (``address="local"`` never attaches to a stray one), workers at nice
    0 as the library's clusters run them."""
    import ray

    from ray_vdr.cluster import local_cluster_env

    num_cpus = num_cpus or os.cpu_count()
    os.environ.update(local_cluster_env(num_cpus))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **init)
    try:
        yield
    finally:
        ray.shutdown()


# -- bench models and pages -------------------------------------------------------------------------------------------


def model_shape(name: str):
    """The Qwen3-VL shape of a bench model: ``tiny`` (the tests'), ``small`` (large enough for activations to dominate
    the memory on CPU) or ``2b`` (Qwen3-VL-2B, GPU only)."""
    from ray_vdr.models.builders import QWEN3VL_2B_SHAPE, TINY_QWEN3VL

    if name == "tiny":
        return TINY_QWEN3VL
    if name == "2b":
        return QWEN3VL_2B_SHAPE
    return replace(TINY_QWEN3VL, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=32, intermediate_size=768, mrope_section=[4, 6, 6], vision_depth=4,
                   vision_hidden_size=128, vision_intermediate_size=384, vision_num_heads=4,
                   deepstack_visual_indexes=[1, 3])


def training_inputs(out: str, shape: str, max_pixels: int, rows: int) -> Path:
    """The random-weight embedder (``out``/model-<shape>) and ``rows`` synthetic training rows (``out``/data) that
    the training probes read, each built once; the embedder's folder."""
    from ray_vdr.config import SyntheticConfig
    from ray_vdr.data.synthetic import write_synthetic
    from ray_vdr.models.builders import build_qwen3vl_embedder

    model = Path(out) / f"model-{shape}"
    if not (model / "modules.json").is_file():
        build_qwen3vl_embedder(model, model_shape(shape), max_pixels=max_pixels)
    data = Path(out) / "data"
    if not (data / "summary.json").is_file() or json.loads((data / "summary.json").read_text())["train_rows"] < rows:
        write_synthetic(SyntheticConfig(output_dir=str(data), train_queries=rows, eval_queries=2, jsonl=False, seed=1))
    return model


def synthetic_pages(n: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """``n`` distinct synthetic pages (448x576 PNG), each with the first query it answers: (query, png)."""
    from ray_vdr.config import SyntheticConfig
    from ray_vdr.data.render import page_png
    from ray_vdr.data.synthetic import generate, iter_pages

    cfg = SyntheticConfig(train_queries=n * 2, eval_queries=1, jsonl=False, seed=seed)
    pages = itertools.islice(iter_pages(generate(cfg)[0]), n)
    return [(p.queries[0].text, page_png(p, cfg.page_width, cfg.page_height)) for p in pages]


# -- FAISS search -----------------------------------------------------------------------------------------------------


def search_threads(threads: int) -> contextlib.AbstractContextManager:
    """FAISS and BLAS at ``threads`` threads (1: a Retriever replica at 1 CPU), BLAS through threadpoolctl where it
    is installed (not a declared dependency: else FAISS's own setting only)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(threads)


def exact_top(x: np.ndarray, q: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Brute-force top-K positions within the allowed ones (numpy)."""
    ids = np.arange(len(x)) if allowed is None else np.flatnonzero(allowed)
    sub = x if allowed is None else x[ids]
    out = np.empty((len(q), K), np.int64)
    for i in range(0, len(q), 64):
        s = q[i:i + 64] @ sub.T
        top = np.argpartition(-s, K - 1, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
        out[i:i + 64] = ids[np.take_along_axis(top, order, axis=1)]
    return out


def measure_search(index, q: np.ndarray, truth: np.ndarray, allowed: np.ndarray | None, exact_max: int) -> dict:
    """One query at a time through ``faiss_index.search`` after 5 warm-up queries: latency, recall@10 against
    ``truth``, and the checks (top-k not full, positions not allowed)."""
    from ray_vdr.corpus.faiss_index import search

    for i in range(min(5, len(q))):
        search(index, q[i:i + 1], K, allowed=allowed, exact_max=exact_max)
    answers = [timed(search, index, q[i:i + 1], K, allowed=allowed, exact_max=exact_max) for i in range(len(q))]
    got = np.array([pos[0] for (_, pos), _ in answers])
    ms = [t for _, t in answers]
    found = got >= 0
    recall = float(np.mean([len(set(a[a >= 0]) & set(b)) / K for a, b in zip(got, truth, strict=True)]))
    return {"recall_at_10": recall, **p50_p99(ms), "mean_ms": float(np.mean(ms)),
            "short": int(np.sum(found.sum(axis=1) < K)),
            "not_allowed": 0 if allowed is None else int(np.sum(~allowed[got[found]]))}


# -- the endpoint over HTTP -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One search as its client saw it: the HTTP status, milliseconds end to end, the ingress's own ``timings`` (on
    success) and the Retry-After header (on 503)."""

    status: int
    ms: float
    timings: dict[str, float] = field(default_factory=dict)
    retry_after: str | None = None


def timed_search(client: EndpointClient, query: str, rerank_depth: int) -> Reply:
    """``POST /search`` for the top K through the library's client, timed; an HTTP error is a status here."""
    from ray_vdr.client import EndpointError

    began = time.perf_counter()
    try:
        timings = client.search(query, top_k=K, rerank_depth=rerank_depth).timings.model_dump()
    except EndpointError as e:
        return Reply(e.status, (time.perf_counter() - began) * 1000, retry_after=e.retry_after)
    return Reply(200, (time.perf_counter() - began) * 1000, timings)


def closed_loop(apps: dict[str, EndpointClient], queries: list[str], *, clients: int, requests: int, rerank_depth: int,
                seconds: float = math.inf, strict: bool = False) -> tuple[dict[str, list[Reply]], float]:
    """``clients`` threads, each sending its next request when the previous one answered, ``requests`` in all (or
    until ``seconds``). Each request goes to every application in ``apps``, in an order that alternates (a, b, ...
    then reversed) so that drift on the machine falls on all alike. The replies per application and the wall seconds;
    ``strict``: RuntimeError if any reply was not a 200."""
    names, replies = list(apps), {n: [] for n in apps}
    lock, counter, deadline = threading.Lock(), iter(range(requests)), time.monotonic() + seconds

    def client(w: int) -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            for n in names if (i + w) % 2 == 0 else names[::-1]:
                reply = timed_search(apps[n], queries[i % len(queries)], rerank_depth)
                with lock:
                    replies[n].append(reply)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = {n: sorted({r.status for r in rs if r.status != 200}) for n, rs in replies.items()}
    if strict and any(failed.values()):
        raise RuntimeError(f"HTTP errors by application: {failed}")
    return replies, time.perf_counter() - began


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServeCorpus:
    """The serving benches' corpus: synthetic pages embedded into a flat index (``folder``/index), the tiny
    embedder and reranker, and the training queries of the pages."""

    folder: Path
    embedder: Path
    reranker: Path
    queries: list[str]

    @property
    def index(self) -> Path:
        return self.folder / "index"


@contextlib.contextmanager
def serve_corpus(out: str | None, pages: int, runtime_env: dict | None = None) -> Iterator[ServeCorpus]:
    """Synthetic pages, a tiny Qwen3-VL embedder and reranker (random weights), a local Ray cluster of 2 CPUs (with
    ``runtime_env``), and the pages embedded by the real job into a flat index (dim 32) under ``out`` (default: a
    temporary folder). Serve and the cluster stop at the end of the block."""
    import pyarrow.parquet as pq
    import ray
    from ray import serve

    from ray_vdr.config import SyntheticConfig, load_config
    from ray_vdr.corpus.embed import run as embed
    from ray_vdr.data.synthetic import write_synthetic
    from ray_vdr.models.builders import build_qwen3vl_embedder, build_qwen3vl_reranker

    work = Path(out or tempfile.mkdtemp(prefix="rvdr-serve-bench-"))
    write_synthetic(SyntheticConfig(output_dir=str(work / "syn"), train_queries=max(8, pages // 5),
                                    eval_queries=max(2, pages // 5), page_width=448, page_height=576, seed=1),
                    rows_per_file=64)
    corpus = ServeCorpus(work, build_qwen3vl_embedder(work / "embedder", max_pixels=128 * 128),
                         build_qwen3vl_reranker(work / "reranker", max_pixels=128 * 128),
                         pq.read_table(work / "syn" / "train", columns=["query"]).column("query").to_pylist())
    temp = tempfile.mkdtemp(prefix="rvdr-", dir="/tmp")
    try:
        with local_ray(2, _temp_dir=temp, log_to_driver=False, runtime_env=runtime_env):
            ray.data.DataContext.get_current().enable_progress_bars = False
            embed(load_config(ROOT / "configs/demo.yaml", [
                f"index.model={corpus.embedder}", f"index.sources=[{work / 'syn' / 'images'}]",
                f"index.output={corpus.index}", "index.dim=32", "synthetic=null"]))
            try:
                yield corpus
            finally:
                serve.shutdown()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def deploy_app(port: int, name: str, index: Path, api_key: str | None = None, **settings: Any) -> EndpointClient:
    """The endpoint over ``index`` as Serve application ``name`` at /``name``/ (``settings``: more ServeConfig
    fields), once ready; its client (with ``api_key``)."""
    from ray_vdr.client import EndpointClient
    from ray_vdr.config import ServeConfig
    from ray_vdr.endpoint import deploy

    cfg = ServeConfig.model_validate({"index": str(index), "port": port, "keep_running": False, "app_name": name,
                                      "route_prefix": f"/{name}", **settings})
    return EndpointClient(deploy(cfg, ready_timeout_s=300), api_key=api_key)


def in_process(corpus: ServeCorpus, queries: list[str], depth: int) -> list[float]:
    """The first stage (encode + FAISS), or both (+ reading, decoding and scoring ``depth`` pages), with no Ray and
    no HTTP: ms per query, the first 5 (warm-up) left out."""
    from ray_vdr.cluster import worker_device
    from ray_vdr.config import ServeConfig
    from ray_vdr.corpus.store import PageStore, open_index
    from ray_vdr.data.images import pil_pages
    from serving.core import RerankScorer, query_encoder

    cfg = ServeConfig.model_validate({"index": str(corpus.index), "reranker": str(corpus.reranker)})
    index = open_index(cfg.index)
    encoder = query_encoder(cfg, index.manifest, worker_device(False, 1))
    store = PageStore.of(index)
    scorer = RerankScorer(str(corpus.reranker), cfg, "cpu") if depth else None

    def one(q: str) -> None:
        hits = index.search(encoder.encode_queries([q]), K)[0]
        if scorer is not None:
            scorer.score([(q, img) for img in pil_pages(store.get([h["position"] for h in hits[:depth]]))])

    return [timed(one, q)[1] for q in queries][5:]
