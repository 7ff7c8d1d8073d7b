"""ANN index defaults on page-like vectors: recall@10 against exact search and one-query latency per size tier, at
the ``index_type: auto`` defaults, with a small sweep of the search depth around them (not a test).

Vectors: :mod:`bench.synthetic_vectors` (topics with Zipf sizes, documents and pages in each topic's own
low-dimensional subspace, a shared direction; queries off their document with a modality shift), L2-normalised,
1024-d by default. Its profile was matched to the page and query embeddings of a trained embedder (``--parts
profile --model``: the neighbour profile of both, side by side). Uniform random vectors, the earlier measurement,
are the worst case of any approximate index and were not what a corpus looks like.

Per size in ``--sizes``: the index ``choose_spec`` picks with the default IndexConfig, built with ``build_index``;
recall@10 against exact top 10 (numpy) over ``--queries`` queries, and latency of one query at a time through
``search`` at ``--threads`` FAISS/BLAS threads (1: a Retriever replica at 1 CPU; builds use every core). Then the
sweep: the search depth (HNSW efSearch, IVF nprobe) around the default, and the other index types of ``--compare``
where they are cheap enough to build here (HNSW up to ``--hnsw-build-max``: 37 s for 100k of these vectors on 2
cores, ~750 s for 200k uniform random ones; its build time grows faster than the size). Sizes past the largest
measured one are computed, and labelled so: the spec ``auto`` picks, its memory from bench/index_scale.py's bytes per
page, and for IVF the vectors scanned per query.

    python -m bench.ann_recall                                      # 100k and 1M, ~20 min on 2 CPU cores
    python -m bench.ann_recall --sizes 20000 --compare hnsw,ivf_sq8 --queries 100   # a smoke run, ~1 min
    python -m bench.ann_recall --parts profile --model runs/<run>/model   # a trained embedder's profile
"""

from __future__ import annotations

import json
import sys
import time

from bench import common
from bench.synthetic_vectors import PageVectors, VectorProfile, neighbour_profile

SWEEP = {"hnsw": ("ef_search", [32, 64, 128, 256, 512]), "ivf_sq8": ("nprobe", [8, 16, 32, 64, 128, 256]),
         "ivf_pq": ("nprobe", [8, 16, 32, 64, 128, 256]), "flat": (None, [None])}
COMPUTED_SIZES = [5_000_000, 20_000_000, 100_000_000]


def profile(args) -> dict:
    """The neighbour profile of a trained embedder's pages and queries, next to the generator's at the same size."""
    import torch

    from ray_vdr.config import ModelConfig
    from ray_vdr.data.images import pil_pages
    from ray_vdr.models.load import build_model

    torch.set_num_threads(args.threads)
    queries, pngs = zip(*common.synthetic_pages(args.profile_pages), strict=True)
    model = build_model(ModelConfig(name_or_path=args.model, builder="load", min_pixels=args.min_pixels,
                                    max_pixels=args.max_pixels), device="cpu")
    x = model.encode_document(pil_pages(list(pngs)), batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    q = model.encode_query(list(queries), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    gen = PageVectors(len(x), args.dim, seed=args.seed)
    out = {"pages": len(x), "model_dim": int(x.shape[1]), "model": neighbour_profile(x, q),
           "generator": neighbour_profile(gen.pages(), gen.queries(len(x)))}
    print(f"\nneighbour profile at {len(x):,} pages and as many queries (medians): model {x.shape[1]}-d, generator "
          f"{args.dim}-d")
    for key in out["model"]:
        print(f"    {key:<26} model {out['model'][key]:8.3f}   generator {out['generator'][key]:8.3f}")
    return out


def _depth(index, kind: str, value) -> None:
    import faiss

    if kind == "hnsw":
        index.hnsw.efSearch = value
    elif kind.startswith("ivf"):
        faiss.extract_index_ivf(index).nprobe = value


def measure_index(x, q, truth, spec, default: bool, args, build_threads: int) -> dict:
    """Build one index and measure its sweep of search depths (the spec's own depth included)."""
    import faiss

    from ray_vdr.corpus.faiss_index import build_index

    faiss.omp_set_num_threads(build_threads)
    t = time.perf_counter()
    index = build_index(x, spec)
    built = time.perf_counter() - t
    knob, values = SWEEP[spec.type]
    own = spec.params.get(knob) if knob else None
    rows = []
    print(f"  {spec.type} {spec.params}{' (auto)' if default else ''}: built in {built:.0f} s", flush=True)
    with common.search_threads(args.threads):
        for value in sorted(set(values) | {own}, key=lambda v: -1 if v is None else v):
            _depth(index, spec.type, value)
            m = common.measure_search(index, q, truth, None, 0)
            row = {"knob": knob, "value": value, "default": value == own,
                   **{k: m[k] for k in ("recall_at_10", "p50_ms", "p99_ms")}}
            rows.append(row)
            print(f"    {knob or 'exact'}={value}{' (default)' if row['default'] else ''}: recall@10 "
                  f"{m['recall_at_10']:.3f}, p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms", flush=True)
    _depth(index, spec.type, own)
    return {"type": spec.type, "params": spec.params, "auto": default, "build_seconds": round(built, 1), "rows": rows}


def tier(n: int, args, build_threads: int) -> dict:
    from ray_vdr.config import IndexConfig
    from ray_vdr.corpus.faiss_index import choose_spec

    t = time.perf_counter()
    gen = PageVectors(n, args.dim, seed=args.seed)
    x, q = gen.pages(), gen.queries(args.queries)
    with common.search_threads(build_threads):
        truth = common.exact_top(x, q, None)
    auto = choose_spec(n, args.dim, IndexConfig())
    print(f"\n{n:,} page-like {args.dim}-d vectors, {args.queries} queries: generated with their exact top 10 in "
          f"{time.perf_counter() - t:.0f} s; auto picks {auto.type}", flush=True)
    out = {"n": n, "auto": auto.as_dict(), "indexes": [measure_index(x, q, truth, auto, True, args, build_threads)]}
    for kind in [k for k in args.compare.split(",") if k and k != auto.type]:
        if kind == "hnsw" and n > args.hnsw_build_max:
            print(f"  hnsw: not built at {n:,} (over --hnsw-build-max {args.hnsw_build_max:,})")
            continue
        spec = choose_spec(n, args.dim, IndexConfig(index_type=kind))
        out["indexes"].append(measure_index(x, q, truth, spec, False, args, build_threads))
    return out


def computed(measured: list[dict], dim: int) -> dict:
    """Past the largest measured size: the auto spec, its memory and (IVF) the vectors one query scans."""
    from ray_vdr.config import IndexConfig
    from ray_vdr.corpus.faiss_index import choose_spec

    scale = common.ROOT / "docs" / "bench" / "results" / "index-scale-cpu.json"
    per_page = json.loads(scale.read_text())["per_page"] if scale.is_file() else {}
    last = max(measured, key=lambda t: t["n"])
    ref = next((ix for ix in last["indexes"] if ix["auto"] and ix["type"].startswith("ivf")), None)
    rows = []
    for n in [s for s in COMPUTED_SIZES if s > last["n"]]:
        spec = choose_spec(n, dim, IndexConfig())
        b = per_page.get(spec.type, {}).get(str(dim), {}).get("rss")
        row = {"n": n, "spec": spec.as_dict(), "index_gib": b * n / 2 ** 30 if b else None}
        if spec.type.startswith("ivf"):
            p = spec.params
            row["scanned_per_query"] = p["nlist"] + p["nprobe"] * n / p["nlist"]
            if ref is not None and ref["type"] == spec.type:  # p50 in proportion to the vectors scanned
                q = ref["params"]
                p50 = next(r["p50_ms"] for r in ref["rows"] if r["default"])
                row["p50_ms"] = p50 * row["scanned_per_query"] / (q["nlist"] + q["nprobe"] * last["n"] / q["nlist"])
        rows.append(row)
    return {"bytes_per_page": {k: v.get(str(dim), {}).get("rss") for k, v in per_page.items()}, "rows": rows}


def render(r: dict) -> list[str]:
    """The Markdown block bench/report.py shows for these results."""
    out = []
    if "profile" in r:
        pr = r["profile"]
        out += [f"Neighbour profile (medians) at {pr['pages']:,} synthetic pages and as many queries: the trained "
                f"model ({pr['model_dim']}-d) and the generator ({r['dim']}-d).", "", "| measure | model | generator |",
                "|---|---|---|"]
        out += [f"| {k} | {v:.3f} | {pr['generator'][k]:.3f} |" for k, v in pr["model"].items()]
        out.append("")
    for t in r.get("tiers", []):
        a = t["auto"]
        out += [f"**{t['n']:,} page-like {r['dim']}-d vectors** ({r['args']['queries']} queries, one at a time, "
                f"{r['args']['threads']} search thread): `auto` picks {a['type']}"
                + (f" {a['params']}" if a["params"] else ""), "",
                "| index | built in | search depth | recall@10 | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for ix in t["indexes"]:
            for row in ix["rows"]:
                depth = "exact" if row["knob"] is None else f"{row['knob']} {row['value']}"
                out.append(f"| {ix['type']}{' (auto)' if ix['auto'] else ''} | {ix['build_seconds']:.0f} s | "
                           f"{depth}{' **(default)**' if row['default'] else ''} | {row['recall_at_10']:.3f} | "
                           f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
        out.append("")
    if r.get("computed", {}).get("rows"):
        out += ["**Computed, not measured** (the spec `auto` picks; index memory from bench/index_scale.py's bytes per "
                "page; recall past the largest measured size is not known):", "",
                "| pages | auto | index GiB | vectors scanned per query | p50 ms (measured p50 x scanned ratio) |",
                "|---|---|---|---|---|"]
        for row in r["computed"]["rows"]:
            gib = "-" if row["index_gib"] is None else f"{row['index_gib']:.1f}"
            scanned = f"{row['scanned_per_query']:,.0f}" if "scanned_per_query" in row else "-"
            p50 = f"{row['p50_ms']:.1f}" if "p50_ms" in row else "-"
            out.append(f"| {row['n']:,} | {row['spec']['type']} {row['spec']['params']} | {gib} | {scanned} | {p50} |")
    return out


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--parts", default="tiers", help="tiers (recall and latency per size), profile (needs --model)")
    p.add_argument("--sizes", default="100000,1000000", help="corpus sizes, comma-separated")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--compare", default="hnsw,ivf_sq8", help="index types also measured at each size (besides auto)")
    p.add_argument("--hnsw-build-max", type=int, default=200_000, help="largest size HNSW is built at here")
    p.add_argument("--threads", type=int, default=1, help="FAISS and BLAS threads while searching")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="profile: a trained Sentence Transformers embedder (folder)")
    p.add_argument("--profile-pages", type=int, default=1000, help="profile: synthetic pages (and queries) embedded")
    p.add_argument("--min-pixels", type=int, default=1024, help="profile: the model's processor bounds")
    p.add_argument("--max-pixels", type=int, default=16384)
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"tiers", "profile"} or ("profile" in parts and not args.model):
        p.error("--parts takes tiers and/or profile; profile needs --model")

    import faiss

    t0 = time.perf_counter()
    report: dict = {"args": vars(args), "dim": args.dim, "generator": VectorProfile().as_dict()}
    if "profile" in parts:
        report["profile"] = profile(args)
    if "tiers" in parts:
        build_threads = faiss.omp_get_max_threads()
        report["tiers"] = [tier(int(n), args, build_threads) for n in args.sizes.split(",")]
        report["computed"] = computed(report["tiers"], args.dim)
        for row in report["computed"]["rows"]:
            print(f"computed, not measured: {row['n']:,} → {row['spec']['type']} {row['spec']['params']}, index "
                  f"{row['index_gib'] or 0:.1f} GiB" + (f", {row['scanned_per_query']:,.0f} vectors scanned per query"
                                                       if "scanned_per_query" in row else "")
                  + (f", p50 ~{row['p50_ms']:.1f} ms" if "p50_ms" in row else ""))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\ndone in {report['seconds']:.0f} s")
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
