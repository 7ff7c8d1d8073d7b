"""What a sync of a living index costs when little or nothing changed: the source bytes it reads and its time, by
default (a source whose size and modification time are unchanged is not read) against ``index.rehash: true`` (every
source read and hashed, as every sync did before stamps), measured side by side in one run on one corpus.

The corpus: ``--documents`` PDFs of ``--pages`` synthetic pages each, embedded once by the tiny Qwen3-VL embedder on a
local Ray cluster. Then, in this order: a resync of the unchanged corpus (default), the same with rehash, and a resync
after ``--touched`` of the files got a new modification time with the same bytes (read, hashed, kept). Local files
come from the page cache here, so the seconds understate what reading costs on object storage or a network
filesystem; the bytes do not.

    python -m bench.sync_cost                       # 40 documents x 5 pages, ~2 min on 2 cores
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

from bench.common import local_ray, parser, synthetic_pages, write_json

ROOT = Path(__file__).resolve().parents[1]


def _pdf(pngs: list[bytes]) -> bytes:
    from PIL import Image

    pages = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=100.0)
    return buf.getvalue()


def _sync(model: Path, docs: Path, out: Path, *extra: str) -> dict:
    from ray_vdr.config import load_config
    from ray_vdr.corpus.embed import run

    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"index.model={model}", f"index.sources=[{docs}]", f"index.output={out}", "index.batch_size=8",
        "index.dim=32", "index.decode_cpus=0.5", "synthetic=null", *extra])
    began = time.perf_counter()
    s = run(cfg).summary
    return {"seconds": round(time.perf_counter() - began, 2), "sources_read": s.sources_read,
            "source_bytes_read": s.source_bytes_read, "pages_embedded": s.pages_embedded,
            "documents": s.documents, "version": s.version}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--documents", type=int, default=40)
    p.add_argument("--pages", type=int, default=5, help="pages per document")
    p.add_argument("--touched", type=float, default=0.1, help="share of the files touched before the last resync")
    args = p.parse_args()

    from ray_vdr.models.builders import build_qwen3vl_embedder

    with tempfile.TemporaryDirectory(prefix="sync-cost-") as tmp:
        root = Path(tmp)
        model = build_qwen3vl_embedder(root / "model", max_pixels=64 * 64)
        docs, out = root / "docs", root / "index"
        docs.mkdir()
        pngs = [png for _, png in synthetic_pages(args.documents * args.pages)]
        for d in range(args.documents):
            (docs / f"report-{d:04d}.pdf").write_bytes(_pdf(pngs[d * args.pages:(d + 1) * args.pages]))
        corpus_bytes = sum(f.stat().st_size for f in docs.iterdir())
        print(f"corpus: {args.documents} PDFs x {args.pages} pages, {corpus_bytes:,} bytes", flush=True)
        with local_ray():
            runs = {"first sync (embeds everything)": _sync(model, docs, out)}
            runs["resync, nothing changed"] = _sync(model, docs, out)
            runs["resync, nothing changed, index.rehash"] = _sync(model, docs, out, "index.rehash=true")
            touched = sorted(docs.iterdir())[: max(1, round(args.touched * args.documents))]
            for f in touched:
                st = f.stat()
                os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            runs[f"resync, {len(touched)} files touched (same bytes)"] = _sync(model, docs, out)
    print(f"{'sync':<45} {'seconds':>8} {'sources read':>13} {'bytes read':>13} {'pages embedded':>15}")
    for name, r in runs.items():
        print(f"{name:<45} {r['seconds']:>8.2f} {r['sources_read']:>13} {r['source_bytes_read']:>13,} "
              f"{r['pages_embedded']:>15}")
    plain, rehash = runs["resync, nothing changed"], runs["resync, nothing changed, index.rehash"]
    print(f"unchanged resync: {rehash['source_bytes_read']:,} -> {plain['source_bytes_read']:,} bytes read, "
          f"{rehash['seconds']:.2f} -> {plain['seconds']:.2f} s")
    write_json(args.json, {"args": vars(args), "corpus_bytes": corpus_bytes, "runs": runs})


def render(r: dict) -> list[str]:
    """The results as docs/benchmarks.md shows them (bench/report.py)."""
    a = r["args"]
    out = [f"{a['documents']} PDFs x {a['pages']} synthetic pages ({r['corpus_bytes']:,} bytes), the tiny embedder, "
           "local files (page cache: the seconds understate remote storage; the bytes do not).", "",
           "| sync | seconds | sources read | source bytes read | pages embedded |", "|---|---|---|---|---|"]
    out += [f"| {name} | {x['seconds']:.2f} | {x['sources_read']} | {x['source_bytes_read']:,} | "
            f"{x['pages_embedded']} |" for name, x in r["runs"].items()]
    return out


if __name__ == "__main__":
    main()
