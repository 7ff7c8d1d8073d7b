"""Load test of the two-stage endpoint on loopback (bounded in requests and time). Not a test: prints figures.

    python bench/serve_load.py [--requests 200] [--seconds 20] [--pages 60] [--out DIR]

One run, side by side on the same machine, tiny Qwen3-VL embedder + tiny reranker (random weights) over a flat index
of synthetic pages:

1. in-process compute of one query (encode + FAISS + rerank, no Ray, no HTTP): the floor;
2. the endpoint with dynamic batching, closed loop at 1, 8 and 32 concurrent clients: QPS, p50/p99 end to end and per
   stage (embed, search, rerank, as the ingress measured them);
3. the same with batching off (max_batch_size 1 for the embedder and the reranker);
4. 2x saturation: open-loop arrivals at twice the batched QPS at 32 clients, for --seconds: only 200 or 503 (with
   Retry-After) may come back, and the replicas' memory must stay flat.

Reported: endpoint p50 at 1 client minus the in-process compute p50 (goal <= 10 ms here) and batched / unbatched QPS at 32
clients (goal >= 2 here). The load generator shares the 2 cores with the server here: figures on a real node are higher.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, float, str | None]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "search", data=data, headers={"Content-Type": "application/json",
                                                                     **(headers or {})})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), (time.perf_counter() - t) * 1000, None
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, {}, (time.perf_counter() - t) * 1000, e.headers.get("Retry-After")


def closed_loop(url: str, queries: list[str], clients: int, requests: int, seconds: float, depth: int) -> dict:
    """``clients`` threads, each sending its next request when the previous one answered."""
    lock, results = threading.Lock(), []
    deadline = time.time() + seconds
    counter = iter(range(requests))

    def worker():
        while time.time() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, answer, ms, _ = post(url, {"query": queries[i % len(queries)], "top_k": 10, "rerank_depth": depth})
            with lock:
                results.append((status, answer, ms))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [a for s, a, _ in results if s == 200]
    out = {"clients": clients, "requests": len(results), "ok": len(ok), "qps": len(ok) / wall,
           "p50_ms": pct([ms for s, _, ms in results if s == 200], 50),
           "p99_ms": pct([ms for s, _, ms in results if s == 200], 99)}
    for stage in ("embed", "search", "rerank"):
        values = [a["timings"][f"{stage}_ms"] for a in ok]
        out[f"{stage}_p50_ms"], out[f"{stage}_p99_ms"] = pct(values, 50), pct(values, 99)
    out["mean_embed_batch"] = statistics.fmean(a["timings"]["embed_batch"] for a in ok) if ok else 0.0
    return out


def open_loop(url: str, queries: list[str], rate: float, seconds: float, depth: int) -> dict:
    """Arrivals at ``rate`` per second regardless of answers (up to 256 in flight), for ``seconds``."""
    statuses: dict[int, int] = {}
    retry_after: set[str | None] = set()
    lock = threading.Lock()

    def one(i):
        status, _, _, ra = post(url, {"query": queries[i % len(queries)], "top_k": 10, "rerank_depth": depth})
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            if status == 503:
                retry_after.add(ra)

    start, i = time.perf_counter(), 0
    with ThreadPoolExecutor(max_workers=256) as pool:
        while (now := time.perf_counter() - start) < seconds:
            while i < rate * now:
                pool.submit(one, i)
                i += 1
            time.sleep(0.002)
    return {"rate": rate, "sent": i, "statuses": statuses, "retry_after": sorted(str(r) for r in retry_after),
            "seconds": time.perf_counter() - start}


def replica_rss_mb() -> float:
    """Resident memory of this machine's Serve replica processes (the endpoint's footprint)."""
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica" in cmd and p.info["memory_info"] is not None:
            total += p.info["memory_info"].rss
    return total / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(out: str | None, pages: int, runtime_env: dict | None = None) -> tuple[Path, Path, Path, list[str], str]:
    """Synthetic pages, a tiny Qwen3-VL embedder and reranker (random weights), a local Ray cluster of 2 CPUs (with
    ``runtime_env``), and the pages embedded by the real job into a flat index (dim 32) at work/index. Returns (work
    folder, embedder, reranker, queries, Ray's temp folder)."""
    import pyarrow.parquet as pq
    import ray

    from ray_vdr.config import SyntheticConfig, load_config
    from ray_vdr.corpus.embed import run as embed
    from ray_vdr.data.synthetic import write_synthetic
    from ray_vdr.models.builders import build_qwen3vl_embedder, build_qwen3vl_reranker

    work = Path(out or tempfile.mkdtemp(prefix="rvdr-serve-bench-"))
    syn = SyntheticConfig(output_dir=str(work / "syn"), train_queries=max(8, pages // 5),
                          eval_queries=max(2, pages // 5), page_width=448, page_height=576, seed=1)
    write_synthetic(syn, rows_per_file=64)
    embedder = build_qwen3vl_embedder(work / "embedder", max_pixels=128 * 128)
    reranker = build_qwen3vl_reranker(work / "reranker", max_pixels=128 * 128)
    queries = pq.read_table(work / "syn" / "train", columns=["query"]).column("query").to_pylist()
    temp = tempfile.mkdtemp(prefix="rvdr-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             runtime_env=runtime_env)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"index.model={embedder}", f"index.sources=[{work / 'syn' / 'images'}]", f"index.output={work / 'index'}",
        "index.dim=32", "synthetic=null"])
    embed(cfg)
    return work, embedder, reranker, queries, temp


def in_process(work: Path, reranker: Path, queries: list[str], depth: int) -> list[float]:
    """The first stage (encode + FAISS), or both (+ reading, decoding and scoring ``depth`` pages): ms per query."""
    from ray_vdr.cluster import worker_device
    from ray_vdr.config import ServeConfig
    from ray_vdr.corpus.store import PageStore, open_index
    from ray_vdr.data.images import pil_pages
    from serving.core import QueryEncoder, RerankScorer, check_binding

    cfg = ServeConfig.model_validate({"index": str(work / "index"), "reranker": str(reranker)})
    index = open_index(cfg.index)
    encoder = QueryEncoder(check_binding(cfg, index.manifest), cfg, worker_device(False, 1))
    store = PageStore.of(index)
    scorer = RerankScorer(str(reranker), cfg, "cpu") if depth else None
    out = []
    for q in queries:
        t = time.perf_counter()
        hits = index.search(encoder.encode([q]), 10)[0]
        if scorer is not None:
            scorer.score([(q, img) for img in pil_pages(store.get([h["position"] for h in hits[:depth]]))])
        out.append((time.perf_counter() - t) * 1000)
    return out[5:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per closed-loop level")
    ap.add_argument("--seconds", type=float, default=20.0, help="time cap per level")
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--rerank-depth", type=int, default=5)
    ap.add_argument("--batch-wait-ms", type=float, default=0.0,
                    help="extra batch wait: 0 = none (batches form while a model call runs)")
    ap.add_argument("--ingress-ongoing", type=int, default=32, help="ingress max_ongoing_requests")
    ap.add_argument("--ingress-queued", type=int, default=32, help="ingress max_queued_requests (then 503)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", default=None,
                    help="also write the results as JSON here (bench/report.py renders docs/benchmarks.md)")
    args = ap.parse_args()

    from ray import serve

    from ray_vdr.config import ServeConfig
    from ray_vdr.corpus.store import open_index
    from ray_vdr.endpoint import deploy

    work, embedder, reranker, queries, temp = prepare(args.out, args.pages)
    report: dict = {"machine": f"{os.cpu_count()} CPUs", "pages": open_index(str(work / "index")).index.ntotal}
    port = free_port()

    wait = args.batch_wait_ms / 1000

    def serve_cfg(batch: bool) -> ServeConfig:
        small = {"min_replicas": 1, "max_replicas": 1}
        return ServeConfig.model_validate({
            "index": str(work / "index"), "reranker": str(reranker), "port": port, "keep_running": False,
            "embedder": {**small, "num_cpus": 0.5, "max_batch_size": 16 if batch else 1, "max_ongoing_requests": 32,
                         "target_ongoing_requests": 8, "batch_wait_timeout_s": wait},
            "rerank": {**small, "num_cpus": 0.5, "max_batch_size": 8 if batch else 1, "max_ongoing_requests": 16,
                       "target_ongoing_requests": 4, "batch_wait_timeout_s": wait},
            "retriever": {**small, "num_cpus": 0.25, "batch_wait_timeout_s": wait},
            # at most ~2 s of work admitted at the saturated rate: beyond it, 503 + Retry-After, not a 30 s queue
            "ingress": {**small, "num_cpus": 0.25, "max_ongoing_requests": args.ingress_ongoing,
                        "target_ongoing_requests": min(16, args.ingress_ongoing),
                        "max_queued_requests": args.ingress_queued}})

    # 1. in-process floor
    report["in_process_p50_ms"] = pct(in_process(work, reranker, queries[:50], args.rerank_depth), 50)

    for batch in (True, False):
        cfg_b = serve_cfg(batch)
        url = deploy(cfg_b, ready_timeout_s=300)
        for q in queries[:5]:  # warm up
            post(url, {"query": q, "rerank_depth": args.rerank_depth})
        levels = [closed_loop(url, queries, c, args.requests, args.seconds, args.rerank_depth) for c in (1, 8, 32)]
        report["batched" if batch else "unbatched"] = levels
        for lv in levels:
            print(f"{'batched' if batch else 'unbatched':9} clients {lv['clients']:2}: {lv['qps']:.1f} QPS, "
                  f"p50 {lv['p50_ms']:.1f} ms, p99 {lv['p99_ms']:.1f} ms (embed p50 {lv['embed_p50_ms']:.1f}, "
                  f"search {lv['search_p50_ms']:.1f}, rerank {lv['rerank_p50_ms']:.1f}; mean embed batch "
                  f"{lv['mean_embed_batch']:.1f})", flush=True)
        if batch:
            saturated = levels[-1]["qps"]
            rss_before = replica_rss_mb()
            report["overload"] = open_loop(url, queries, 2 * saturated, args.seconds, args.rerank_depth)
            time.sleep(3)
            report["overload"]["replica_rss_mb_before"] = rss_before
            report["overload"]["replica_rss_mb_after"] = replica_rss_mb()
            print(f"2x saturation ({2 * saturated:.1f}/s for {args.seconds:.0f}s): {report['overload']}", flush=True)
        serve.delete(cfg_b.app_name)
    one = report["batched"][0]["p50_ms"]
    report["endpoint_overhead_p50_ms"] = one - report["in_process_p50_ms"]
    report["batched_over_unbatched_qps_32"] = report["batched"][2]["qps"] / report["unbatched"][2]["qps"]
    print(f"in-process compute p50 {report['in_process_p50_ms']:.1f} ms; endpoint p50 at 1 client {one:.1f} ms; "
          f"overhead {report['endpoint_overhead_p50_ms']:.1f} ms (goal <= 10 here)")
    print(f"batched / unbatched QPS at 32 clients: {report['batched_over_unbatched_qps_32']:.2f} (goal >= 2 here)")
    finish(report, args, temp)


def finish(report: dict, args: argparse.Namespace, temp: str) -> None:
    """Print and write the report, then stop Serve and the Ray cluster ``prepare`` started."""
    import ray
    from ray import serve

    print(json.dumps(report, indent=1, default=float))
    write_json(args.json, {"args": vars(args), **report})
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
