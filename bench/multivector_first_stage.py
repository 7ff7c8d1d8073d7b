"""First-stage candidate generation for multi-vector (late-interaction, MaxSim) page retrieval: recall@10 against
exhaustive MaxSim, one-query latency and resident bytes per page of each method, to choose the default of a future
multi-vector index (ColPali/ColQwen-style: a page is T token vectors, a query Q token vectors, and a page's score is
the sum over query tokens of their best dot product with the page's tokens).

Data (generated here, a pure function of the sizes and the seed): pages of ``--tokens`` L2-normalised token vectors
of ``--dim``. Every token carries a direction shared by all (late-interaction embeddings are anisotropic); a page is a
sequence of contiguous segments (regions of an image: consecutive patches look alike), each either background (a few
layout directions shared by every page) or one of its document's 2-5 topics (Zipf-popular among ~2 sqrt(N)). Pages come
in documents (~8 pages) that share their own variant of each topic, a page varies it a little, a segment more. A query
is ``--query-tokens`` noisy copies (cosine ~0.64 to the copied token) of content tokens of a target page, so the
target's document and the pages sharing its topics compete with it. The ground truth is exhaustive MaxSim top 10 over
the unpooled tokens; the table also shows how often the target page is in a method's top 10.

Methods, each followed by exact MaxSim rescoring of its k' candidate pages (with the pooled tokens when pooled) and
searched one query at a time on one thread (FAISS and BLAS), query encoding included:

- ``exhaustive``: MaxSim against every page (the reference; at pooling 3, the ceiling pooling leaves);
- ``fde``: MUVERA fixed dimensional encodings (arXiv:2405.19504; the multi-vector index's first stage,
  :class:`ray_vdr.corpus.late.FDE`): per repetition, a SimHash of ``k_sim`` hyperplanes
  splits the space into 2^k_sim partitions; a query sums its tokens per partition, a page averages them (an empty
  partition takes the page token nearest to it in Hamming distance), each partition's vector is projected to
  ``d_proj`` by a random +-1 matrix; repetitions concatenated (optionally a final count-sketch projection).
  Pages' FDEs in a FAISS IndexFlatIP (``--fde-index hnsw``: HNSW, M 32), top k' by inner product;
- ``token-ivf`` (PLAID-like): every page token in a FAISS IVF-Flat index (inner product, nlist ~ sqrt(tokens)) with a
  token -> page map; each query token takes its top ``--token-k`` tokens, the union of their pages is ranked by the
  sum over query tokens of the page's best hit (a missed token counts that query token's last hit, as XTR imputes)
  and capped at k'.

Bytes per page: the first-stage structure as FAISS serializes it (plus the 4-byte token -> page map), and the token
vectors the rescoring reads at fp16. Pooling (``--pooling``) averages consecutive groups of ``factor`` tokens of a
page, renormalised; its recall is against the unpooled truth. fast-plaid is not measured (reason printed).

    python -m bench.multivector_first_stage                  # 6,000 pages x 256 tokens, 100 queries, ~3.5 min, 3.4 GB
    python -m bench.multivector_first_stage --pooling 1 --fde "4,16,10;5,16,20;5,16,20,2048" --fde-index hnsw
    python -m bench.multivector_first_stage --pages 1000 --queries 30 --kprime 50,100   # a smoke run, ~20 s
"""

from __future__ import annotations

import os
import time
from importlib import metadata

import numpy as np

from bench.common import K, p50_p99, parser, search_threads, timed, write_json
from ray_vdr.corpus.late import FDE

GOAL = 0.95  # recall@10 a default must reach
GEN = {"common": 0.6, "topics_per_sqrt_n": 2.0, "layouts": 8, "background": 0.25, "doc_pages": 8, "doc_spread": 0.8,
       "page_spread": 0.3, "segment_mean": 8, "segment_spread": 0.45, "token_noise": 0.25, "query_noise": 1.2}


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale / np.sqrt(shape[-1]))


def generate(n: int, tokens: int, dim: int, queries: int, q_tokens: int, seed: int):
    """Pages (n, tokens, dim), queries (queries, q_tokens, dim) and each query's target page, all float32 unit rows."""
    g, rng = GEN, np.random.default_rng(seed)
    common = _unit(rng.standard_normal(dim)) * g["common"]
    topics = _unit(rng.standard_normal((int(16 + g["topics_per_sqrt_n"] * np.sqrt(n)), dim)))
    layouts = _unit(rng.standard_normal((g["layouts"], dim)))
    zipf = 1 / np.arange(1, len(topics) + 1)
    doc = np.cumsum(rng.random(n) < 1 / g["doc_pages"])  # page -> document
    own = rng.choice(len(topics), (doc[-1] + 1, 5), p=zipf / zipf.sum())  # a document's topics (the first 2-5 used)
    doc_used = rng.integers(2, 6, doc[-1] + 1)
    doc_variant = _unit(topics[own] + _noise(rng, own.shape + (dim,), g["doc_spread"]))  # its own take on each
    x = np.empty((n, tokens, dim), np.float32)
    content = np.empty((n, tokens), bool)
    for lo in range(0, n, 256):
        c = min(256, n - lo)
        used = doc_used[doc[lo:lo + c]]
        variant = _unit(doc_variant[doc[lo:lo + c]] + _noise(rng, (c, 5, dim), g["page_spread"]))
        seg = np.cumsum(rng.random((c, tokens)) < 1 / g["segment_mean"], axis=1)  # token -> segment
        kind = (rng.random((c, tokens)) * used[:, None]).astype(int)  # segment -> one of the page's topics
        back = rng.random((c, tokens)) < g["background"]
        centre = np.where(back[..., None], layouts[rng.integers(0, g["layouts"], (c, tokens))],
                          np.take_along_axis(variant, kind[..., None], 1))
        centre = _unit(centre + _noise(rng, (c, tokens, dim), g["segment_spread"]))
        x[lo:lo + c] = _unit(np.take_along_axis(centre, seg[..., None], 1) + common
                             + _noise(rng, (c, tokens, dim), g["token_noise"]))
        content[lo:lo + c] = ~np.take_along_axis(back, seg, 1)
    target = rng.integers(0, n, queries)
    q = np.empty((queries, q_tokens, dim), np.float32)
    for i, p in enumerate(target):
        pick = rng.choice(np.flatnonzero(content[p]) if content[p].any() else tokens, q_tokens)
        q[i] = _unit(x[p, pick] + _noise(rng, (q_tokens, dim), g["query_noise"]))
    return x, q, target


def pool(x: np.ndarray, factor: int) -> np.ndarray:
    """Each page's consecutive groups of ``factor`` tokens averaged (the last group may be shorter), renormalised."""
    if factor == 1:
        return x
    n, t, d = x.shape
    full = t // factor * factor
    parts = [x[:, :full].reshape(n, t // factor, factor, d).mean(2)]
    if full < t:
        parts.append(x[:, full:].mean(1, keepdims=True))
    return _unit(np.concatenate(parts, 1))


def maxsim(q: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """MaxSim of one query (Q, d) against pages (m, T, d): (m,)."""
    s = q @ docs.reshape(-1, docs.shape[2]).T
    return s.reshape(len(q), len(docs), -1).max(2).sum(0)


def top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best along the last axis, best first."""
    k = min(k, scores.shape[-1])
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, -1), axis=-1, kind="stable"), -1)


def exhaustive(q: np.ndarray, x: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Exact MaxSim top K of one query, pages in chunks (what the exhaustive method does per query)."""
    return top(np.concatenate([maxsim(q, x[lo:lo + chunk]) for lo in range(0, len(x), chunk)]), K)


def exhaustive_all(q: np.ndarray, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Exact MaxSim top K of every query, queries in batches (the ground truth; every thread)."""
    nq, qt, d = q.shape
    chunk = max(1, (2 ** 25) // (batch * qt * x.shape[1]))
    out = []
    for i in range(0, nq, batch):
        qb = q[i:i + batch].reshape(-1, d)
        b = len(qb) // qt
        s = [(qb @ x[lo:lo + chunk].reshape(-1, d).T).reshape(b, qt, -1, x.shape[1]).max(3).sum(1)
             for lo in range(0, len(x), chunk)]
        out.append(top(np.concatenate(s, 1), K))
    return np.concatenate(out)


def fde_index(fde: FDE, x: np.ndarray, kind: str):
    import faiss

    index = faiss.IndexFlatIP(fde.dim) if kind == "flat" else faiss.IndexHNSWFlat(fde.dim, 32,
                                                                                   faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction, index.hnsw.efSearch = 80, 256
    index.add(fde.encode_pages(x))

    def first_stage(q: np.ndarray, kp: int) -> np.ndarray:
        ids = index.search(fde.encode(q[None], doc=False), kp)[1][0]
        return ids[ids >= 0]

    return first_stage, index


def token_index(x: np.ndarray, nlist: int, nprobe: int, token_k: int, seed: int):
    """Every token in an IVF-Flat index; candidates: the union of the query tokens' top ``token_k`` tokens' pages."""
    import faiss

    n, t, d = x.shape
    flat = x.reshape(-1, d)
    nlist = nlist or 2 ** round(np.log2(np.sqrt(len(flat))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter, index.cp.max_points_per_centroid = 10, 64
    sample = np.random.default_rng(seed).choice(len(flat), min(len(flat), 64 * nlist), replace=False)
    index.train(flat[np.sort(sample)])
    index.add(flat)
    index.nprobe = nprobe
    page = np.arange(n, dtype=np.int32).repeat(t)  # token -> page (pages of any length would need just this map)

    def first_stage(q: np.ndarray, kp: int) -> np.ndarray:
        sims, ids = index.search(q, token_k)
        ok = ids >= 0
        gain = (sims - sims[:, -1:])[ok]  # over the query token's last hit (the imputed score of a miss)
        pages = page[ids[ok]]
        key = np.nonzero(ok)[0] * n + pages
        order = np.lexsort((-gain, key))
        first = np.r_[True, key[order][1:] != key[order][:-1]]  # each (query token, page): its best hit
        cand, score = np.unique(pages[order][first], return_inverse=True)
        score = np.bincount(score, weights=gain[order][first])
        return cand[top(score, kp)]

    return first_stage, index, {"nlist": nlist, "nprobe": nprobe, "token_k": token_k}, page.nbytes


def measure(first_stage, xs: np.ndarray, q: np.ndarray, truth: np.ndarray, target: np.ndarray, kp: int) -> dict:
    """One query at a time after 3 warm-up queries: candidates, exact MaxSim rescoring; recall@10 and milliseconds."""
    def one(qv: np.ndarray) -> tuple[np.ndarray, float]:
        cand = np.sort(first_stage(qv, kp))
        stage1 = time.perf_counter()
        return cand[top(maxsim(qv, xs[cand]), K)], stage1

    for qv in q[:3]:
        one(qv)
    ms, ms1, found = [], [], []
    for qv in q:
        began = time.perf_counter()
        got, stage1 = one(qv)
        ms.append((time.perf_counter() - began) * 1000)
        ms1.append((stage1 - began) * 1000)
        found.append(got)
    return {"recall_at_10": recall(found, truth), "target_at_10": hits(found, target), **p50_p99(ms),
            **p50_p99(ms1, "first_stage_")}


def recall(found, truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(np.asarray(f).tolist()) & set(t.tolist())) / K
                                for f, t in zip(found, truth, strict=True)])), 4)


def hits(found, target: np.ndarray) -> float:
    """The share of queries whose target page is in the top 10 found."""
    return round(float(np.mean([t in np.asarray(f) for f, t in zip(found, target, strict=True)])), 4)


def fast_plaid_status() -> str:
    try:
        return f"skipped: fast-plaid {metadata.version('fast-plaid')} is installed but not wired into this bench"
    except metadata.PackageNotFoundError:
        pass
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "none"
    return (f"skipped: fast-plaid is not installed. Its wheels are built per torch release (the newest, 1.7.0.2110, "
            f"pins torch==2.11.0, a CUDA build) and this environment has torch {torch}, which installing it would "
            "replace")


def _row(method: str, factor: int, kp: int | None, m: dict, first: float, tokens: float, build: float) -> dict:
    r = {"method": method, "pooling": factor, "kprime": kp, **m, "first_stage_bytes_per_page": round(first, 1),
         "token_bytes_per_page_fp16": round(tokens, 1), "build_seconds": round(build, 1)}
    print(f"  {method:<26} pool {factor}  k' {kp or '-':>4}: recall@10 {r['recall_at_10']:.3f}  p50 "
          f"{r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  first stage {first:>9,.0f} B/page", flush=True)
    return r


def build(spec: str, xs: np.ndarray, args) -> tuple:
    """One first stage over the pages ``xs``: its name, its function, its FAISS index and the bytes beside it."""
    if spec == "token-ivf":
        first_stage, index, params, extra = token_index(xs, args.nlist, args.nprobe, args.token_k, args.seed)
        return f"token-ivf nl{params['nlist']} np{args.nprobe} t{args.token_k}", first_stage, index, extra
    fde = FDE(args.dim, *[int(v) for v in spec.split(",")], seed=args.seed)
    return f"{fde.name} {args.fde_index}", *fde_index(fde, xs, args.fde_index), 0


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--pages", type=int, default=6000)
    p.add_argument("--tokens", type=int, default=256, help="token vectors per page (before pooling)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--query-tokens", type=int, default=32)
    p.add_argument("--pooling", default="1,3", help="token pooling factors")
    p.add_argument("--kprime", default="50,100,200,400", help="candidate pages rescored (k')")
    p.add_argument("--fde", default="4,16,10;5,16,20", help="FDE configs, k_sim,d_proj,reps[,final] separated by ;")
    p.add_argument("--fde-index", default="flat", choices=["flat", "hnsw"])
    p.add_argument("--nlist", type=int, default=0, help="token IVF lists (0: the power of 2 nearest sqrt(tokens))")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--token-k", type=int, default=256, help="tokens each query token retrieves")
    p.add_argument("--exhaustive-queries", type=int, default=20, help="queries the exhaustive method is timed on")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import faiss

    cpus, began = os.cpu_count() or 1, time.perf_counter()
    kps = [int(k) for k in args.kprime.split(",")]
    x, q, target = generate(args.pages, args.tokens, args.dim, args.queries, args.query_tokens, args.seed)
    with search_threads(cpus):
        truth = exhaustive_all(q, x)
    sizes = {"pages": args.pages, "tokens_per_page": args.tokens, "dim": args.dim, "queries": args.queries,
             "query_tokens": args.query_tokens, "tokens": args.pages * args.tokens,
             "target_top1": round(float(np.mean(truth[:, 0] == target)), 3),
             "target_top10": round(float(np.mean((truth == target[:, None]).any(1))), 3)}
    print(f"{args.pages:,} pages x {args.tokens} tokens ({sizes['tokens']:,} token vectors, {args.dim}-d), "
          f"{args.queries} queries x {args.query_tokens} tokens; generated with the exhaustive MaxSim top 10 in "
          f"{time.perf_counter() - began:.0f} s. The query's target page is the top 1 for {sizes['target_top1']:.0%} "
          f"of queries, in the top 10 for {sizes['target_top10']:.0%}.", flush=True)
    rows = []
    for factor in [int(f) for f in args.pooling.split(",")]:
        xs = pool(x, factor)
        vec = xs.shape[1] * args.dim * 2
        sizes[f"tokens_per_page_pool{factor}"] = xs.shape[1]
        print(f"pooling {factor}: {xs.shape[1]} tokens per page", flush=True)
        with search_threads(cpus):
            ceiling = truth if factor == 1 else exhaustive_all(q, xs)
        with search_threads(1):
            exhaustive(q[0], xs)
            ms = [timed(exhaustive, qv, xs)[1] for qv in q[:args.exhaustive_queries]]
        m = {"recall_at_10": recall(ceiling, truth), "target_at_10": hits(ceiling, target), **p50_p99(ms)}
        rows.append(_row("exhaustive", factor, None, m, 0, vec, 0))
        for spec in [*args.fde.split(";"), "token-ivf"]:
            with search_threads(cpus):
                t = time.perf_counter()
                name, first_stage, index, extra = build(spec, xs, args)
                built = time.perf_counter() - t
            first = (faiss.serialize_index(index).nbytes + extra) / len(xs)
            with search_threads(1):
                for kp in kps:
                    m = measure(first_stage, xs, q, truth, target, kp)
                    rows.append(_row(name, factor, kp, m, first, vec, built))
            del first_stage, index
        del xs
    ok = [r for r in rows if r["method"] != "exhaustive" and r["recall_at_10"] >= GOAL]
    choice = min(ok, key=lambda r: r["p50_ms"]) if ok else None
    report = {"args": vars(args), "sizes": sizes, "generator": GEN, "goal": GOAL, "rows": rows, "choice": choice,
              "fast_plaid": fast_plaid_status(), "wall_seconds": round(time.perf_counter() - began, 1)}
    print("\n" + "\n".join(render(report)))
    write_json(args.json, report)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render(r: dict) -> list[str]:
    """The results as a Markdown block (table and choice), in the form bench/report.py shows the others."""
    s = r["sizes"]
    pooled = ", ".join(f"{s[k]} at pooling {k.removeprefix('tokens_per_page_pool')}" for k in s if "_pool" in k)
    out = [f"{s['pages']:,} synthetic pages x {s['tokens_per_page']} tokens ({pooled}), {s['dim']}-d; "
           f"{s['queries']} queries x {s['query_tokens']} tokens, one at a time on one thread. recall@10 against "
           "exhaustive MaxSim over the unpooled tokens, after exact MaxSim rescoring of the k' candidates (with the "
           "pooled tokens); latency includes query encoding, first stage and rescoring.", "",
           "| method | pooling | k' | recall@10 | target in top 10 | p50 ms | p99 ms | first stage p50 ms | "
           "first stage B/page | token vectors fp16 B/page | build s |", "|---" * 11 + "|"]
    for x in r["rows"]:
        out.append(f"| {x['method']} | {x['pooling']} | {x['kprime'] or '-'} | {x['recall_at_10']:.3f} | "
                   f"{x['target_at_10']:.2f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | "
                   f"{_f(x.get('first_stage_p50_ms'))} | "
                   f"{x['first_stage_bytes_per_page']:,.0f} | {x['token_bytes_per_page_fp16']:,.0f} | "
                   f"{x['build_seconds']:.1f} |")
    c = r["choice"]
    out += ["", (f"Default (recall@10 ≥ {r['goal']} at the lowest p50): **{c['method']}, pooling {c['pooling']}, "
                 f"k' {c['kprime']}**: recall@10 {c['recall_at_10']:.3f}, p50 {c['p50_ms']:.2f} ms, "
                 f"{c['first_stage_bytes_per_page']:,.0f} B/page first stage." if c else
                 f"No first stage reached recall@10 ≥ {r['goal']}: exhaustive MaxSim stays the default."),
            "", f"fast-plaid: {r['fast_plaid']}"]
    return out


if __name__ == "__main__":
    main()
