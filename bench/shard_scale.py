"""A sharded index against one index over the same page-like vectors, side by side in one run (not a test).

Measured, on ``--vectors`` page-like vectors at ``--dim`` (bench/synthetic_vectors.py), written as page parts of
50,000 rows (5 pages a document):

- the build: one index by one Ray task (``build_version``, as ``ray-vdr embed`` with ``index.shards: 1``) against
  ``--shards`` shards built by a Ray task each (``build_sharded``), each build driven from its own process: seconds,
  the peak resident memory of each task and of the driver above where it started (VmHWM);
- recall@10 against exact search and the in-process search time per query (one query at a time), unsharded and
  sharded (the shards asked one after another in one process: the compute the endpoint spreads over replicas);
- through the endpoint (Ray Serve, HTTP, the library's client, rerank_depth 0): p50/p99 at 1 and 8 clients, both
  applications on one cluster, requests alternating between them. The query embedder is the tiny Qwen3-VL with its
  output replaced by a random unit vector per query (a worker set-up hook: the model's compute is not what is
  measured); the fan-out's cost is endpoint p50 − in-process search p50, unsharded against sharded;
- bytes per page resident in the Retriever replicas (their processes' RSS over the pages).

Computed from bench/index_scale.py's measured bytes per page (docs/bench/results/index-scale-cpu.json), and labelled
so: the nodes (and shards, one per node) a corpus of 100M and 1B pages needs at 1024-d and at 256-d for each index
type, at ``--node-gib`` of memory per node with 20% headroom, holding two versions while a new one loads.

    python -m bench.shard_scale                        # 1M vectors at 128-d, 4 shards: ~10 min on 2 cores
    python -m bench.shard_scale --vectors 10000000     # the 10M of issue 27: ~25 GB of memory, an hour here
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common

ROOT = Path(__file__).resolve().parents[1]
PART_ROWS = 50_000
GIB = 2 ** 30

BUILD = r"""
import json, sys, time
import pyarrow as pa
import ray
from ray_vdr.config import IndexConfig
from ray_vdr.corpus.build import build_version
from ray_vdr.corpus.manifest import IndexManifest
from ray_vdr.cluster import process_memory
from ray_vdr.corpus.shards import build_sharded
from ray_vdr.corpus.versions import docs_table, live_ids, publish
from ray_vdr.models.binding import EmbedderBinding

address, out, names, dim, shards, binding = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), json.loads(sys.argv[6])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)

def one(out, names, dim):  # the unsharded build as a task, with its own peak
    start = process_memory()[0]
    fields, ids = build_version(out, names, dim, IndexConfig().model_dump(), None, 1)
    return fields, ids, start, process_memory()[1]

import pyarrow.parquet as pq
pq.read_table(out + "/pages/" + names[0])  # the libraries a build loads, in the baseline
start, began = process_memory()[0], time.perf_counter()
if shards == 1:
    fields, ids, t0, t1 = ray.get(ray.remote(max_calls=1)(one).remote(out, names, dim))
    tasks = [t1 - t0]
else:
    fields, ids = build_sharded(out, names, dim, IndexConfig(), None, 1, shards)
    tasks = [r.peak_rss_bytes - r.start_rss_bytes for r in fields["index_shards"]]
seconds = time.perf_counter() - began
files = fields.pop("files")
docs = docs_table([])
manifest = IndexManifest(model=EmbedderBinding.model_validate(binding), dim=dim, **fields, version=1, files=files)
ids = ids.append_column("live", pa.array([True] * ids.num_rows))
ids = ids.append_column("metadata", pa.nulls(ids.num_rows, "string"))
publish(out, manifest, docs, ids, None)
print(json.dumps({"seconds": round(seconds, 1), "driver_peak_bytes": process_memory()[1] - start,
                  "task_peak_bytes": tasks, "index_type": fields["index"]["type"],
                  "index_bytes": fields["index_bytes"]}))
"""


def random_queries() -> None:
    """Ray worker set-up hook: in an application whose index path has a ``/noop/`` folder, the query encoder returns a
    random unit vector per query text (seeded by the text) instead of the model's (which still loads)."""
    import hashlib

    from serving import core

    real = core.query_encoder

    def query_encoder(cfg, manifest, device):
        encoder = real(cfg, manifest, device)
        if "/noop/" in cfg.index:
            def encode(items, dim=None, batch_size=None):
                out = []
                for item in items:
                    seed = int.from_bytes(hashlib.blake2b(str(item).encode(), digest_size=8).digest(), "little")
                    v = np.random.default_rng(seed).standard_normal(dim or encoder.dim).astype(np.float32)
                    out.append(v / np.linalg.norm(v))
                return np.stack(out)

            encoder.encode_queries = encode
        return encoder

    core.query_encoder = query_encoder


def write_parts(out: Path, x: np.ndarray) -> list[str]:
    import pyarrow as pa

    from ray_vdr.storage import part_name, write_table

    names = []
    for start in range(0, len(x), PART_ROWS):
        n = min(PART_ROWS, len(x) - start)
        keys = [f"k{start + i:010d}" for i in range(n)]
        docs = [f"doc-{(start + i) // 5:09d}" for i in range(n)]
        t = pa.table({"key": keys, "content": keys, "file_hash": docs, "doc_id": docs, "source": docs,
                      "page": pa.array([(start + i) % 5 + 1 for i in range(n)], pa.int32()),
                      "row_metadata": pa.nulls(n, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[start:start + n].reshape(-1)),
                                                                    x.shape[1])})
        names.append(part_name(keys))
        write_table(t, f"{out}/pages/{names[-1]}")
    return sorted(names)


def replica_bytes(app: str) -> int:
    """Resident memory of the Retriever replicas of Serve application ``app`` on this machine."""
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:{app}:Retriever" in cmd and p.info["memory_info"] is not None:
            total += p.info["memory_info"].rss
    return total


def search_ms(index, q: np.ndarray) -> tuple[list[float], np.ndarray]:
    ms, found = [], []
    for v in q:
        began = time.perf_counter()
        hits = index.search(v[None], 10)[0]
        ms.append((time.perf_counter() - began) * 1000)
        found.append([int(h["key"][1:]) for h in hits] + [-1] * (10 - len(hits)))  # key k<i>: vector i
    return ms, np.array(found)


TIERS = [("flat", "none"), ("hnsw", "none"), ("ivf_sq8", "none"), ("ivf_pq", "none"), ("flat", "int8"),
         ("hnsw", "int8"), ("flat", "binary"), ("hnsw", "binary")]


def computed(node_gib: float) -> dict:
    """Nodes for 100M and 1B pages, COMPUTED from the measured bytes per page: bench/index_scale.py's (index types,
    the slim replica's ids and filter columns) and bench/quantization.py's (int8 and binary codes, default rescore)."""
    from bench.index_scale import at_dim

    measured = json.loads((ROOT / "docs/bench/results/index-scale-cpu.json").read_text())
    ids = measured["ids"]["per_row"]
    id_bytes = (ids["mapped_grown"] + ids["filters_grown"]) if "mapped_grown" in ids else max(ids["nbytes"],
                                                                                               ids["grown"])
    quantized: dict = {}
    qfile = ROOT / "docs/bench/results/quantization-cpu.json"
    if qfile.exists():
        for x in json.loads(qfile.read_text())["rows"]:
            if x["quantization"] != "none" and x["rescore"] == {"int8": 4, "binary": 20}[x["quantization"]]:
                b = x["resident_bytes_per_page"]
                quantized.setdefault((x["index_type"], x["quantization"]), {})[str(x["dim"])] = \
                    {"serialized": b, "rss": b}
    rows = []
    usable = node_gib * GIB * 0.8
    for pages in (100_000_000, 1_000_000_000):
        for dim in (1024, 256):
            for kind, quant in TIERS:
                by_dim = measured["per_page"][kind] if quant == "none" else quantized.get((kind, quant))
                if not by_dim:
                    continue
                v, interpolated = at_dim(by_dim, dim)
                per_page = max(v["serialized"], v["rss"]) + id_bytes
                nodes = math.ceil(2 * pages * per_page / usable)  # two versions while a new one loads
                disk = 4 * dim * math.ceil(pages / nodes) if quant != "none" else 0  # float vectors, rescoring
                rows.append({"pages": pages, "dim": dim, "type": kind, "quantization": quant,
                             "interpolated": interpolated, "bytes_per_page": round(per_page, 1),
                             "total_gib": round(pages * per_page / GIB, 1), "nodes": nodes, "shards": nodes,
                             "pages_per_shard": math.ceil(pages / nodes), "disk_gib_per_node": round(disk / GIB, 1)})
    return {"node_gib": node_gib, "headroom": 0.2, "id_bytes_per_page": id_bytes, "rows": rows,
            "formula": "nodes = ceil(2 x pages x (index + ids bytes per page) / (node memory x 0.8)); one shard "
                       "group (1 replica) per node; 2 x: the served version and the one loading beside it; ids: the "
                       "slim replica's mapped ids and filter columns; int8 and binary at their default rescore, their "
                       "float vectors on each node's local disk"}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--requests", type=int, default=200, help="per client level and application")
    p.add_argument("--node-gib", type=float, default=256.0)
    args = p.parse_args()

    from bench.synthetic_vectors import PageVectors
    from ray_vdr.models.builders import build_qwen3vl_embedder

    report: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="shard-scale-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        gen = PageVectors(args.vectors, args.dim, seed=0)
        x = gen.pages()
        q = gen.queries(args.queries)
        truth = common.exact_top(x, q, None)
        outs = {"one": root / "noop" / "one", "sharded": root / "noop" / "sharded"}
        names = write_parts(outs["one"], x)
        (outs["sharded"] / "pages").mkdir(parents=True)
        for n in names:
            (outs["sharded"] / "pages" / n).hardlink_to(outs["one"] / "pages" / n)
        del x
        print(f"{args.vectors:,} vectors at {args.dim}-d in {len(names)} parts ({time.perf_counter() - t0:.0f}s)",
              flush=True)
        model = build_qwen3vl_embedder(root / "model", max_pixels=64 * 64)
        binding = _binding(model)
        with common.local_ray(2, log_to_driver=False,
                              runtime_env={"worker_process_setup_hook": random_queries}):
            import ray
            from ray import serve

            address = ray.get_runtime_context().gcs_address
            report["build"] = {}
            for name, shards in (("one", 1), ("sharded", args.shards)):
                out = subprocess.run([sys.executable, "-c", BUILD, address, str(outs[name]), json.dumps(names),
                                      str(args.dim), str(shards), json.dumps(binding)], cwd=ROOT,
                                     capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                report["build"][name] = json.loads(out.stdout.strip().splitlines()[-1])
                print(name, report["build"][name], flush=True)

            from ray_vdr.corpus.store import open_index

            report["search"] = {}
            for name in outs:
                index = open_index(str(outs[name]))
                ms, found = search_ms(index, q)
                recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
                report["search"][name] = {"recall_at_10": round(recall, 4), **common.p50_p99(ms[5:])}
                del index
            print(report["search"], flush=True)

            port = common.free_port()
            apps = {name: common.deploy_app(port, name, outs[name], index_poll_s=60,
                                            retriever={"num_cpus": 0.2, "max_batch_size": 8,
                                                       "max_ongoing_requests": 16, "target_ongoing_requests": 4,
                                                       "min_replicas": 1, "max_replicas": 1},
                                            embedder={"num_cpus": 0.2, "min_replicas": 1, "max_replicas": 1},
                                            ingress={"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1})
                    for name in outs}
            texts = [f"query {i}" for i in range(args.queries)]
            report["endpoint"] = {}
            for clients in (1, 8):
                replies, wall = common.closed_loop(apps, texts, clients=clients, requests=args.requests,
                                                   rerank_depth=0, strict=True)
                report["endpoint"][str(clients)] = {
                    name: {**common.p50_p99([r.ms for r in rs[5:]]), "requests": len(rs),
                           "qps": round(len(rs) / wall, 1)} for name, rs in replies.items()}
                print(clients, report["endpoint"][str(clients)], flush=True)
            report["resident"] = {name: {"retriever_bytes": replica_bytes(name),
                                         "bytes_per_page": round(replica_bytes(name) / args.vectors, 1)}
                                  for name in outs}
            serve.shutdown()
    one, sharded = report["endpoint"]["1"]["one"], report["endpoint"]["1"]["sharded"]
    report["fan_out_ms"] = {
        "one": round(one["p50_ms"] - report["search"]["one"]["p50_ms"], 2),
        "sharded": round(sharded["p50_ms"] - report["search"]["sharded"]["p50_ms"], 2)}
    report["fan_out_goal_met"] = report["fan_out_ms"]["sharded"] <= report["fan_out_ms"]["one"] + 5
    report["computed"] = computed(args.node_gib)
    print(json.dumps({k: report[k] for k in ("fan_out_ms", "fan_out_goal_met", "resident")}))
    common.write_json(args.json, report)


def _binding(model: Path) -> dict:
    """The tiny embedder's binding, as the embedding job records it (so the endpoint accepts the index)."""
    from ray_vdr.config import load_config
    from ray_vdr.corpus.embed import index_binding

    cfg = load_config(ROOT / "configs/demo.yaml", [f"index.model={model}", "synthetic=null"])
    return index_binding(cfg, str(model)).model_dump(mode="json")


def render(r: dict) -> list[str]:
    """The results as docs/benchmarks.md shows them (bench/report.py)."""
    a, b, s = r["args"], r["build"], r["search"]
    comp = computed(r["computed"]["node_gib"])
    mib = 2 ** 20
    out = [f"{a['vectors']:,} page-like vectors at {a['dim']}-d, one index against {a['shards']} shards (index type "
           f"{b['one']['index_type']}, `auto`), on a local Ray cluster of 2 CPUs.", "",
           "| | one index | sharded |", "|---|---|---|",
           f"| build seconds | {b['one']['seconds']} | {b['sharded']['seconds']} |",
           f"| peak memory per build task above its start (MiB) | {b['one']['task_peak_bytes'][0] / mib:,.0f} | "
           f"{max(b['sharded']['task_peak_bytes']) / mib:,.0f} (largest of {a['shards']}) |",
           f"| peak memory of the driver above its start (MiB) | {b['one']['driver_peak_bytes'] / mib:,.0f} | "
           f"{b['sharded']['driver_peak_bytes'] / mib:,.0f} |",
           f"| recall@10 against exact search | {s['one']['recall_at_10']} | {s['sharded']['recall_at_10']} |",
           f"| in-process search p50 / p99 (ms) | {s['one']['p50_ms']:.2f} / {s['one']['p99_ms']:.2f} | "
           f"{s['sharded']['p50_ms']:.2f} / {s['sharded']['p99_ms']:.2f} |"]
    for clients, e in r["endpoint"].items():
        out.append(f"| endpoint p50 / p99 (ms) at {clients} client{'s' if clients != '1' else ''} | "
                   f"{e['one']['p50_ms']:.1f} / {e['one']['p99_ms']:.1f} | {e['sharded']['p50_ms']:.1f} / "
                   f"{e['sharded']['p99_ms']:.1f} |")
    out += [f"| endpoint p50 − in-process p50 at 1 client (ms) | {r['fan_out_ms']['one']} | "
            f"{r['fan_out_ms']['sharded']} (goal ≤ one + 5: {'met' if r['fan_out_goal_met'] else 'NOT met'}) |",
            f"| Retriever replicas resident, bytes per page | {r['resident']['one']['bytes_per_page']:,} | "
            f"{r['resident']['sharded']['bytes_per_page']:,} |", "",
            f"Computed (not measured; at render time, from the latest bench/index_scale.py and bench/quantization.py "
            f"results): {comp['formula']}; {comp['node_gib']:.0f} GiB nodes; ids {comp['id_bytes_per_page']:,} B/page.",
            "", "| pages | dim | index | quantization | bytes/page (index + ids) | total GiB | nodes = shards | "
            "local disk per node (GiB) |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {x['pages']:,} | {x['dim']}{' (interpolated)' if x['interpolated'] else ''} | {x['type']} | "
            f"{x.get('quantization', 'none')} | {x['bytes_per_page']:,} | {x['total_gib']:,} | {x['nodes']:,} | "
            f"{x.get('disk_gib_per_node', 0):,} |" for x in comp["rows"]]
    return out


if __name__ == "__main__":
    main()
