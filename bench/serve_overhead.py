"""What one request costs outside the model, hop by hop: the endpoint with a no-op model in the same deployments,
next to the real (tiny) models and to Ray Serve's own floor, side by side in one run (not a test).

    python -m bench.serve_overhead [--requests 300] [--pages 60] [--json FILE]

Applications on one local Ray cluster (2 CPUs) behind one proxy, over the same flat index, one client; requests
alternate between the applications (a, b, c, ... then reversed) so that drift on the machine falls on all alike:

- ``floor``: a Serve deployment that answers a small JSON at once: the proxy and one replica, Ray Serve's floor;
- ``noop``: the endpoint's own deployments (ingress, QueryEmbedder, Retriever, Reranker) with the models replaced by
  constant answers in every replica (a worker set-up hook; nothing else changes): what ray-vdr adds per request;
- ``noop-old``: the same with the batch waits of the previous defaults (5 ms embedder and reranker, 2 ms retriever,
  which a lone request paid in full under ``@serve.batch``; here the batcher's extra wait), to show what was removed;
- ``real``: the tiny Qwen3-VL embedder and reranker (random weights), the default waits.

Per hop at 1 client (p50 over the requests, from the answer's own ``timings``): proxy + HTTP + ASGI = client
latency − the ingress's total; each handle call = the stage's time as the ingress saw it − its compute in the
replica (serialisation, routing, the batch queue); the ingress's own work = total − the stages. Beside them, timed
in process: the generation lookup and the pickling of one call's arguments and answer. First stage (rerank_depth 0)
and both stages (rerank_depth 5) for ``noop`` and ``real``; the in-process compute of the same queries (no Ray, no
HTTP) is the floor that ``endpoint p50 − compute`` (goal ≤ 10 ms here) is measured against.
"""

from __future__ import annotations

import json
import os
import pickle
import time

from bench import common

OLD_WAITS = {"embedder": 0.005, "retriever": 0.002, "rerank": 0.005}  # the previous defaults


def noop_models() -> None:
    """Ray worker set-up hook: in an application whose index path has a ``/noop/`` folder, the query encoder
    returns a constant unit vector and the reranker constant scores (the models still load; their compute is
    skipped). Every other application is untouched."""
    import numpy as np

    from serving import core

    def patch(cls, method: str, constant):
        init, real = cls.__init__, getattr(cls, method)

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            cfg = next(a for a in (*args, *kwargs.values()) if isinstance(a, core.ServeConfig))
            self.noop = "/noop/" in cfg.index

        def call(self, *args, **kwargs):
            return constant(self, *args, **kwargs) if self.noop else real(self, *args, **kwargs)

        cls.__init__ = __init__
        setattr(cls, method, call)

    real_query_encoder = core.query_encoder

    def query_encoder(cfg, manifest, device):
        encoder = real_query_encoder(cfg, manifest, device)
        if "/noop/" in cfg.index:
            def unit(items, dim=None, batch_size=None):
                return np.full((len(items), dim or encoder.dim), (dim or encoder.dim) ** -0.5, np.float32)

            encoder.encode_queries = encoder.encode_pages = unit
        return encoder

    core.query_encoder = query_encoder  # the QueryEmbedder loads its encoder through this module attribute
    patch(core.RerankScorer, "score", lambda self, pairs: np.zeros(len(pairs), np.float32))


def in_process_hops(corpus: common.ServeCorpus) -> dict:
    """Microseconds of the generation lookup and of pickling one search's handle calls (arguments and answers)."""
    import numpy as np

    from ray_vdr.corpus.store import open_index

    index = open_index(str(corpus.index))
    vector = np.random.default_rng(0).standard_normal((1, index.manifest.dim)).astype(np.float32)[0]
    hits = index.search(vector[None], 10)[0]
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        for payload in (("g-1@v1", "a query of a few words"), (vector, 0.004, 1), ("g-1@v1", vector, 10, None, None),
                        (hits, 0.001)):
            pickle.loads(pickle.dumps(payload))
    pickling = (time.perf_counter() - t) / n * 1e6
    order, loaded = ["g-1@v1", "g-0@v1"], {"g-1@v1": object()}
    t = time.perf_counter()
    for _ in range(n):
        for gid in list(order):
            if gid in loaded:
                break
    return {"pickle_one_search_us": pickling, "generation_lookup_us": (time.perf_counter() - t) / n * 1e6}


def floor_app(port: int):
    """Ray Serve's floor: a deployment answering an empty search at once (the proxy and one replica); its client."""
    from ray import serve
    from starlette.responses import JSONResponse

    from ray_vdr.client import EndpointClient

    @serve.deployment(ray_actor_options={"num_cpus": 0.05})
    class Floor:
        async def __call__(self, request):
            await request.body()
            zero = dict.fromkeys(("embed_ms", "search_ms", "rerank_ms", "total_ms", "embed_compute_ms",
                                  "search_compute_ms", "rerank_compute_ms", "embed_batch", "rerank_batch"), 0)
            return JSONResponse({"query": None, "image_query": False, "top_k": 0, "generation": "floor",
                                 "rerank_depth": 0, "results": [], "timings": zero})

    serve.run(Floor.bind(), name="floor", route_prefix="/floor", blocking=False)
    return EndpointClient(f"http://127.0.0.1:{port}/floor/")


def breakdown(replies: list[common.Reply]) -> dict:
    """p50/p99 end to end and the p50 of each hop (see the module's docstring)."""
    out = common.p50_p99([r.ms for r in replies])
    if not replies[0].timings.get("total_ms"):  # the floor: no stages
        return out

    def p50(values):
        return common.percentile(list(values), 50)

    t = [r.timings for r in replies]
    out.update({
        "proxy_http_ms": p50(r.ms - r.timings["total_ms"] for r in replies),
        "embed_hop_ms": p50(x["embed_ms"] - x["embed_compute_ms"] for x in t),
        "search_hop_ms": p50(x["search_ms"] - x["search_compute_ms"] for x in t),
        "rerank_hop_ms": p50(x["rerank_ms"] - x["rerank_compute_ms"] for x in t),
        "ingress_own_ms": p50(x["total_ms"] - x["embed_ms"] - x["search_ms"] - x["rerank_ms"] for x in t),
        "compute_ms": p50(x["embed_compute_ms"] + x["search_compute_ms"] + x["rerank_compute_ms"] for x in t)})
    return out


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--requests", type=int, default=300, help="requests per application and stage setting")
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--rerank-depth", type=int, default=5)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()

    hook = {"worker_process_setup_hook": noop_models}
    with common.serve_corpus(args.out, args.pages, runtime_env=hook) as corpus:
        noop = corpus.folder / "noop" / "index"
        noop.parent.mkdir(exist_ok=True)
        if not noop.exists():
            noop.symlink_to(corpus.index)
        port = common.free_port()
        small = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.05}
        apps = {"noop": (noop, {}), "noop-old": (noop, OLD_WAITS), "real": (corpus.index, {})}
        clients = {name: common.deploy_app(port, name, index, reranker=str(corpus.reranker), metrics=False, **{
            stage: {**small, **({"batch_wait_timeout_s": waits[stage]} if stage in waits else {})}
            for stage in ("embedder", "retriever", "rerank", "ingress")}) for name, (index, waits) in apps.items()}
        clients = {"floor": floor_app(port), **clients}  # after the endpoint: its deploy starts Serve at the port
        common.closed_loop(clients, corpus.queries, clients=1, requests=10, rerank_depth=0, strict=True)  # warm-up

        report: dict = {"machine": f"{os.cpu_count()} CPUs", "requests": args.requests}
        for stage, depth in (("first_stage", 0), ("both_stages", args.rerank_depth)):
            report[f"in_process_{stage}"] = common.p50_p99(common.in_process(corpus, corpus.queries[:60], depth))
        report["in_process_hops"] = in_process_hops(corpus)
        for stage, depth in (("first_stage", 0), ("both_stages", args.rerank_depth)):
            wanted = clients if depth == 0 else {n: c for n, c in clients.items() if n in ("noop", "real")}
            replies, _ = common.closed_loop(wanted, corpus.queries, clients=1, requests=args.requests,
                                            rerank_depth=depth, strict=True)
            report[stage] = {n: breakdown(r) for n, r in replies.items()}
            for n, b in report[stage].items():
                print(f"{stage:12s} {n:10s} " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()), flush=True)
        for stage in ("first_stage", "both_stages"):
            report[f"{stage}_overhead_ms"] = report[stage]["real"]["p50_ms"] - report[f"in_process_{stage}"]["p50_ms"]
        report["removed_ms"] = report["first_stage"]["noop-old"]["p50_ms"] - report["first_stage"]["noop"]["p50_ms"]
        print(f"endpoint p50 − in-process compute, first stage: {report['first_stage_overhead_ms']:.1f} ms (goal ≤ "
              f"10); both stages: {report['both_stages_overhead_ms']:.1f} ms; removed from a lone request (noop-old − "
              f"noop): {report['removed_ms']:.1f} ms")
        print(json.dumps(report, indent=1, default=float))
        common.write_json(args.json, {"args": vars(args), **report})


if __name__ == "__main__":
    main()
