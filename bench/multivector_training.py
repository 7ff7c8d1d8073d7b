"""Single-vector vs multi-vector page embedders trained on the same data and budget: retrieval quality, bytes per page
and query latency on the demo's eval split (40 queries, 200 pages).

Both start from the tiny Qwen3-VL embedder (random weights, configs/demo.yaml's builder) and train on the demo's
synthetic pages for ``--epochs`` on Ray Train (2 workers, DDP), each with its config: configs/demo.yaml (one vector
per page, cosine) and configs/demo-colvdr.yaml (a 64-d vector per token and image patch, MaxSim). Each is evaluated
at the dimension it saves (``output.truncate_dim``) before and after training, as the index would hold it: NDCG@10,
recall@10, the mean rank of each question's own page among the 200 (less noisy than NDCG@10 on 40 queries), the
vectors per page and their bytes at fp16, and the time of one query (encode, score every page exhaustively, sort) on
one thread.

Then the same 200 pages through the real embedding job (a local Ray cluster) into the indexes the endpoint would
serve, each searched through ``open_index(...).search`` with queries encoded as the endpoint encodes them (one query
at a time, one thread, encoding included): the single-vector model's flat index, and the multi-vector model's
(``index.late``) at pooling 1 and 2, token vectors in fp16, int8 and binary, with every page a MaxSim candidate and
with the FDE first stage handing 40 of the 200 on; and the tiny reranker (trained here on the same synthetic
triplets, from the finetuned single-vector embedder as configs/demo.yaml builds it) over each kind's top 10. Bytes
per page: on disk (the FAISS file and the stored token vectors) and resident (the FAISS index and the token store).

    python -m bench.multivector_training                 # 1024 rows x 2 epochs each, the indexes: ~7 min on 2 cores
    python -m bench.multivector_training --epochs 0.5    # a smoke run
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench.common import p50_p99, parser, timed, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"single-vector": "configs/demo.yaml", "multi-vector": "configs/demo-colvdr.yaml"}
# the indexes measured: (kind, index.late overrides); candidates 200 = every page is rescored by MaxSim
INDEXES = [("single-vector", {}),
           ("multi-vector", {"pooling": 1, "storage": "fp16", "candidates": 200}),
           ("multi-vector", {"pooling": 1, "storage": "fp16", "candidates": 40}),
           ("multi-vector", {"pooling": 2, "storage": "fp16", "candidates": 200}),
           ("multi-vector", {"pooling": 1, "storage": "int8", "candidates": 200}),
           ("multi-vector", {"pooling": 1, "storage": "binary", "candidates": 200})]
FDE = {"k_sim": 4, "d_proj": 8, "reps": 10}  # 1,280-d: the 32-d tokens of the tiny model (16 would be the default)


def measure(cfg, model_uri: str, eval_uri: str) -> dict:
    """Quality, size and one-query latency of the model at ``model_uri`` on the eval split (see the module)."""
    import pyarrow.parquet as pq
    import torch

    from ray_vdr.data.triplets import TripletSpec, validate_batch
    from ray_vdr.eval.matryoshka import eval_set_from_table, truncated
    from ray_vdr.eval.metrics import mean_metrics, ranking_metrics
    from ray_vdr.models.load import build_model
    from ray_vdr.models.multivector import maxsim_scores

    torch.set_num_threads(1)
    spec = TripletSpec.from_config(cfg.data, split="eval")
    es = eval_set_from_table(validate_batch(pq.read_table(eval_uri), spec)[0])
    model = build_model(cfg.model.model_copy(update={"name_or_path": model_uri, "builder": "load"}), "cpu")
    dim, multi = cfg.output.truncate_dim, cfg.model.kind == "multi_vector"
    qids, cids = list(es.queries), list(es.corpus)
    pages = model.encode_document([es.corpus[i] for i in cids], batch_size=16)

    def search(query: str) -> np.ndarray:
        q = model.encode_query([query])
        if multi:
            return np.argsort(-maxsim_scores(q, pages, dim)[0])
        q, c = truncated(np.asarray(q, np.float32), dim), truncated(np.asarray(pages, np.float32), dim)
        return np.argsort(-(q @ c.T)[0])

    rows, ranks, ms = [], [], []
    for qid in qids:
        order, took = timed(search, es.queries[qid])
        ms.append(took)
        rows.append(ranking_metrics([cids[j] for j in order[:10]], es.relevant[qid], ks=(10,)))
        ranks.append(int(np.flatnonzero(order == cids.index(next(iter(es.relevant[qid]))))[0]) + 1)
    vectors = float(np.mean([len(p) for p in pages])) if multi else 1.0
    means = mean_metrics(rows)
    return {"ndcg_at_10": round(means["ndcg@10"], 4), "recall_at_10": round(means["recall@10"], 4),
            "mean_rank": round(float(np.mean(ranks)), 1), "dim": dim, "vectors_per_page": round(vectors, 1),
            "bytes_per_page_fp16": round(vectors * dim * 2), **p50_p99(ms)}


def write_pages(es, path: Path) -> None:
    """The eval corpus as one Parquet source of the embedding job (doc_id = the page's id, PNG bytes)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"doc_id": list(es.corpus), "image": [png(i) for i in es.corpus.values()]}), path)


def index_row(cfg, es, model_uri: str, out: Path, late: dict, reranker) -> dict:
    """Embed the eval pages into an index with ``late`` settings and measure it (see the module)."""
    import faiss
    import torch

    from ray_vdr.corpus.embed import run as embed
    from ray_vdr.corpus.store import open_index
    from ray_vdr.eval.metrics import mean_metrics, ranking_metrics
    from ray_vdr.models.encoder import IndexEncoder
    from ray_vdr.models.load import Runtime

    cfg = cfg.model_copy(update={"index": cfg.index.model_copy(update={
        "model": model_uri, "sources": [str(out.parent / "pages")], "output": str(out), "parquet_id_column": "doc_id",
        "batch_size": 16, "late": cfg.index.late.model_copy(update={**FDE, **late})})})
    manifest = embed(cfg).manifest
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    index = open_index(str(out))
    encoder = IndexEncoder(manifest.model, Runtime(cfg.model.dtype, cfg.model.attn_implementation, "cpu"))
    rows, reranked, ms, rerank_ms = [], [], [], []
    for qid, query in es.queries.items():
        hits, took = timed(lambda q=query: index.search(encoder.encode_queries([q]), 10)[0])
        ms.append(took)
        ids = [h["doc_id"] for h in hits]
        rows.append(ranking_metrics(ids, es.relevant[qid], ks=(10,)))
        scores, took = timed(reranker.predict, [(query, es.corpus[d]) for d in ids], convert_to_numpy=True)
        rerank_ms.append(took)
        reranked.append(ranking_metrics([ids[i] for i in np.argsort(-scores, kind="stable")], es.relevant[qid],
                                        ks=(10,)))
    pages = manifest.live
    tokens = index.tokens.nbytes if index.tokens is not None else 0
    means = mean_metrics(rows)
    return {"ndcg_at_10": round(means["ndcg@10"], 4), "recall_at_10": round(means["recall@10"], 4),
            "rerank_ndcg_at_10": round(mean_metrics(reranked)["ndcg@10"], 4),
            "disk_bytes_per_page": round((manifest.index_bytes + tokens) / pages),
            "resident_bytes_per_page": round((faiss.serialize_index(index.index).nbytes + tokens) / pages),
            "vector_dim": manifest.vector_dim, **p50_p99(ms), **p50_p99([a + b for a, b in zip(ms, rerank_ms,
                                                                                              strict=True)],
                                                                        "rerank_")}


def measure_indexes(out: Path, data: Path, models: dict[str, tuple]) -> list[dict]:
    """Train the demo's tiny reranker on the same triplets, then embed and measure every index of INDEXES."""
    import pyarrow.parquet as pq
    from sentence_transformers import CrossEncoder

    from ray_vdr.data.triplets import TripletSpec, validate_batch
    from ray_vdr.eval.matryoshka import eval_set_from_table
    from ray_vdr.train.reranker import run

    single_cfg, _ = models["single-vector"]  # the reranker builds on its finetuned model (run.name single-vector)
    rcfg = single_cfg.model_copy(update={"reranker": single_cfg.reranker.model_copy(update={
        "data": single_cfg.data.train, "num_negatives": 1,
        "model": single_cfg.reranker.model.model_copy(update={"name_or_path": str(out / "reranker-base")})})})
    reranker = CrossEncoder(run(rcfg).model_uri, device="cpu")
    es = eval_set_from_table(validate_batch(pq.read_table(f"{data}/eval"),
                                            TripletSpec.from_config(single_cfg.data, split="eval"))[0])
    write_pages(es, out / "indexes" / "pages" / "pages.parquet")
    rows = []
    for i, (kind, late) in enumerate(INDEXES):
        cfg, uri = models[kind]
        got = index_row(cfg, es, uri, out / "indexes" / f"index-{i}", late, reranker)
        rows.append({"model": kind, "late": late if kind == "multi-vector" else None, **got})
        print(f"{kind} {late}: NDCG@10 {got['ndcg_at_10']:.3f} (+ reranker {got['rerank_ndcg_at_10']:.3f}), "
              f"{got['disk_bytes_per_page']:,} B/page on disk, {got['resident_bytes_per_page']:,} resident, "
              f"p50 {got['p50_ms']:.1f} ms", flush=True)
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--rows", type=int, default=1024, help="training rows (the demo's)")
    p.add_argument("--out", default=None, help="data, models and runs (default: a temporary folder)")
    args = p.parse_args()

    from ray_vdr.config import SyntheticConfig, load_config
    from ray_vdr.data.synthetic import write_synthetic
    from ray_vdr.train.run import run

    out = Path(args.out or tempfile.mkdtemp(prefix="mv-training-"))
    data = out / "data"
    if not (data / "summary.json").is_file():
        write_synthetic(SyntheticConfig(output_dir=str(data), train_queries=args.rows, eval_queries=40, seed=0,
                                        jsonl=False))
    rows, models = [], {}
    for name, config in CONFIGS.items():
        cfg = load_config(ROOT / config, [f"data.train.uri={data}/train", f"data.eval.uri={data}/eval",
                                          f"model.name_or_path={out}/base", f"run.storage_path={out}/runs",
                                          f"run.name={name}", f"train.epochs={args.epochs}"])
        result = run(cfg)
        models[name] = (cfg, result.model_uri)
        before, after = measure(cfg, str(out / "base"), f"{data}/eval"), measure(cfg, result.model_uri, f"{data}/eval")
        rows.append({"model": name, "config": config, "steps": result.metrics["step"],
                     "train_seconds": round(result.metrics["train_seconds"], 1), "base": before, "finetuned": after})
        print(f"{name}: NDCG@10 {before['ndcg_at_10']:.3f} -> {after['ndcg_at_10']:.3f}, mean rank "
              f"{before['mean_rank']} -> {after['mean_rank']}, {after['bytes_per_page_fp16']} B/page, "
              f"p50 {after['p50_ms']:.1f} ms", flush=True)
    indexes = measure_indexes(out, data, models)
    write_json(args.json, {"args": vars(args), "rows": rows, "indexes": indexes,
                           "sizes": {"train_rows": args.rows, "eval_queries": 40, "eval_pages": 200}})


def render(r: dict) -> list[str]:
    """The results as a Markdown block, in the form bench/report.py shows the others."""
    s = r["sizes"]
    out = [f"The tiny Qwen3-VL trained on the demo's {s['train_rows']} synthetic training rows for "
           f"{r['args']['epochs']:g} epochs (2 workers, DDP), each kind with its config; evaluated on "
           f"{s['eval_queries']} held-out queries over {s['eval_pages']} pages at the dimension it saves, scoring "
           "every page; one query at a time on one thread (encoding included).", "",
           "| model | dim | steps | NDCG@10 base → finetuned | recall@10 | own page's mean rank | vectors/page | "
           "fp16 B/page | p50 ms | p99 ms |", "|---" * 10 + "|"]
    for x in r["rows"]:
        b, a = x["base"], x["finetuned"]
        out.append(f"| {x['model']} | {a['dim']} | {x['steps']} | {b['ndcg_at_10']:.3f} → {a['ndcg_at_10']:.3f} | "
                   f"{a['recall_at_10']:.3f} | {b['mean_rank']} → {a['mean_rank']} | {a['vectors_per_page']:g} | "
                   f"{a['bytes_per_page_fp16']:,} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} |")
    if not r.get("indexes"):
        return out
    out += ["", "The finetuned models' indexes, built by the embedding job from the same 200 pages and searched "
            "through the index as the endpoint does (one query at a time, one thread, encoding included); the reranker "
            "(the demo's tiny one, trained here) over each top 10:", "",
            "| model | pooling | storage | candidates | NDCG@10 | recall@10 | + reranker NDCG@10 | "
            "B/page on disk | B/page resident | p50 ms | + reranker p50 ms |", "|---" * 11 + "|"]
    for x in r["indexes"]:
        late = x["late"] or {}
        out.append(f"| {x['model']} | {late.get('pooling', '-')} | {late.get('storage', 'fp32')} | "
                   f"{late.get('candidates', 'all')} | {x['ndcg_at_10']:.3f} | {x['recall_at_10']:.3f} | "
                   f"{x['rerank_ndcg_at_10']:.3f} | {x['disk_bytes_per_page']:,} | {x['resident_bytes_per_page']:,} | "
                   f"{x['p50_ms']:.1f} | {x['rerank_p50_ms']:.1f} |")
    return out


if __name__ == "__main__":
    main()
