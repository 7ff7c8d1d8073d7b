"""What API keys and metrics cost per request: the endpoint with both on ÷ both off, side by side in one run.

    python -m bench.serve_security [--requests 400] [--clients 1,8] [--pages 60] [--json FILE]

Two Serve applications on one local Ray cluster (2 CPUs) and one proxy, over the same index and the same tiny
Qwen3-VL embedder (random weights), first stage only: ``plain`` (no keys, ``serve.metrics: false``) and ``secured``
(a key file, every request with ``Authorization: Bearer``; ``serve.metrics: true``). Requests alternate between the
two (a/b, b/a, ...) so that drift on the machine falls on both alike. Reported per level: p50/p99 of each, the added
p50 (goal ≤ 1 ms) and the p50 ratio.
"""

from __future__ import annotations

import json
import os

from bench import common

KEY = "bench-key-0123456789abcdef"


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--requests", type=int, default=400, help="requests per application and level")
    ap.add_argument("--clients", default="1,8", help="concurrent clients per level")
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()

    with common.serve_corpus(args.out, args.pages) as corpus:
        keys = corpus.folder / "keys.json"
        keys.write_text(json.dumps([{"name": "bench", "key": KEY, "scopes": ["search"]}]))
        port = common.free_port()
        small = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
        stages = {"embedder": {**small, "max_batch_size": 8, "max_ongoing_requests": 32, "target_ongoing_requests": 8},
                  "retriever": {**small, "max_ongoing_requests": 32, "target_ongoing_requests": 8},
                  "ingress": {**small, "max_ongoing_requests": 64, "target_ongoing_requests": 16}}
        apps = {"plain": common.deploy_app(port, "plain", corpus.index, metrics=False, **stages),
                "secured": common.deploy_app(port, "secured", corpus.index, api_key=KEY, metrics=True,
                                             auth={"keys_file": str(keys)}, **stages)}
        common.closed_loop(apps, corpus.queries, clients=1, requests=10, rerank_depth=0, strict=True)  # warm-up

        report: dict = {"levels": []}
        for clients in (int(c) for c in args.clients.split(",")):
            replies, seconds = common.closed_loop(apps, corpus.queries, clients=clients, requests=args.requests,
                                                  rerank_depth=0, strict=True)
            level = {"clients": clients, "requests": args.requests, "seconds": seconds}
            for name, rs in replies.items():
                level.update(common.p50_p99([r.ms for r in rs], f"{name}_"))
            level["added_p50_ms"] = level["secured_p50_ms"] - level["plain_p50_ms"]
            level["added_p99_ms"] = level["secured_p99_ms"] - level["plain_p99_ms"]
            level["p50_ratio"] = level["secured_p50_ms"] / level["plain_p50_ms"]
            report["levels"].append(level)
            print(f"{clients:2} clients: keys+metrics off p50 {level['plain_p50_ms']:.2f} ms p99 "
                  f"{level['plain_p99_ms']:.2f} ms | on p50 {level['secured_p50_ms']:.2f} ms p99 "
                  f"{level['secured_p99_ms']:.2f} ms | added p50 {level['added_p50_ms']:+.2f} ms "
                  f"(goal <= 1 ms), on / off {level['p50_ratio']:.3f}", flush=True)
        report["machine"] = f"{os.cpu_count()} CPUs"
        print(json.dumps(report, indent=1, default=float))
        common.write_json(args.json, {"args": vars(args), **report})


if __name__ == "__main__":
    main()
