"""What API keys and metrics cost per request: the endpoint with both on ÷ both off, side by side in one run.

    python bench/serve_security.py [--requests 400] [--clients 1,8] [--pages 60] [--json FILE]

Two Serve applications on one local Ray cluster (2 CPUs) and one proxy, over the same index and the same tiny
Qwen3-VL embedder (random weights), first stage only: ``plain`` (no keys, ``serve.metrics: false``) and ``secured``
(a key file, every request with ``Authorization: Bearer``; ``serve.metrics: true``). Requests alternate between the
two (a/b, b/a, ...) so that drift on the machine falls on both alike. Reported per level: p50/p99 of each, the added
p50 (goal ≤ 1 ms) and the p50 ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import finish, free_port, pct, post, prepare  # noqa: E402

KEY = "bench-key-0123456789abcdef"


def interleaved(urls: dict[str, str], headers: dict[str, dict], queries: list[str], clients: int,
                requests: int) -> dict[str, list[float]]:
    """``requests`` per application, ``clients`` threads, each alternating between the applications."""
    names = list(urls)
    ms: dict[str, list[float]] = {n: [] for n in names}
    lock, counter = threading.Lock(), iter(range(requests))

    def worker(w: int):
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            for n in (names if (i + w) % 2 == 0 else names[::-1]):
                status, _, t, _ = post(urls[n], {"query": queries[i % len(queries)], "top_k": 10, "rerank_depth": 0},
                                       headers[n])
                if status != 200:
                    raise RuntimeError(f"{n}: HTTP {status}")
                with lock:
                    ms[n].append(t)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="requests per application and level")
    ap.add_argument("--clients", default="1,8", help="concurrent clients per level")
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here (bench/report.py)")
    args = ap.parse_args()

    from ray_vdr.config import ServeConfig
    from ray_vdr.endpoint import deploy

    work, _, _, queries, temp = prepare(args.out, args.pages)
    keys = work / "keys.json"
    keys.write_text(json.dumps([{"name": "bench", "key": KEY, "scopes": ["search"]}]))
    port = free_port()
    small = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    urls, headers = {}, {"plain": {}, "secured": {"Authorization": f"Bearer {KEY}"}}
    for name, extra in (("plain", {"metrics": False}), ("secured", {"metrics": True, "auth": {"keys_file": str(keys)}})):
        cfg = ServeConfig.model_validate({
            "index": str(work / "index"), "port": port, "keep_running": False, "app_name": name,
            "route_prefix": f"/{name}", **extra,
            "embedder": {**small, "max_batch_size": 8, "max_ongoing_requests": 32, "target_ongoing_requests": 8},
            "retriever": {**small, "max_ongoing_requests": 32, "target_ongoing_requests": 8},
            "ingress": {**small, "max_ongoing_requests": 64, "target_ongoing_requests": 16}})
        urls[name] = deploy(cfg, ready_timeout_s=300)
    for name, url in urls.items():  # warm up
        for q in queries[:10]:
            post(url, {"query": q, "rerank_depth": 0}, headers[name])

    report: dict = {"levels": []}
    for clients in (int(c) for c in args.clients.split(",")):
        began = time.perf_counter()
        ms = interleaved(urls, headers, queries, clients, args.requests)
        level = {"clients": clients, "requests": args.requests, "seconds": time.perf_counter() - began}
        for name, values in ms.items():
            level[f"{name}_p50_ms"], level[f"{name}_p99_ms"] = pct(values, 50), pct(values, 99)
        level["added_p50_ms"] = level["secured_p50_ms"] - level["plain_p50_ms"]
        level["added_p99_ms"] = level["secured_p99_ms"] - level["plain_p99_ms"]
        level["p50_ratio"] = level["secured_p50_ms"] / level["plain_p50_ms"]
        report["levels"].append(level)
        print(f"{clients:2} clients: keys+metrics off p50 {level['plain_p50_ms']:.2f} ms p99 "
              f"{level['plain_p99_ms']:.2f} ms | on p50 {level['secured_p50_ms']:.2f} ms p99 "
              f"{level['secured_p99_ms']:.2f} ms | added p50 {level['added_p50_ms']:+.2f} ms "
              f"(goal <= 1 ms), on / off {level['p50_ratio']:.3f}", flush=True)
    report["machine"] = f"{os.cpu_count()} CPUs"
    finish(report, args, temp)


if __name__ == "__main__":
    main()
