"""Filtered search on the living index: latency and recall@10 of filtered against unfiltered search, side by side in
one run, for each index type (not a test).

Removed pages (tombstones) and metadata filters are applied inside the FAISS search
(``ray_vdr.corpus.faiss_index.search(index, queries, k, allowed, exact_max)``): up to ``exact_max`` allowed vectors
are scored exactly from the index's own stored vectors (flat and HNSW keep them), otherwise FAISS searches with an
``IDSelectorBitmap`` and a search depth (HNSW efSearch, IVF nprobe) widened by the inverse of the allowed share.
Both paths are measured: the default ``exact_max`` and ``exact_max=0`` (the selector always).

Data: ``--n`` clustered vectors at ``--dim`` (a Matryoshka-truncated size): a Gaussian mixture of ``--clusters``
centres with log-normal cluster sizes and a noise scale per cluster, L2-normalised, in random position order.
Queries are data points plus noise (``--query-noise``), normalised: near the data, not uniform. Cases:

- unfiltered (the baseline of every ratio);
- a collection of 1% and one of 10% of the pages, assigned at random;
- topical collections of 1% and 10% (whole clusters: real collections are about something), queried from the whole
  corpus, and the 1% topical one queried near its own pages (its baseline: unfiltered on those queries);
- 5% of positions removed (tombstones), no filter.

Recall@10 is against the exact top 10 within the allowed positions (numpy, brute force). Every returned position is
checked to be allowed, and every top-k to be full (no -1). Latency is one query at a time through ``search`` (the
mask → selector or exact scoring included), after 5 warm-up queries, at ``--threads`` FAISS/BLAS threads (1: a
Retriever replica at 1 CPU, where Ray sets OMP_NUM_THREADS=1; builds use every core). Ratios are filtered ÷
unfiltered on the same index and queries: p50 latency, recall@10.

    python -m bench.filter_search                          # 200,000 x 128-d, 4 index types, ~4 min on 2 CPU cores
    python -m bench.filter_search --n 50000 --types flat,hnsw --dim 256
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from bench import common

K = common.K


def clustered(n: int, dim: int, clusters: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``n`` normalised vectors of a Gaussian mixture and each one's cluster."""
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = rng.lognormal(0.0, 1.0, clusters)
    label = rng.choice(clusters, n, p=sizes / sizes.sum())
    noise = rng.uniform(0.5, 1.0, clusters).astype(np.float32)  # the noise vector's norm relative to the centre's
    x = np.empty((n, dim), np.float32)
    for i in range(0, n, 65_536):
        lab = label[i:i + 65_536]
        block = centres[lab] + noise[lab, None] * rng.standard_normal((len(lab), dim), dtype=np.float32) / np.sqrt(dim)
        x[i:i + len(lab)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, label


def near(x: np.ndarray, pool: np.ndarray, nq: int, noise: float, rng) -> np.ndarray:
    """``nq`` queries: data points drawn from ``pool`` plus noise of norm ~``noise``, normalised."""
    q = x[rng.choice(pool, nq, replace=False)] + noise * rng.standard_normal((nq, x.shape[1]), dtype=np.float32) / \
        np.sqrt(x.shape[1])
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def topical(label: np.ndarray, share: float, rng) -> np.ndarray:
    """A collection made of whole clusters, taken in random order until it holds ``share`` of the pages."""
    counts = np.bincount(label)
    order = rng.permutation(len(counts))
    taken = order[: int(np.searchsorted(np.cumsum(counts[order]), share * len(label))) + 1]
    return np.isin(label, taken)


def random_share(n: int, share: float, rng) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[rng.choice(n, round(share * n), replace=False)] = True
    return mask


def path_of(index, spec, allowed: np.ndarray | None, exact_max: int) -> tuple[str, str]:
    """Which code path ``search`` takes, and the search depth it uses."""
    from ray_vdr.corpus.faiss_index import filter_path

    if allowed is None:
        depth = {"hnsw": f"efSearch {spec.params.get('ef_search')}", "flat": "-"}.get(
            spec.type, f"nprobe {spec.params.get('nprobe')}")
        return "plain", depth
    return filter_path(index, int(allowed.sum()), exact_max, K)


def run_cases(index, spec, cases, qsets, truth, exact_max: int, n: int) -> list[dict]:
    """Every case on one index: the default path, and the selector (exact_max=0) where the default is not it."""
    out = []
    for name, mask, qs in cases:
        for em in [exact_max] if mask is None else [exact_max, 0]:
            path, depth = path_of(index, spec, mask, em)
            if em == 0 and out[-1]["path"] == path:
                continue  # the default already took the selector: the same path
            out.append({"index": spec.type, "case": name, "queries": qs, "exact_max": em, "path": path,
                        "depth": depth, "allowed": n if mask is None else int(mask.sum()),
                        **common.measure_search(index, qsets[qs], truth[name], mask, em)})
    return out


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--n", type=int, default=200_000, help="vectors in the index")
    p.add_argument("--dim", type=int, default=128, help="dimension (a Matryoshka-truncated size)")
    p.add_argument("--clusters", type=int, default=1_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--query-noise", type=float, default=0.5, help="norm of the noise added to a data point")
    p.add_argument("--types", default="flat,hnsw,ivf_sq8,ivf_pq")
    p.add_argument("--exact-max", type=int, default=None, help="the default path's exact_max (default: search's)")
    p.add_argument("--threads", type=int, default=1, help="FAISS and BLAS threads while searching")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import inspect

    import faiss

    from ray_vdr.config import IndexConfig
    from ray_vdr.corpus.faiss_index import build_index, choose_spec, search

    exact_max = inspect.signature(search).parameters["exact_max"].default if args.exact_max is None else args.exact_max
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    x, label = clustered(args.n, args.dim, args.clusters, rng)
    topic1 = topical(label, 0.01, rng)
    masks = {"random 1%": random_share(args.n, 0.01, rng), "random 10%": random_share(args.n, 0.10, rng),
             "topical 1%": topic1, "topical 10%": topical(label, 0.10, rng),
             "5% removed": ~random_share(args.n, 0.05, rng)}
    qsets = {"all": near(x, np.arange(args.n), args.queries, args.query_noise, rng),
             "on-topic": near(x, np.flatnonzero(topic1), args.queries, args.query_noise, rng)}
    cases = [("unfiltered", None, "all"), ("random 1%", masks["random 1%"], "all"),
             ("random 10%", masks["random 10%"], "all"), ("topical 1%", topic1, "all"),
             ("topical 10%", masks["topical 10%"], "all"), ("topical 1%, on-topic queries", topic1, "on-topic"),
             ("5% removed, no filter", masks["5% removed"], "all"), ("unfiltered, on-topic queries", None, "on-topic")]
    truth = {name: common.exact_top(x, qsets[qs], mask) for name, mask, qs in cases}
    print(f"{args.n:,} clustered {args.dim}-d vectors ({args.clusters} centres), {args.queries} queries per case, "
          f"exact top-{K} per case: {time.perf_counter() - t0:.0f} s", flush=True)

    build_threads = faiss.omp_get_max_threads()
    results, builds = [], {}
    for kind in args.types.split(","):
        spec = choose_spec(args.n, args.dim, IndexConfig(index_type=kind))
        faiss.omp_set_num_threads(build_threads)
        t = time.perf_counter()
        index = build_index(x, spec)
        builds[kind] = {"spec": spec.as_dict(), "seconds": round(time.perf_counter() - t, 1)}
        print(f"\n{kind} {spec.params}: built in {builds[kind]['seconds']} s", flush=True)
        with common.search_threads(args.threads):
            results += run_cases(index, spec, cases, qsets, truth, exact_max, args.n)
        base = {r["queries"]: r for r in results if r["index"] == kind and r["path"] == "plain"}
        for r in results:
            if r["index"] == kind:
                b = base[r["queries"]]
                r["latency_ratio"] = r["p50_ms"] / b["p50_ms"]
                r["recall_ratio"] = r["recall_at_10"] / b["recall_at_10"] if b["recall_at_10"] else None
                print(f"  {r['case']:<30} exact_max={r['exact_max']:<6} {r['path']:<8} {r['depth']:<22} "
                      f"recall@10 {r['recall_at_10']:.3f}  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                      f"x{r['latency_ratio']:.2f} latency  x{r['recall_ratio'] or 0:.3f} recall  "
                      f"short {r['short']}  not allowed {r['not_allowed']}", flush=True)
        del index
    report = {"args": vars(args), "n": args.n, "dim": args.dim, "exact_max_default": exact_max,
              "cases": {name: {"allowed": args.n if m is None else int(m.sum()), "queries": qs}
                        for name, m, qs in cases},
              "builds": builds, "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"\ndone in {report['seconds']:.0f} s")
    print(json.dumps({"violations": sum(r["short"] + r["not_allowed"] for r in results)}))
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
