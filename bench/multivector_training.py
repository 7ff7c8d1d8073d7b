"""Single-vector vs multi-vector page embedders trained on the same data and budget: retrieval quality, bytes per page
and query latency on the demo's eval split (40 queries, 200 pages).

Both start from the tiny Qwen3-VL embedder (random weights, configs/demo.yaml's builder) and train on the demo's
synthetic pages for ``--epochs`` on Ray Train (2 workers, DDP), each with its config: configs/demo.yaml (one vector
per page, cosine) and configs/demo-colvdr.yaml (a 64-d vector per token and image patch, MaxSim). Each is evaluated
at the dimension it saves (``output.truncate_dim``) before and after training, as the index would hold it: NDCG@10,
recall@10, the mean rank of each question's own page among the 200 (less noisy than NDCG@10 on 40 queries), the
vectors per page and their bytes at fp16, and the time of one query (encode, score every page exhaustively, sort) on
one thread. Not measured here: the reranker after either (the index and the endpoint hold single-vector models only).

    python -m bench.multivector_training                 # 1024 rows x 2 epochs each, ~5 min on 2 cores
    python -m bench.multivector_training --epochs 0.5    # a smoke run
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench.common import p50_p99, parser, timed, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"single-vector": "configs/demo.yaml", "multi-vector": "configs/demo-colvdr.yaml"}


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
    rows = []
    for name, config in CONFIGS.items():
        cfg = load_config(ROOT / config, [f"data.train.uri={data}/train", f"data.eval.uri={data}/eval",
                                          f"model.name_or_path={out}/base", f"run.storage_path={out}/runs",
                                          f"run.name={name}", f"train.epochs={args.epochs}"])
        result = run(cfg)
        before, after = measure(cfg, str(out / "base"), f"{data}/eval"), measure(cfg, result.model_uri, f"{data}/eval")
        rows.append({"model": name, "config": config, "steps": result.metrics["step"],
                     "train_seconds": round(result.metrics["train_seconds"], 1), "base": before, "finetuned": after})
        print(f"{name}: NDCG@10 {before['ndcg_at_10']:.3f} -> {after['ndcg_at_10']:.3f}, mean rank "
              f"{before['mean_rank']} -> {after['mean_rank']}, {after['bytes_per_page_fp16']} B/page, "
              f"p50 {after['p50_ms']:.1f} ms", flush=True)
    write_json(args.json, {"args": vars(args), "rows": rows,
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
    return out


if __name__ == "__main__":
    main()
