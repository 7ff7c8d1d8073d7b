"""How large a corpus one Retriever replica holds: memory per page of each FAISS index type and of the id table,
measured, and the largest corpus at a given memory, computed from those measurements (not a test).

Measured, on random normalised vectors (a size does not depend on the vectors) at each of ``--sizes`` x ``--dims``:

- each index type as the corpus job builds it (``ray_vdr.corpus.faiss_index``: flat; HNSW M 32; IVF-SQ8; IVF-PQ at
  dim/8 bytes a vector; IVF lists ~4·sqrt(n)): its serialized size (``faiss.serialize_index``), and the resident
  memory a fresh process gains loading it the way a Retriever replica does (``open_index``: the file's bytes → a
  temporary file → ``read_index``), after loading and at the peak;
- the id table beside the index (ids.parquet, row i = vector i; 10 pages per document): key (64 hex), doc_id (~30
  chars), source (~80), page (int32), shard (45), row (int32), file_hash (64 hex), content (64 hex), live (bool),
  metadata (JSON, ~80 chars): its Arrow ``nbytes``; the resident memory gained reading it whole from Parquet (replicas
  before the slim replica) and mapping it as a replica does now (``ray_vdr.corpus.mapped.mapped_ids``: an Arrow IPC
  file on local disk, memory-mapped, plus the live mask); and the filter columns
  ``ray_vdr.corpus.metadata.PositionFields`` builds from the mapped table (dictionary-encoded codes, numbers, dates);
- a process with the Retriever's imports (``serving.deployments``, faiss, pyarrow): its resident memory.

Per page means marginal: (figure at the largest n − figure at the smallest) ÷ the difference in n, so fixed parts (IVF
centroids, PQ codebooks, the interpreter) fall out. Build shortcuts that change no size, checked in the same run at the
smallest size and dimension: HNSW built with efConstruction 40 instead of 200 (every node has room for 2·M links at
level 0 whatever the construction depth), IVF-PQ without polysemous training (it reorders each sub-quantizer's
centroids; codes keep their size; the corpus job builds without it, the check builds with it).

Computed from those figures, and labelled so: the largest corpus one replica holds at each of ``--memory`` GiB with
``--headroom`` of it kept free, at each of ``--compute-dims``, for one generation (a fixed index) and for two (with a
live manifest a replica holds the live and the previous generation, and loads a new one beside the live one at a
promotion); assumptions in the output. A dimension that was not measured takes its bytes per page by linear
interpolation between the measured ones (every index type's per-page size is affine in the dimension).

    python -m bench.index_scale                          # 20k and 50k vectors at 128 and 1024-d, ~4 min on 2 cores
    python -m bench.index_scale --sizes 20000,100000 --dims 128,512,1024    # more, on a quieter or larger machine
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common
from ray_vdr.storage import write_tables

GIB = 2 ** 30
TYPES = ("flat", "hnsw", "ivf_sq8", "ivf_pq")
PAGE_CACHE = 256 << 20  # PageStore's default LRU cache of page bytes, one per loaded generation

# Run in a fresh process: the resident memory it gains loading one thing, after and at the peak.
LOADER = r"""
import gc, json, re, sys
from pathlib import Path

def mem():
    s = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

what, path = sys.argv[1], sys.argv[2]
import faiss, numpy, pyarrow  # noqa: F401
from ray_vdr.corpus.faiss_index import read_index
from ray_vdr.storage import read_table
if what == "baseline":
    import serving.deployments  # noqa: F401
gc.collect()
before = mem()
if what == "index":  # as ray_vdr.corpus.store.open_index: a local index is read in place
    obj = read_index(path)
elif what == "ids":  # read whole into memory (replicas before the slim replica)
    obj = read_table(path)
    pyarrow.default_memory_pool().release_unused()
elif what == "mapped":  # as open_index: memory-mapped, plus the live mask a replica computes
    from ray_vdr.corpus.mapped import mapped_ids
    from ray_vdr.corpus.versions import allowed_positions
    obj = mapped_ids(path)
    live = allowed_positions(obj)
    pyarrow.default_memory_pool().release_unused()
elif what == "filters":  # the filter columns a replica builds on the first filter, from the mapped table
    from ray_vdr.corpus.mapped import mapped_ids
    from ray_vdr.corpus.metadata import PositionFields
    t = mapped_ids(path)
    gc.collect()
    before = mem()
    obj = PositionFields(t.column("doc_id"), t.column("source"), t.column("metadata"))
    pyarrow.default_memory_pool().release_unused()
gc.collect()
after = mem()
# grown: the process's own memory (anonymous); file: pages of mapped files it touched (the page cache's, which the
# kernel reclaims under pressure: a memory-mapped id table's columns a search read)
print(json.dumps({"rss": after["VmRSS"], "before": before["VmRSS"], "grown": after["RssAnon"] - before["RssAnon"],
                  "file": after["RssFile"] - before["RssFile"],
                  "peak": max(after["VmHWM"], after["VmRSS"]) - before["VmRSS"]}))
"""


def loaded(what: str, path: str = "-") -> dict:
    out = subprocess.run([sys.executable, "-c", LOADER, what, path], capture_output=True, text=True, cwd=common.ROOT,
                         env={"PYTHONPATH": str(common.ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                         timeout=600)
    if out.returncode:
        raise RuntimeError(f"loading {what} {path} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(kind: str, x: np.ndarray, *, shortcut: bool = True):
    """The index the corpus job builds for ``kind`` (``build_index``), HNSW with the size-neutral efConstruction
    shortcut unless told not to; ``shortcut=False`` builds IVF-PQ with FAISS's default polysemous training, which
    build_index skips (the check that skipping it changes no size)."""
    import faiss

    from ray_vdr.config import IndexConfig
    from ray_vdr.corpus.faiss_index import add_to, build_index, choose_spec, factory, set_search_params

    n, dim = x.shape
    if kind == "hnsw":
        spec = choose_spec(n, dim, IndexConfig(index_type="hnsw", **({"hnsw_ef_construction": 40} if shortcut else {})))
        return build_index(x, spec), spec
    spec = choose_spec(n, dim, IndexConfig(index_type=kind))
    if kind != "ivf_pq" or shortcut:
        return build_index(x, spec), spec
    index = factory(spec, dim)  # as build_index, with FAISS's default polysemous training
    faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = True
    index.train(x if n <= 262_144 else x[np.sort(np.random.default_rng(0).choice(n, 262_144, replace=False))])
    add_to(index, x)
    set_search_params(index, spec)
    return index, spec


def id_table(n: int, seed: int = 0, pages_per_doc: int = 10):
    """The id table of ``n`` pages at realistic column widths, ``pages_per_doc`` pages per document (a document's
    pages share its doc_id, source and metadata)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)

    def hexes(nbytes: int) -> list[str]:
        return [r.tobytes().hex() for r in rng.integers(0, 256, (n, nbytes), dtype=np.uint8)]

    tag = hexes(5)
    doc = [f"report-{i // pages_per_doc:09d}-{tag[i - i % pages_per_doc][:9]}.pdf" for i in range(n)]
    collections = ["finance", "legal", "hr-policies", "engineering", "sales"]
    return pa.table({
        "key": hexes(32),
        "doc_id": doc,
        "source": [f"s3://acme-documents/collections/{collections[i // pages_per_doc % 5]}/2021/q3/{d}"
                   for i, d in enumerate(doc)],
        "page": pa.array(rng.integers(0, 40, n), pa.int32()),
        "shard": [f"pages/part-{i // 4096:05d}-{t}{t[:10]}.parquet" for i, t in enumerate(tag)],
        "row": pa.array(np.arange(n) % 4096, pa.int32()),
        "file_hash": hexes(32),
        "content": hexes(32),
        "live": pa.array(rng.random(n) > 0.05),
        "metadata": [json.dumps({"collection": collections[d % 5], "tenant": f"acme-corp-{d % 9}",
                                 "year": 2000 + d % 25, "lang": "en"}) for d in (i // pages_per_doc for i in range(n))],
    })


def marginal(rows: list[dict], key: str) -> float:
    """Bytes per page between the smallest and the largest n."""
    lo, hi = min(rows, key=lambda r: r["n"]), max(rows, key=lambda r: r["n"])
    return (hi[key] - lo[key]) / (hi["n"] - lo["n"])


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--sizes", default="20000,50000", help="vectors per index (at least two: per page is marginal)")
    p.add_argument("--dims", default="128,1024", help="dimensions measured")
    p.add_argument("--compute-dims", default="128,512,1024", help="dimensions of the computed capacity")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--id-rows", default="100000,1000000", help="rows of the id table (at least two)")
    p.add_argument("--memory", default="16,64,256", help="GiB per replica, for the computed capacity")
    p.add_argument("--headroom", type=float, default=0.25, help="share of a replica's memory kept free")
    args = p.parse_args()
    import faiss

    sizes = sorted(int(s) for s in args.sizes.split(","))
    dims = [int(d) for d in args.dims.split(",")]
    types = args.types.split(",")
    began = time.perf_counter()
    report: dict = {"args": vars(args), "indexes": [], "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        report["baseline"] = loaded("baseline")
        print(f"process with the Retriever's imports: {report['baseline']['rss'] / 2**20:,.0f} MiB resident",
              flush=True)

        # the build shortcuts change no size: checked at the smallest size and dimension
        x = vectors(sizes[0], dims[0])
        for kind, what in (("hnsw", "efConstruction 200 vs 40"), ("ivf_pq", "polysemous training on vs off")):
            if kind in types:
                full, short = (len(faiss.serialize_index(build(kind, x, shortcut=s)[0])) for s in (False, True))
                report["checks"][kind] = {"what": what, "n": sizes[0], "dim": dims[0], "as_built": full,
                                          "shortcut": short, "same": full == short}
                print(f"check {kind} {what}: {full:,} vs {short:,} bytes serialized "
                      f"({'same' if full == short else 'DIFFERENT'})", flush=True)

        for dim in dims:
            for n in sizes:
                x = vectors(n, dim)
                for kind in types:
                    t = time.perf_counter()
                    index, spec = build(kind, x)
                    seconds = time.perf_counter() - t
                    path = Path(tmp) / f"{kind}-{dim}-{n}.faiss"
                    faiss.write_index(index, str(path))
                    ser = len(faiss.serialize_index(index))
                    del index
                    mem = loaded("index", str(path))
                    path.unlink()
                    row = {"type": kind, "dim": dim, "n": n, "spec": spec.as_dict(), "build_seconds": round(seconds, 1),
                           "serialized": ser, "rss": mem["grown"], "peak": mem["peak"]}
                    report["indexes"].append(row)
                    print(f"{kind:<8} dim {dim:<5} n {n:>8,}: serialized {ser / n:8.1f} B/page, loaded "
                          f"+{mem['grown']:,} B (peak +{mem['peak']:,}), built in {seconds:.1f} s", flush=True)
        per_page = {}
        for kind in types:
            for dim in dims:
                rows = [r for r in report["indexes"] if r["type"] == kind and r["dim"] == dim]
                per_page.setdefault(kind, {})[str(dim)] = {k: round(marginal(rows, k), 1)
                                                          for k in ("serialized", "rss", "peak")}
        report["per_page"] = per_page

        ids = {"rows": []}
        for n in sorted(int(s) for s in args.id_rows.split(",")):
            table = id_table(n)
            if "widths" not in ids:
                ids["widths"] = {c: round(float(np.mean([len(v) for v in table.column(c).to_pylist()[:1000]])), 1)
                                 for c in table.column_names if table.schema.field(c).type == "string"}
            path = Path(tmp) / f"ids-{n}.parquet"
            write_tables([table], str(path))  # in row groups, as a version publishes them
            row = {"n": n, "nbytes": table.nbytes, **{k: v for k, v in loaded("ids", str(path)).items()
                                                      if k in ("grown", "peak")}}
            mapped, f = loaded("mapped", str(path)), loaded("filters", str(path))
            row.update(mapped_grown=mapped["grown"], mapped_peak=mapped["peak"], filters_grown=f["grown"],
                       filters_peak=f["peak"], filters_file=f["file"])
            ids["rows"].append(row)
            print(f"id table {n:,} rows: nbytes {table.nbytes / n:.1f} B/row, read into memory +{row['grown']:,} B "
                  f"(peak +{row['peak']:,}); memory-mapped + live mask +{row['mapped_grown']:,} B (peak "
                  f"+{row['mapped_peak']:,}); PositionFields +{row['filters_grown']:,} B "
                  f"(+{row['filters_file']:,} B of mapped file pages read)", flush=True)
            del table
        ids["per_row"] = {k: round(marginal(ids["rows"], k), 1) for k in ("nbytes", "grown", "peak", "mapped_grown",
                                                                          "mapped_peak", "filters_grown",
                                                                          "filters_file")}
        report["ids"] = ids

    report["computed"] = capacity(report, [float(m) for m in args.memory.split(",")], args.headroom,
                                  [int(d) for d in args.compute_dims.split(",")])
    report["seconds"] = round(time.perf_counter() - began, 1)
    print("\nmeasured bytes per page (marginal):")
    for kind, by_dim in per_page.items():
        print(f"  {kind:<8} " + "  ".join(f"{d}-d: serialized {v['serialized']:,.0f}, loaded {v['rss']:,.0f}, "
                                           f"peak {v['peak']:,.0f}" for d, v in by_dim.items()))
    print(f"  id table: {ids['per_row']}")
    print("\nCOMPUTED (not measured) largest corpus per replica, " + report["computed"]["formula"])
    for r in report["computed"]["rows"]:
        print(f"  {r['type']:<8} {r['dim']:>5}-d{'*' if r['interpolated'] else ' '} {r['memory_gib']:>5.0f} GiB: "
              f"one generation {r['one_generation']:>13,} pages, two generations {r['two_generations']:>13,}, one "
              f"generation with filter columns {r['one_generation_with_filters']:>13,}")
    print("  (* per-page figures interpolated between the measured dimensions)")
    print(f"\ndone in {report['seconds']:.0f} s")
    common.write_json(args.json, report)
    return 0


def at_dim(by_dim: dict[str, dict], dim: int) -> tuple[dict, bool]:
    """Per-page figures at ``dim``: measured, or linearly interpolated between the two nearest measured dimensions
    (True when interpolated)."""
    if str(dim) in by_dim:
        return by_dim[str(dim)], False
    dims = sorted(int(d) for d in by_dim)
    lo = max([d for d in dims if d < dim], default=dims[0])
    hi = min([d for d in dims if d > dim], default=dims[-1])
    if lo == hi:
        lo, hi = dims[-2], dims[-1]
    w = (dim - lo) / (hi - lo)
    return {k: by_dim[str(lo)][k] + w * (by_dim[str(hi)][k] - by_dim[str(lo)][k]) for k in by_dim[str(lo)]}, True


def capacity(report: dict, memory_gib: list[float], headroom: float, dims: list[int]) -> dict:
    """The largest corpus one replica holds, COMPUTED from the measured per-page and fixed figures."""
    ids = report["ids"]["per_row"]
    base = report["baseline"]["rss"]
    # a replica maps its ids (ray_vdr.corpus.mapped): it holds the live mask, and a row group while loading
    ids_steady, ids_peak = ids["mapped_grown"], max(ids["mapped_grown"], ids["mapped_peak"])
    rows = []
    for kind, by_dim in report["per_page"].items():
        for dim in dims:
            v, interpolated = at_dim(by_dim, dim)
            steady = max(v["serialized"], v["rss"]) + ids_steady
            peak = max(v["serialized"], v["rss"], v["peak"]) + ids_peak
            for gib in memory_gib:
                usable = gib * GIB * (1 - headroom) - base
                row = {"type": kind, "dim": dim, "interpolated": interpolated, "memory_gib": gib,
                       "bytes_per_page": round(steady, 1),
                       "one_generation": int((usable - PAGE_CACHE) / peak),
                       "two_generations": int((usable - 2 * PAGE_CACHE) / (steady + peak)),
                       "one_generation_with_filters": int((usable - PAGE_CACHE) / (peak + ids["filters_grown"]))}
                rows.append(row)
    return {"headroom": headroom, "baseline_bytes": base, "page_cache_bytes": PAGE_CACHE,
            "formula": f"memory x (1 - {headroom}) - the Retriever process ({base / 2**20:,.0f} MiB, measured) - "
                       f"{PAGE_CACHE >> 20} MiB page cache per generation (PageStore's default), divided by: one "
                       "generation, the load peak per page (index + id table); two generations (live + previous), "
                       "one held (index + id table) plus one loading (its peak)",
            "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
