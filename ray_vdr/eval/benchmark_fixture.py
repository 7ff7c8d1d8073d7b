"""A tiny benchmark task in the published layouts, made from an eval split of ray-vdr's own (the demo's synthetic
pages): for trying ``ray-vdr benchmark`` without the hub, and for the tests. Not a leaderboard dataset.

    python -m ray_vdr.eval.benchmark_fixture EVAL_SPLIT OUT [--layout beir|v3|single]

- ``beir``: ViDoRe V1/V2's BEIR copies: ``corpus`` (``corpus-id``, ``image``), ``queries`` (``query-id``,
  ``query``), ``qrels`` (``query-id``, ``corpus-id``, integer ``score``);
- ``v3``: ViDoRe V3's raw spelling (``corpus_id``, ``query_id``), a ``language`` column and graded scores;
- ``single``: ViDoRe V1's single table (``query``, ``image``, ``image_filename``), a row per query and its page.

Each eval row's page is relevant (score 2 where graded); its first hard negative is judged partly relevant
(score 1) in ``v3``, so graded NDCG differs from binary. ``bad_images`` adds corpus rows whose bytes are no image.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["write_fixture"]

LANGUAGES = ("english", "french")


def _bytes(cell) -> bytes:
    return cell["bytes"] if isinstance(cell, dict) else cell


def write_fixture(eval_split: str | Path, out: str | Path, layout: str = "beir", *, bad_images: int = 0,
                  languages: tuple[str, ...] = LANGUAGES, split: str = "test") -> dict[str, int]:
    """Write the task under ``out``; returns its counts (queries, corpus, qrels)."""
    t = pq.read_table(eval_split)
    negatives = sorted(c for c in t.column_names if c.startswith("negative_"))
    rows = t.select(["query", "image", *negatives]).to_pylist()
    pages: dict[bytes, str] = {}
    for r in rows:
        for col in ("image", *negatives):
            data = _bytes(r[col])
            pages.setdefault(data, f"{len(pages):04d}-{hashlib.blake2b(data, digest_size=4).hexdigest()}")
    out = Path(out)
    if layout == "single":
        names = {data: f"page_{pid}.png" for data, pid in pages.items()}
        table = pa.table({"query": [r["query"] for r in rows] + [None] * len(pages),
                          "image": [{"bytes": _bytes(r["image"]), "path": None} for r in rows]
                          + [{"bytes": d, "path": None} for d in pages],
                          "image_filename": [names[_bytes(r["image"])] for r in rows] + list(names.values())})
        (out / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "data" / f"{split}-00000-of-00001.parquet")
        return {"queries": len(rows), "corpus": len(pages), "qrels": len(rows)}
    v3 = layout == "v3"
    cid, qid = ("corpus_id", "query_id") if v3 else ("corpus-id", "query-id")
    corpus_ids = [int(p.split("-")[0]) for p in pages.values()]
    images = [{"bytes": d, "path": None} for d in pages]
    for i in range(bad_images):
        corpus_ids.append(len(corpus_ids))
        images.append({"bytes": b"this is not an image %d" % i, "path": None})
    queries = {qid: list(range(len(rows))), "query": [r["query"] for r in rows]}
    if v3:
        queries["language"] = [languages[i % len(languages)] for i in range(len(rows))]
    qrels = {qid: [], cid: [], "score": []}
    for i, r in enumerate(rows):
        judged = [(r["image"], 2 if v3 else 1)] + ([(r[negatives[0]], 1)] if v3 and negatives else [])
        for cell, score in judged:
            qrels[qid].append(i)
            qrels[cid].append(int(pages[_bytes(cell)].split("-")[0]))
            qrels["score"].append(score)
    for config, table in (("corpus", pa.table({cid: corpus_ids, "image": images})), ("queries", pa.table(queries)),
                          ("qrels", pa.table(qrels))):
        (out / config).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / config / f"{split}-00000-of-00001.parquet")
    return {"queries": len(rows), "corpus": len(corpus_ids), "qrels": len(qrels["score"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_split", help="an eval split in ray-vdr's triplet layout (e.g. the demo's data/eval)")
    p.add_argument("out", help="folder to write the task to")
    p.add_argument("--layout", choices=["beir", "v3", "single"], default="beir")
    args = p.parse_args(argv)
    print(f"{args.layout} task in {args.out}: {write_fixture(args.eval_split, args.out, args.layout)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
