"""Synthetic unlabeled documents for the own-documents loop: company reports as vector PDFs with a real text layer,
and a held-out labelled eval split made from other documents' pages.

A document is one company's annual reports: ``pages_per_document`` pages, each about another year and drawn with
one of the page templates (results table, bar or line chart, memo, segment report) from the same facts as the
synthetic page images (:mod:`ray_vdr.data.facts`). Every word is real PDF text (matplotlib's Type 3 fonts, with
their Unicode map), so a PDF text extractor (pypdfium2) reads the title, the table rows and the figures. Files carry
no creation date: the same seed writes the same bytes, so page keys (content hashes) are stable across runs.

Output under ``output_dir``::

    documents/<company>.pdf        the unlabeled documents (`ray-vdr make-training-data` turns them into triplets)
    heldout/documents/<company>.pdf  other companies' documents, never given to the query generator
    heldout/eval/part-*.parquet    their template questions ("What was X's Q3 2021 revenue?"), each with its page and
                                   ``eval_negatives`` look-alike pages, rasterised at ``dpi`` as the corpus job does
    summary.json
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from ray_vdr.config import SyntheticConfig
from ray_vdr.data.facts import (
    MONTHS,
    PALETTES,
    PREFIXES,
    QUARTERS,
    SUFFIXES,
    TEMPLATES,
    YEAR_COLOURS,
    YEARS,
    Page,
    make_queries,
    page_facts,
)
from ray_vdr.data.render import map_in_processes

__all__ = ["DocumentsSummary", "plan_documents", "write_documents"]


class DocumentsSummary(BaseModel):
    """What ``ray-vdr make-data`` wrote with ``synthetic.kind: documents`` (``summary.json``)."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    documents: int
    pages_per_document: int
    document_pages: int
    heldout_documents: int
    heldout_queries: int
    page_size: list[int]
    dpi: int

_FILLER = [
    "Management remains focused on disciplined capital allocation and operational efficiency across all regions.",
    "Figures are unaudited and presented in millions of US dollars unless stated otherwise.",
    "The board approved the strategic plan, with priorities set on customer retention and margin expansion.",
    "Supply-chain costs normalised during the period while demand held steady in core markets.",
]


def plan_documents(n: int, pages: int, rng: random.Random, taken: set[str]) -> list[list[Page]]:
    """``n`` documents of ``pages`` pages: a company each (none in ``taken``), a distinct year per page."""
    companies = [f"{p} {s}" for p in PREFIXES for s in SUFFIXES if f"{p} {s}" not in taken]
    if n > len(companies) or pages > len(YEARS):
        raise ValueError(f"synthetic documents: at most {len(companies)} documents of at most {len(YEARS)} pages")
    docs = []
    for company in rng.sample(companies, n):
        taken.add(company)
        doc = []
        for year in sorted(rng.sample(YEARS, pages)):
            page = Page(page_id=0, company=company, year=year, template=rng.choice(TEMPLATES),
                        font=0, palette=rng.randrange(len(PALETTES)), seed=rng.randrange(2**31))
            page.queries = make_queries(page, random.Random(page.seed))
            doc.append(page)
        docs.append(doc)
    return docs


def _tint(colour: str, share: float = 0.12) -> tuple[float, float, float]:
    r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return tuple(1 - share + share * c for c in (r, g, b))


def _table(fig, x: float, y: float, w: float, header: list[str], rows: list[list[str]], size: float, fg: str) -> float:
    """Rows of text cells, a line each in the text layer (a table row with its headers)."""
    step = size / 72 * 1.9 / fig.get_figheight()
    first = 0.42 * w
    col = (w - first) / max(1, len(header) - 1)
    for r, row in enumerate([header, *rows]):
        for c, cell in enumerate(row):
            fig.text(x + (0 if c == 0 else first + (c - 1) * col), y - r * step, cell, fontsize=size,
                     color=fg if r == 0 else "#111111", weight="bold" if r == 0 else "normal")
    return y - (len(rows) + 1) * step


def _bars(fig, rect: list[float], labels: list[str], values: list[float], fg: str, size: float) -> None:
    ax = fig.add_axes(rect)
    ax.bar(labels, values, color=fg)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.1f}", ha="center", va="bottom", fontsize=size)
    ax.tick_params(labelsize=size)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _draw(page: Page, width: int, height: int):
    """One page as a matplotlib figure of ``width`` x ``height`` pixels at 100 dpi."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rng = random.Random(page.seed + 7)
    f = page_facts(page)
    fg, _ = PALETTES[page.palette % len(PALETTES)]
    brand = YEAR_COLOURS[page.year % len(YEAR_COLOURS)]
    c, yr = page.company, page.year
    s = width / 448
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100, facecolor=_tint(brand))
    # the report's header band in that year's brand colour, with the year on it, as on every page of the report
    fig.add_artist(Rectangle((0, 0.93), 1, 0.07, transform=fig.transFigure, color=brand))
    fig.text(0.05, 0.953, f"Annual report {yr}", color="white", fontsize=10 * s)
    fig.text(0.80, 0.948, str(yr), color="white", fontsize=15 * s, weight="bold")
    titles = {"table": f"{c} - {yr} quarterly results", "bar": f"{c}: revenue by quarter, {yr}",
              "line": f"{c}: monthly active users, {yr}", "memo": f"Memo - {c} {yr} highlights",
              "segments": f"{c} - {yr} revenue by segment"}
    fig.text(0.05, 0.88, titles[page.template], fontsize=12 * s, color=fg, weight="bold")
    fig.text(0.05, 0.845, f"{c} | page {1 + page.seed % 40}", fontsize=7 * s, color="#666666")
    body = 8 * s
    if page.template == "table":
        rows = [[k.capitalize() + (" ($M)" if k != "headcount" else ""), *[f"{v:,}" for v in f[k]]]
                for k in ("revenue", "operating income", "net profit", "headcount")]
        y = _table(fig, 0.05, 0.78, 0.9, ["", *QUARTERS], rows, body, fg)
        fig.text(0.05, y - 0.06, textwrap.fill(" ".join(rng.sample(_FILLER, 2)), 70), fontsize=body, va="top")
    elif page.template == "bar":
        fig.text(0.05, 0.79, f"Revenue ($M) of {c} in each quarter of {yr}.", fontsize=body)
        _bars(fig, [0.08, 0.38, 0.84, 0.36], QUARTERS, f["revenue"], fg, body)
        fig.text(0.05, 0.3, textwrap.fill(rng.choice(_FILLER), 70), fontsize=body, va="top")
    elif page.template == "line":
        fig.text(0.05, 0.79, f"Monthly active users (millions), {c}, {yr}.", fontsize=body)
        ax = fig.add_axes([0.08, 0.38, 0.86, 0.36])
        months = [m[:3] for m in MONTHS]
        ax.plot(months, f["users"], color=fg, marker="o")
        for i, v in enumerate(f["users"]):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=body * 0.75)
        ax.tick_params(labelsize=body * 0.8)
        fig.text(0.05, 0.3, textwrap.fill(rng.choice(_FILLER), 70), fontsize=body, va="top")
    elif page.template == "memo":
        facts = (f"In {yr}, {c} opened {f['stores']} new stores and hired {f['hires']:,} people. "
                 f"Customer satisfaction reached {f['satisfaction']}% in the annual survey.")
        text = "\n\n".join(textwrap.fill(p, 70) for p in (rng.choice(_FILLER), facts, *rng.sample(_FILLER, 2)))
        fig.text(0.05, 0.79, text, fontsize=body, va="top")
    else:  # segments: a table left, bars right
        rows = [[k, f"{v:,.1f}"] for k, v in f["segments"].items()]
        _table(fig, 0.05, 0.78, 0.42, ["Segment", "$M"], rows, body, fg)
        _bars(fig, [0.55, 0.5, 0.4, 0.3], [k[:4] for k in f["segments"]], list(f["segments"].values()), fg, body * 0.8)
        fig.text(0.05, 0.4, textwrap.fill(" ".join(rng.sample(_FILLER, 2)), 70), fontsize=body, va="top")
    fig.text(0.05, 0.025, f"{c} | {yr} | confidential", fontsize=7 * s, color="#888888")
    return fig


def _write_pdf(pages: list[Page], path: Path, width: int, height: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    path.parent.mkdir(parents=True, exist_ok=True)
    # Type 3, not 42 (TrueType): embedding TrueType subsets each font per file with fontTools, which took half the
    # time of writing a document; pypdfium2 reads the same text from both, and renders pixels within ~1/255 on average
    with matplotlib.rc_context({"pdf.fonttype": 3}), PdfPages(path, metadata={"CreationDate": None}) as pdf:
        for page in pages:
            fig = _draw(page, width, height)
            pdf.savefig(fig)
            plt.close(fig)


def _slug(company: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", company.lower()).strip("-")


def _rasterise(path: Path, dpi: int) -> list[bytes]:
    """The PDF's pages as PNG bytes, rendered as the corpus job renders them (pypdfium2 at ``dpi``)."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(str(path))
    out = []
    try:
        for page in doc:
            buf = io.BytesIO()
            page.render(scale=dpi / 72.0).to_pil().convert("RGB").save(buf, format="PNG")
            out.append(buf.getvalue())
    finally:
        doc.close()
    return out


def _write_document(pages: list[Page], path: Path, width: int, height: int, dpi: int | None) -> list[bytes]:
    """One document's PDF; its pages rasterised at ``dpi`` when given (a worker process's task)."""
    _write_pdf(pages, path, width, height)
    return _rasterise(path, dpi) if dpi else []


def _heldout_eval(docs: list[list[Page]], images: dict[int, bytes], k: int, rng: random.Random) -> pa.Table:
    """Each held-out page's first template question, its page and ``k`` look-alike pages (same year, else same
    template, else any) from the other held-out documents."""
    pages = [p for doc in docs for p in doc]
    cols: dict[str, list] = {"query_id": [], "query": [], "answer": [], "doc_id": [], "page": [], "image": []}
    cols.update({f"negative_{i}": [] for i in range(k)})
    for i, page in enumerate(pages):
        others = [p for p in pages if p.company != page.company]
        alike = [p for p in others if p.year == page.year] + [p for p in others if p.template == page.template]
        rng.shuffle(alike)
        negatives = list({id(p): p for p in alike}.values())[:k]
        chosen = {id(p) for p in negatives}
        negatives += rng.sample([p for p in others if id(p) not in chosen], k - len(negatives))
        q = page.queries[0]
        cols["query_id"].append(f"heldout-{i:06d}")
        cols["query"].append(q.text)
        cols["answer"].append(q.answer)
        cols["doc_id"].append(f"{_slug(page.company)}.pdf")
        cols["page"].append(page.page_id)
        cols["image"].append(images[id(page)])
        for j, neg in enumerate(negatives):
            cols[f"negative_{j}"].append(images[id(neg)])
    return pa.table(cols)


def write_documents(cfg: SyntheticConfig) -> DocumentsSummary:
    """Write the unlabeled documents and the held-out eval split under ``cfg.output_dir``; returns the summary (also
    written as summary.json)."""
    out = Path(cfg.output_dir)
    for owned in ("documents", "heldout"):  # a smaller rerun must not leave stale files behind
        shutil.rmtree(out / owned, ignore_errors=True)
    rng = random.Random(cfg.seed)
    taken: set[str] = set()
    docs = plan_documents(cfg.documents, cfg.pages_per_document, rng, taken)
    heldout = plan_documents(cfg.heldout_documents, cfg.pages_per_document, rng, taken)
    w, h = cfg.page_width, cfg.page_height
    jobs = [(doc, out / "documents" / f"{_slug(doc[0].company)}.pdf", None) for doc in docs]
    jobs += [(doc, out / "heldout" / "documents" / f"{_slug(doc[0].company)}.pdf", cfg.dpi) for doc in heldout]
    # drawing is CPU-bound (~0.1 s a page): one process per core; each document is a pure function of its plan
    workers = min(len(jobs), os.cpu_count() or 1)
    rendered = map_in_processes(_write_document, *zip(*[(d, p, w, h, dpi) for d, p, dpi in jobs], strict=True),
                                workers=workers)
    images: dict[int, bytes] = {}
    for doc, pngs in zip(heldout, rendered[len(docs):], strict=True):
        for n, (page, png) in enumerate(zip(doc, pngs, strict=True), start=1):
            page.page_id, images[id(page)] = n, png
    table = _heldout_eval(heldout, images, cfg.eval_negatives, rng)
    (out / "heldout" / "eval").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "heldout" / "eval" / "part-00000.parquet")
    summary = DocumentsSummary(seed=cfg.seed, documents=len(docs), pages_per_document=cfg.pages_per_document,
                               document_pages=len(docs) * cfg.pages_per_document, heldout_documents=len(heldout),
                               heldout_queries=table.num_rows, page_size=[w, h], dpi=cfg.dpi)
    (out / "summary.json").write_text(summary.model_dump_json(indent=2))
    return summary
