"""Load test of the two-stage endpoint on loopback (bounded in requests and time). Not a test: prints figures.

    python -m bench.serve_load [--requests 200] [--seconds 20] [--pages 60] [--out DIR]

One run, side by side on the same machine, tiny Qwen3-VL embedder + tiny reranker (random weights) over a flat index
of synthetic pages:

1. in-process compute of one query (encode + FAISS + rerank, no Ray, no HTTP): the floor;
2. the endpoint with dynamic batching, closed loop at 1, 8 and 32 concurrent clients: QPS, p50/p99 end to end and per
   stage (embed, search, rerank, as the ingress measured them);
3. the same with batching off (max_batch_size 1 for the embedder and the reranker);
4. 2x saturation: open-loop arrivals at twice the batched QPS at 32 clients, for --seconds: only 200 or 503 (with
   Retry-After) may come back, and the replicas' memory must stay flat.

Reported: endpoint p50 at 1 client minus the in-process compute p50 (goal <= 10 ms here) and batched / unbatched QPS at
32 clients (goal >= 2 here). The load generator shares the 2 cores with the server here: figures on a real node are
higher.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench import common


def level(replies: list[common.Reply], clients: int, wall: float) -> dict:
    """QPS, p50/p99 end to end and per stage (as the ingress measured them) of one closed-loop level."""
    ok = [r for r in replies if r.status == 200]
    out = {"clients": clients, "requests": len(replies), "ok": len(ok), "qps": len(ok) / wall,
           **common.p50_p99([r.ms for r in ok])}
    for stage in ("embed", "search", "rerank"):
        out.update(common.p50_p99([r.timings[f"{stage}_ms"] for r in ok], f"{stage}_"))
    out["mean_embed_batch"] = statistics.fmean(r.timings["embed_batch"] for r in ok) if ok else 0.0
    return out


def open_loop(client, queries: list[str], rate: float, seconds: float, depth: int) -> dict:
    """Arrivals at ``rate`` per second regardless of answers (up to 256 in flight), for ``seconds``."""
    statuses: dict[int, int] = {}
    retry_after: set[str | None] = set()
    lock = threading.Lock()

    def one(i):
        reply = common.timed_search(client, queries[i % len(queries)], depth)
        with lock:
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
            if reply.status == 503:
                retry_after.add(reply.retry_after)

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


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--requests", type=int, default=200, help="requests per closed-loop level")
    ap.add_argument("--seconds", type=float, default=20.0, help="time cap per level")
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--rerank-depth", type=int, default=5)
    ap.add_argument("--batch-wait-ms", type=float, default=0.0,
                    help="extra batch wait: 0 = none (batches form while a model call runs)")
    ap.add_argument("--ingress-ongoing", type=int, default=32, help="ingress max_ongoing_requests")
    ap.add_argument("--ingress-queued", type=int, default=32, help="ingress max_queued_requests (then 503)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()

    from ray import serve

    from ray_vdr.corpus.store import open_index

    wait, port = args.batch_wait_ms / 1000, common.free_port()

    def stages(batch: bool) -> dict:
        small = {"min_replicas": 1, "max_replicas": 1}
        return {
            "embedder": {**small, "num_cpus": 0.5, "max_batch_size": 16 if batch else 1, "max_ongoing_requests": 32,
                         "target_ongoing_requests": 8, "batch_wait_timeout_s": wait},
            "rerank": {**small, "num_cpus": 0.5, "max_batch_size": 8 if batch else 1, "max_ongoing_requests": 16,
                       "target_ongoing_requests": 4, "batch_wait_timeout_s": wait},
            "retriever": {**small, "num_cpus": 0.25, "batch_wait_timeout_s": wait},
            # at most ~2 s of work admitted at the saturated rate: beyond it, 503 + Retry-After, not a 30 s queue
            "ingress": {**small, "num_cpus": 0.25, "max_ongoing_requests": args.ingress_ongoing,
                        "target_ongoing_requests": min(16, args.ingress_ongoing),
                        "max_queued_requests": args.ingress_queued}}

    with common.serve_corpus(args.out, args.pages) as corpus:
        queries = corpus.queries
        report: dict = {"machine": f"{os.cpu_count()} CPUs", "pages": open_index(str(corpus.index)).index.ntotal}
        # 1. in-process floor
        floor = common.in_process(corpus, queries[:50], args.rerank_depth)
        report["in_process_p50_ms"] = common.percentile(floor, 50)
        for name in ("batched", "unbatched"):
            client = common.deploy_app(port, name, corpus.index, reranker=str(corpus.reranker),
                                       **stages(name == "batched"))
            for q in queries[:5]:  # warm up
                common.timed_search(client, q, args.rerank_depth)
            levels = []
            for clients in (1, 8, 32):
                replies, wall = common.closed_loop({name: client}, queries, clients=clients, requests=args.requests,
                                                   rerank_depth=args.rerank_depth, seconds=args.seconds)
                levels.append(lv := level(replies[name], clients, wall))
                print(f"{name:9} clients {clients:2}: {lv['qps']:.1f} QPS, p50 {lv['p50_ms']:.1f} ms, p99 "
                      f"{lv['p99_ms']:.1f} ms (embed p50 {lv['embed_p50_ms']:.1f}, search {lv['search_p50_ms']:.1f}, "
                      f"rerank {lv['rerank_p50_ms']:.1f}; mean embed batch {lv['mean_embed_batch']:.1f})", flush=True)
            report[name] = levels
            if name == "batched":
                saturated = levels[-1]["qps"]
                rss_before = replica_rss_mb()
                report["overload"] = open_loop(client, queries, 2 * saturated, args.seconds, args.rerank_depth)
                time.sleep(3)
                report["overload"]["replica_rss_mb_before"] = rss_before
                report["overload"]["replica_rss_mb_after"] = replica_rss_mb()
                print(f"2x saturation ({2 * saturated:.1f}/s for {args.seconds:.0f}s): {report['overload']}",
                      flush=True)
            serve.delete(name)
        one = report["batched"][0]["p50_ms"]
        report["endpoint_overhead_p50_ms"] = one - report["in_process_p50_ms"]
        report["batched_over_unbatched_qps_32"] = report["batched"][2]["qps"] / report["unbatched"][2]["qps"]
        print(f"in-process compute p50 {report['in_process_p50_ms']:.1f} ms; endpoint p50 at 1 client {one:.1f} ms; "
              f"overhead {report['endpoint_overhead_p50_ms']:.1f} ms (goal <= 10 here)")
        print(f"batched / unbatched QPS at 32 clients: {report['batched_over_unbatched_qps_32']:.2f} (goal >= 2 here)")
        print(json.dumps(report, indent=1, default=float))
        common.write_json(args.json, {"args": vars(args), **report})


if __name__ == "__main__":
    main()
