"""Training data from unlabeled PDFs: pages/s and queries/s of the ``text`` generator, the make-training-data job
against a plain single-process loop over the same PDFs, side by side in one run.

    python -m bench.querygen_throughput                  # 100 synthetic reports x 5 pages (vector PDFs), CPU
    python -m bench.querygen_throughput --docs ./my-pdfs # your own folder of PDFs

- plain: one process opens each PDF with pypdfium2, reads each page's text layer, takes the spans
  (ray_vdr/queries/text.py) and the length filter: the generator's own work, nothing else.
- job: ``ray-vdr make-training-data`` on a local Ray cluster (the tiny random-weight base embedder): its generation
  stage (Ray Data tasks over the corpus index's pages, the filters, one published part per batch), and the whole
  job (pages rasterised and indexed by the base embedder, boilerplate, duplicates, consistency and negatives).

The ``vlm`` generator needs a GPU for figures worth having; on a GPU cluster run, for example,
``ray-vdr make-training-data -c configs/qwen3vl-2b-vdr.yaml 'queries.sources=[…]' queries.generator=vlm
scaling.use_gpu=true`` and read its card's "Time" table (pages/s and queries/s of the generation stage).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def plain(pdfs: list[Path], per_page: int) -> dict:
    """The text generator's own work in one process: text layer → spans → length filter."""
    import pypdfium2 as pdfium

    from ray_vdr.queries.filters import length_problem
    from ray_vdr.queries.text import text_queries

    start, pages, queries = time.perf_counter(), 0, 0
    for path in pdfs:
        doc = pdfium.PdfDocument(str(path))
        try:
            for i, page in enumerate(doc):
                textpage = page.get_textpage()
                text = textpage.get_text_range()
                textpage.close()
                spans = text_queries(text, n=per_page, seed=f"{path.name}:{i}")
                queries += sum(length_problem(q, min_words=3, max_words=40, max_chars=300) is None for q, _ in spans)
                pages += 1
        finally:
            doc.close()
    seconds = time.perf_counter() - start
    return {"pages": pages, "queries": queries, "seconds": round(seconds, 2), "pages_per_s": round(pages / seconds, 1),
            "queries_per_s": round(queries / seconds, 1)}


def job(docs: Path, work: Path, per_page: int) -> dict:
    """make-training-data on a private local Ray cluster (2 logical CPUs per core here)."""
    from ray_vdr.cluster import init_ray
    from ray_vdr.config import load_config
    from ray_vdr.queries.run import run

    init_ray(temp_dir=None)
    cfg = load_config(common.ROOT / "configs/demo-own-docs.yaml", [
        f"queries.sources=[{docs}]", f"queries.output={work}/made", f"model.name_or_path={work}/model",
        f"queries.per_page={per_page}", "queries.consistency_k=null", "synthetic=null", f"run.storage_path={work}"])
    s = run(cfg).summary
    return {"pages": s["pages"]["in"], "queries": s["queries"]["generated"], "seconds": s["seconds"],
            "generation_pages_per_s": s["rates"]["pages_per_second"],
            "generation_queries_per_s": s["rates"]["queries_per_second"],
            "whole_job_pages_per_s": round(s["pages"]["in"] / s["seconds"]["total"], 1)}


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--docs", default=None, help="a folder of PDFs (default: synthetic reports)")
    p.add_argument("--n-docs", type=int, default=100, help="synthetic reports (5 pages each)")
    p.add_argument("--per-page", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = Path(args.docs) if args.docs else None
        if docs is None:
            from ray_vdr.config import SyntheticConfig
            from ray_vdr.data.documents import write_documents

            write_documents(SyntheticConfig(output_dir=str(work / "syn"), kind="documents", documents=args.n_docs,
                                            heldout_documents=2, pages_per_document=5))
            docs = work / "syn" / "documents"
        pdfs = sorted(docs.rglob("*.pdf"))
        report = {"args": vars(args), "pdfs": len(pdfs), "plain": plain(pdfs, args.per_page),
                  "job": job(docs, work, args.per_page)}
    report["generation_ratio"] = round(report["job"]["generation_pages_per_s"] / report["plain"]["pages_per_s"], 3)
    print(json.dumps(report, indent=2))
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
