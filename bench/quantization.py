"""Vectors in fewer bits (``index.quantization``): recall@10 against exact float search, latency and resident bytes
per page of each tier, on page-like vectors (bench/synthetic_vectors.py), measured side by side in one run.

Each tier is built, written and read back through the index's own code (``build_index``, ``write_index_file``,
``read_index_file``: a quantized index's codes loaded, its float32 vectors memory-mapped from the file beside them)
and searched one query at a time on one thread, as a Retriever replica does:

- ``none``: float32 vectors in the index (today's flat and HNSW);
- ``int8``: 8-bit codes in memory, ``rescore`` x 10 candidates rescored with the float vectors (default 4);
- ``binary``: a bit per dimension in memory, ``rescore`` x 10 candidates rescored (default 20; also 10 and 40).

Resident bytes per page: the index file a replica loads (codes, or vectors and graph), divided by the pages; the
float vectors of a quantized tier stay on disk (the page cache holds the rows read). Recall is against exact float
search over the same vectors (the ground truth: FAISS flat).

    python -m bench.quantization                   # 100k vectors at 1024-d and 128-d, flat and HNSW, ~6 min
    python -m bench.quantization --n 20000 --dims 128 --types flat   # a quick look
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from bench.common import p50_p99, parser, search_threads, write_json
from bench.synthetic_vectors import PageVectors

GOALS = {"int8": 0.99, "binary": 0.95}


def _tier(x: np.ndarray, q: np.ndarray, truth: np.ndarray, index_type: str, quant: str, rescore: int | None,
          folder: str) -> dict:
    from ray_vdr.config import IndexConfig
    from ray_vdr.corpus.build import read_index_file, write_index_file
    from ray_vdr.corpus.faiss_index import build_index, choose_spec, search

    cfg = IndexConfig(index_type=index_type, quantization=quant, rescore=rescore)
    spec = choose_spec(len(x), x.shape[1], cfg)
    began = time.perf_counter()
    built = build_index(x, spec)
    rel = f"{index_type}-{quant}-{rescore}.faiss"
    size = write_index_file(built, folder, rel)
    build_s = time.perf_counter() - began
    del built
    index = read_index_file(folder, rel, spec.as_dict())
    ms, found = [], []
    for row in q:  # one query at a time, as a replica answers
        t = time.perf_counter()
        _, pos = search(index, row[None], 10)
        ms.append((time.perf_counter() - t) * 1000)
        found.append(pos[0])
    recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)]))
    return {"index_type": index_type, "quantization": quant, "rescore": spec.params.get("rescore"),
            "recall_at_10": round(recall, 4), **p50_p99(ms), "resident_bytes_per_page": round(size / len(x), 1),
            "disk_bytes_per_page": round((size + (len(x) * x.shape[1] * 4 if quant != "none" else 0)) / len(x), 1),
            "build_seconds": round(build_s, 2)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=100_000, help="page vectors per dimension")
    p.add_argument("--dims", default="1024,128")
    p.add_argument("--types", default="flat,hnsw", help="index types (flat, hnsw)")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--binary-rescore", default="10,20,40", help="binary rescore depths (the default, 20, among them)")
    args = p.parse_args()

    rows = []
    with search_threads(1), tempfile.TemporaryDirectory(prefix="quantization-") as folder:
        for dim in [int(d) for d in args.dims.split(",")]:
            pv = PageVectors(args.n, dim, seed=0)
            x, q = pv.pages(), pv.queries(args.queries)
            truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
            for index_type in args.types.split(","):
                tiers = [("none", None), ("int8", None)] + [
                    ("binary", int(r)) for r in args.binary_rescore.split(",")]
                for quant, rescore in tiers:
                    r = {"dim": dim, **_tier(x, q, truth, index_type, quant, rescore, folder)}
                    rows.append(r)
                    print(f"{dim:>5}-d {index_type:<5} {quant:<6} rescore {r['rescore'] or '-':>3}: recall@10 "
                          f"{r['recall_at_10']:.3f}  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                          f"{r['resident_bytes_per_page']:,.0f} B/page resident", flush=True)
    report = {"args": vars(args), "pages": args.n, "rows": rows, "goals": GOALS}
    write_json(args.json, report)


def render(r: dict) -> list[str]:
    """The results as docs/benchmarks.md shows them (bench/report.py)."""
    out = [f"{r['pages']:,} page-like vectors per dimension, {r['args']['queries']} queries one at a time on one "
           "thread; recall@10 against exact float search. Resident: the index file a replica holds in memory; disk: "
           "with the float32 vectors a quantized tier rescores from (memory-mapped).", "",
           "| dim | index | quantization | rescore | recall@10 | p50 ms | p99 ms | resident B/page | disk B/page |",
           "|---|---|---|---|---|---|---|---|---|"]
    defaults = {"int8": 4, "binary": 20}
    for x in r["rows"]:
        recall = f"{x['recall_at_10']:.3f}"
        if x["quantization"] in r["goals"] and x["rescore"] == defaults[x["quantization"]]:
            goal = r["goals"][x["quantization"]]
            recall = f"{recall} (goal ≥ {goal}: {'met' if x['recall_at_10'] >= goal else 'NOT met'})"
        out.append(f"| {x['dim']} | {x['index_type']} | {x['quantization']} | {x['rescore'] or '-'} | {recall} | "
                   f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['resident_bytes_per_page']:,.0f} | "
                   f"{x['disk_bytes_per_page']:,.0f} |")
    return out


if __name__ == "__main__":
    main()
