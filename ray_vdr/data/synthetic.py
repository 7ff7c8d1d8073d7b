"""Synthetic Visual Document Retrieval data that looks like the real task.

Every page is a rendered document about one (company, year): a results table, a bar or line chart, a memo, or a
two-column segment report, in one of several fonts, with light scan noise. Each page answers 1-3 queries
("What was Northwind Logistics' Q3 2021 revenue?") that no other page answers, because no two pages share a
(company, year). Hard negatives share the company, the year or the template with the positive page, so they look
alike, but never contain the answer.

Output follows the llamaindex-vdr layout (tomaarsen/llamaindex-vdr-en-train-preprocessed): Parquet with ``query``,
``image`` and ``negative_0..negative_k`` (images stored as the Hugging Face Image struct {bytes, path}), plus
``query_id`` and ``answer`` for debugging. The eval split is laid out like the reference eval: N queries, each with
its positive and 4 hard negatives, all distinct pages, so the corpus holds 5N pages. Everything is a pure function
of the seed.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageColor, ImageDraw, ImageFilter, ImageFont

from ray_vdr.config import SyntheticConfig

logger = logging.getLogger(__name__)

_PREFIXES = [
    "Northwind", "Contoso", "Fabrikam", "Tailspin", "Wingtip", "Litware", "Proseware", "Woodgrove", "Alpine",
    "Blue Yonder", "Coho", "Lucerne", "Trey", "Wide World", "Humongous", "Southridge", "Adatum", "Relecloud",
    "Bellows", "Fourth Coffee", "Margie", "Nod", "Tasmanian", "Graphic", "Lamna", "Munson", "Olympia", "Quarry",
    "Redwood", "Silverline", "Tidewater", "Umber", "Vantage", "Westbrook", "Yellowfin", "Zephyr", "Ironbark",
    "Kestrel", "Harbor", "Juniper",
]
_SUFFIXES = [
    "Logistics", "Foods", "Energy", "Robotics", "Pharma", "Airlines", "Bank", "Retail", "Media", "Motors",
    "Telecom", "Insurance", "Mining", "Software", "Textiles", "Shipping",
]
_YEARS = list(range(2010, 2026))
_QUARTERS = ["Q1", "Q2", "Q3", "Q4"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_SEGMENTS = ["Cloud", "Devices", "Services", "Consumer", "Enterprise", "Licensing", "Advertising", "Hardware"]
_TEMPLATES = ["table", "bar", "line", "memo", "segments"]
_FONT_FILES = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf"]
_YEAR_COLOURS = ["#c0392b", "#d35400", "#b7950b", "#27ae60", "#16a085", "#2980b9", "#8e44ad", "#2c3e50",
                 "#e91e63", "#795548", "#607d8b", "#9e9d24", "#00838f", "#6a1b9a", "#ef6c00", "#1b5e20"]
_PALETTES = [("#1f4e79", "#dbe8f5"), ("#7a1f1f", "#f5e0db"), ("#1f5e3a", "#dcf0e3"), ("#4b2a75", "#e8dff5"),
             ("#333333", "#e6e6e6")]


def max_pages() -> int:
    """Distinct (company, year) pairs: the most pages one dataset can hold without two pages sharing facts."""
    return len(_PREFIXES) * len(_SUFFIXES) * len(_YEARS)


@dataclass(frozen=True)
class Query:
    text: str
    answer: str


@dataclass
class Page:
    """One document page: who it is about, how it is laid out, and the queries only it answers."""

    page_id: int
    company: str
    year: int
    template: str
    font: int
    palette: int
    seed: int
    queries: list[Query] = field(default_factory=list)
    _png: bytes | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------------------------------
# Facts and queries


def _possessive(company: str) -> str:
    return f"{company}'" if company.endswith("s") else f"{company}'s"


def _money(v: float) -> str:
    return f"${v:,.1f}M"


def _page_facts(page: Page) -> dict:
    """Numbers shown on the page, a pure function of its seed."""
    rng = random.Random(page.seed)
    base = rng.uniform(20, 900)
    facts: dict = {"revenue": [round(base * rng.uniform(0.8, 1.25), 1) for _ in _QUARTERS]}
    facts["operating income"] = [round(r * rng.uniform(0.05, 0.3), 1) for r in facts["revenue"]]
    facts["net profit"] = [round(o * rng.uniform(0.5, 0.9), 1) for o in facts["operating income"]]
    facts["headcount"] = [int(base * rng.uniform(8, 12)) + 10 * i for i in range(4)]
    users = rng.uniform(0.5, 40)
    facts["users"] = [round(users * (1 + 0.03 * m + rng.uniform(-0.02, 0.02)), 2) for m in range(12)]
    facts["stores"] = rng.randint(3, 140)
    facts["hires"] = rng.randint(40, 4000)
    facts["satisfaction"] = rng.randint(61, 98)
    segs = rng.sample(_SEGMENTS, 4)
    facts["segments"] = {s: round(base * rng.uniform(0.3, 1.4), 1) for s in segs}
    return facts


def _make_queries(page: Page, rng: random.Random) -> list[Query]:
    f = _page_facts(page)
    c, y, pc = page.company, page.year, _possessive(page.company)
    pool: list[Query] = []
    if page.template == "table":
        for qi, q in enumerate(_QUARTERS):
            pool.append(Query(f"What was {pc} {q} {y} revenue?", _money(f["revenue"][qi])))
            pool.append(Query(f"What operating income did {c} report for {q} {y}?", _money(f["operating income"][qi])))
            pool.append(Query(f"How many employees did {c} have at the end of {q} {y}?", f"{f['headcount'][qi]:,}"))
    elif page.template == "bar":
        for qi, q in enumerate(_QUARTERS):
            pool.append(Query(f"What was {pc} {q} {y} revenue?", _money(f["revenue"][qi])))
        pool.append(Query(f"In which quarter of {y} did {c} have its highest revenue?",
                          _QUARTERS[int(np.argmax(f["revenue"]))]))
    elif page.template == "line":
        for m in (0, 2, 5, 8, 11):
            pool.append(Query(f"How many monthly active users did {c} have in {_MONTHS[m]} {y}?", f"{f['users'][m]:.2f}M"))
    elif page.template == "memo":
        pool.append(Query(f"How many new stores did {c} open in {y}?", str(f["stores"])))
        pool.append(Query(f"How many people did {c} hire in {y}?", f"{f['hires']:,}"))
        pool.append(Query(f"What customer satisfaction score did {c} report for {y}?", f"{f['satisfaction']}%"))
    else:  # segments
        for s, v in f["segments"].items():
            pool.append(Query(f"What was {pc} {s} segment revenue in {y}?", _money(v)))
    rng.shuffle(pool)
    return pool


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


@cache
def _font_path(index: int) -> str:
    """Fonts ship inside matplotlib (a dependency), so pages render identically on every machine."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / _FONT_FILES[index % len(_FONT_FILES)])


@cache
def _font(index: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(index), size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


_FILLER = [
    "Management remains focused on disciplined capital allocation and operational efficiency across all regions.",
    "Figures are unaudited and presented in millions of US dollars unless stated otherwise.",
    "The board approved the strategic plan, with priorities set on customer retention and margin expansion.",
    "Supply-chain costs normalised during the period while demand held steady in core markets.",
    "Forward-looking statements involve risks and uncertainties described in the annual report.",
    "Investments in automation and training continued in line with the multi-year programme.",
]


def _paragraph(draw, x, y, width, text, font, fill, spacing=4) -> int:
    for line in _wrap(draw, text, font, width):
        draw.text((x, y), line, font=font, fill=fill)
        y += font.size + spacing
    return y


def _table(draw, x, y, width, header, rows, font, fg, bg) -> int:
    ncol = len(header)
    first = width * 0.42
    colw = (width - first) / (ncol - 1)
    rowh = font.size + 10
    draw.rectangle([x, y, x + width, y + rowh], fill=bg)
    for r, row in enumerate([header, *rows]):
        yy = y + r * rowh
        for ci, cell in enumerate(row):
            cx = x + 4 if ci == 0 else x + first + (ci - 1) * colw + 4
            draw.text((cx, yy + 5), str(cell), font=font, fill=fg if r == 0 else "#111111")
        draw.line([x, yy + rowh, x + width, yy + rowh], fill="#999999", width=1)
    return y + (len(rows) + 1) * rowh


def _bars(draw, x, y, w, h, labels, values, font, fg) -> int:
    top = max(values) * 1.15
    n = len(values)
    slot = w / n
    draw.line([x, y + h, x + w, y + h], fill="#444444", width=2)
    for i, (lab, v) in enumerate(zip(labels, values, strict=False)):
        bh = h * v / top
        bx = x + i * slot + slot * 0.18
        draw.rectangle([bx, y + h - bh, bx + slot * 0.64, y + h], fill=fg)
        draw.text((bx, y + h - bh - font.size - 3), f"{v:,.1f}", font=font, fill="#111111")
        draw.text((bx, y + h + 4), lab, font=font, fill="#111111")
    return y + h + font.size + 10


def _line(draw, x, y, w, h, values, font, fg) -> int:
    top, bot = max(values) * 1.1, min(values) * 0.85
    pts = [(x + w * i / (len(values) - 1), y + h - h * (v - bot) / (top - bot)) for i, v in enumerate(values)]
    draw.line([x, y + h, x + w, y + h], fill="#444444", width=2)
    draw.line(pts, fill=fg, width=3)
    for i, ((px, py), v) in enumerate(zip(pts, values, strict=False)):
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=fg)
        dy = -font.size - 4 if i % 2 == 0 else 6
        draw.text((px - 12, py + dy), f"{v:.2f}", font=font, fill="#111111")
        draw.text((px - 8, y + h + 4), _MONTHS[i][:3], font=font, fill="#111111")
    return y + h + font.size + 10


def render_page(page: Page, width: int, height: int) -> Image.Image:
    """Draw one page. Deterministic for a given page (its seed drives layout jitter and noise)."""
    rng = random.Random(page.seed + 7)
    f = _page_facts(page)
    fg, bg = _PALETTES[page.palette % len(_PALETTES)]
    # paper tinted in the year's brand colour (as a report's stock is): a cue that survives any downscaling
    brand = ImageColor.getrgb(_YEAR_COLOURS[page.year % len(_YEAR_COLOURS)])
    paper = tuple(int(0.8 * (255 - rng.uniform(0, 10)) + 0.2 * c) for c in brand)
    img = Image.new("RGB", (width, height), paper)
    d = ImageDraw.Draw(img)
    s = width / 448  # scale fonts with the page
    title_f, body_f, small_f = _font(page.font, int(20 * s)), _font(page.font, int(12 * s)), _font(page.font, int(10 * s))
    m = int(24 * s + rng.uniform(-4, 4))
    w = width - 2 * m
    c, yr = page.company, page.year
    # the annual report's header band in that year's brand colour, with the year on it, as on every page of the report
    band = int(40 * s)
    d.rectangle([0, 0, width, band], fill=_YEAR_COLOURS[yr % len(_YEAR_COLOURS)])
    badge_f = _font(3, int(24 * s))
    d.text((width - m - int(70 * s), int(7 * s)), str(yr), font=badge_f, fill="white")
    d.text((m, int(12 * s)), f"Annual report {yr}", font=_font(page.font, int(14 * s)), fill="white")
    y = band + int(16 * s)
    titles = {
        "table": f"{c} - {yr} quarterly results",
        "bar": f"{c}: revenue by quarter, {yr}",
        "line": f"{c}: monthly active users, {yr}",
        "memo": f"Memo - {c} {yr} highlights",
        "segments": f"{c} - {yr} revenue by segment",
    }
    y = _paragraph(d, m, y, w, titles[page.template], title_f, fg) + int(6 * s)
    d.text((m, y), f"{c} | page {1 + page.seed % 40}", font=small_f, fill="#666666")
    y += small_f.size + int(12 * s)
    if page.template == "table":
        rows = [[k.capitalize() + (" ($M)" if k != "headcount" else ""), *[f"{v:,}" for v in f[k]]]
                for k in ("revenue", "operating income", "net profit", "headcount")]
        y = _table(d, m, y, w, ["", *_QUARTERS], rows, body_f, fg, bg) + int(14 * s)
        y = _paragraph(d, m, y, w, " ".join(rng.sample(_FILLER, 3)), body_f, "#222222")
    elif page.template == "bar":
        y = _paragraph(d, m, y, w, f"Revenue ($M) of {c} in each quarter of {yr}.", body_f, "#222222") + 8
        y = _bars(d, m + 10, y + small_f.size, w - 20, int(height * 0.38), _QUARTERS, f["revenue"], small_f, fg) + 10
        y = _paragraph(d, m, y, w, " ".join(rng.sample(_FILLER, 2)), body_f, "#222222")
    elif page.template == "line":
        y = _paragraph(d, m, y, w, f"Monthly active users (millions), {c}, {yr}.", body_f, "#222222") + 8
        y = _line(d, m + 12, y + small_f.size * 2, w - 30, int(height * 0.34), f["users"], small_f, fg) + 10
        y = _paragraph(d, m, y, w, " ".join(rng.sample(_FILLER, 2)), body_f, "#222222")
    elif page.template == "memo":
        facts = (f"In {yr}, {c} opened {f['stores']} new stores and hired {f['hires']:,} people. "
                 f"Customer satisfaction reached {f['satisfaction']}% in the annual survey.")
        paras = [rng.choice(_FILLER), facts, *rng.sample(_FILLER, 3)]
        for p in paras:
            y = _paragraph(d, m, y, w, p, body_f, "#222222") + int(10 * s)
    else:  # segments: two columns, table left and bars right
        half = w // 2 - 8
        rows = [[k, f"{v:,.1f}"] for k, v in f["segments"].items()]
        _table(d, m, y, half, ["Segment", "$M"], rows, body_f, fg, bg)
        _bars(d, m + half + 16, y + small_f.size, half, int(height * 0.3), [k[:4] for k in f["segments"]],
              list(f["segments"].values()), small_f, fg)
        y += int(height * 0.3) + 3 * small_f.size
        y = _paragraph(d, m, y, w, " ".join(rng.sample(_FILLER, 3)), body_f, "#222222")
    d.text((m, height - m), f"{c} | {yr} | confidential", font=small_f, fill="#888888")
    # light scan noise: sparse speckles and a faint blur on some pages (dense noise would bloat every PNG)
    arr = np.asarray(img).copy()
    nrng = np.random.default_rng(page.seed)
    n = int(arr.shape[0] * arr.shape[1] * 0.002)
    ys, xs = nrng.integers(0, arr.shape[0], n), nrng.integers(0, arr.shape[1], n)
    arr[ys, xs] = nrng.integers(90, 200, (n, 1), dtype=np.uint8)
    img = Image.fromarray(arr)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(0.4))
    return img


def page_png(page: Page, width: int, height: int) -> bytes:
    if page._png is None:
        buf = io.BytesIO()
        render_page(page, width, height).save(buf, format="PNG", optimize=False)
        page._png = buf.getvalue()
    return page._png


# ---------------------------------------------------------------------------------------------------------------------
# Dataset assembly


class _PageFactory:
    """Hands out pages with globally unique (company, year), so each fact lives on exactly one page."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        keys = [(f"{p} {s}", y) for p in _PREFIXES for s in _SUFFIXES for y in _YEARS]
        rng.shuffle(keys)
        self.order = keys  # popped from the end
        self.used: set[tuple[str, int]] = set()
        self.by_company: dict[str, list[tuple[str, int]]] = {}
        self.by_year: dict[int, list[tuple[str, int]]] = {}
        for k in keys:
            self.by_company.setdefault(k[0], []).append(k)
            self.by_year.setdefault(k[1], []).append(k)
        self.pages: list[Page] = []

    def _take(self, pool: list[tuple[str, int]]) -> tuple[str, int] | None:
        while pool:
            k = pool.pop()
            if k not in self.used:
                self.used.add(k)
                return k
        return None

    def new(self, like: Page | None = None) -> Page:
        """A fresh page; with ``like``, one sharing its company or year, or else its template."""
        key = None
        template = self.rng.choice(_TEMPLATES)
        if like is not None:
            pools = [self.by_company[like.company], self.by_year[like.year]]
            self.rng.shuffle(pools)
            key = self._take(pools[0]) or self._take(pools[1])
            if key is None or self.rng.random() < 0.5:
                template = like.template
        key = key or self._take(self.order)
        if key is None:
            raise ValueError(f"synthetic data is limited to {max_pages()} distinct pages; ask for fewer rows")
        page = Page(
            page_id=len(self.pages),
            company=key[0],
            year=key[1],
            template=template,
            font=self.rng.randrange(len(_FONT_FILES)),
            palette=self.rng.randrange(len(_PALETTES)),
            seed=self.rng.randrange(2**31),
        )
        page.queries = _make_queries(page, random.Random(page.seed))
        self.pages.append(page)
        return page


@dataclass
class SyntheticRow:
    query_id: str
    query: str
    answer: str
    positive: Page
    negatives: list[Page]


def generate(cfg: SyntheticConfig) -> tuple[list[SyntheticRow], list[SyntheticRow]]:
    """Plan the train and eval rows (pages are rendered lazily when written)."""
    rng = random.Random(cfg.seed)
    factory = _PageFactory(rng)
    # eval first: N queries, each with a fresh positive and eval_negatives fresh look-alike pages
    eval_rows = []
    for i in range(cfg.eval_queries):
        pos = factory.new()
        negs = [factory.new(like=pos) for _ in range(cfg.eval_negatives)]
        q = pos.queries[0]
        eval_rows.append(SyntheticRow(f"eval-{i:06d}", q.text, q.answer, pos, negs))
    # train: pages answer 1-3 queries each; negatives are other train pages that look alike
    train_rows: list[SyntheticRow] = []
    train_pages: list[Page] = []
    while len(train_rows) < cfg.train_queries:
        pos = factory.new(like=train_pages[-1] if train_pages and rng.random() < 0.5 else None)
        train_pages.append(pos)
        for q in pos.queries[: rng.randint(1, 3)]:
            if len(train_rows) == cfg.train_queries:
                break
            train_rows.append(SyntheticRow(f"train-{len(train_rows):06d}", q.text, q.answer, pos, []))
    index: dict[tuple[str, object], list[Page]] = {}
    for p in train_pages:
        for key in (("company", p.company), ("year", p.year), ("template", p.template)):
            index.setdefault(key, []).append(p)
    for row in train_rows:
        row.negatives = _pick_negatives(row.positive, index, cfg.num_negatives, rng, factory)
    rng.shuffle(train_rows)  # like a real dataset: a page's queries are not next to each other
    return train_rows, eval_rows


def _pick_negatives(
    pos: Page, index: dict[tuple[str, object], list[Page]], k: int, rng: random.Random, factory: _PageFactory
) -> list[Page]:
    """Look-alikes of ``pos`` (same company, year or template); fresh look-alike pages if the pool has too few."""
    if k == 0:
        return []
    alike: list[Page] = []
    for key in (("company", pos.company), ("year", pos.year), ("template", pos.template)):
        group = index.get(key, [])
        alike.extend(rng.sample(group, min(len(group), 4 * k)))
    alike = list({p.page_id: p for p in alike if p is not pos}.values())
    rng.shuffle(alike)
    out = alike[:k]
    while len(out) < k:
        out.append(factory.new(like=pos))
    return out


def _image_cell(png: bytes, name: str) -> dict:
    return {"bytes": png, "path": name}


_HF_IMAGE = {"_type": "Image"}


def _schema(n_neg: int) -> pa.Schema:
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("query_id", pa.string()), ("query", pa.string()), ("answer", pa.string()), ("image", img)]
    fields += [(f"negative_{i}", img) for i in range(n_neg)]
    features = {"query_id": {"dtype": "string", "_type": "Value"}, "query": {"dtype": "string", "_type": "Value"},
                "answer": {"dtype": "string", "_type": "Value"}, "image": _HF_IMAGE}
    features.update({f"negative_{i}": _HF_IMAGE for i in range(n_neg)})
    # Hugging Face `datasets` reads this metadata and decodes the struct columns as images
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema(fields, metadata=meta)


def _write_parquet(rows: list[SyntheticRow], n_neg: int, path: Path, width: int, height: int, rows_per_file: int) -> int:
    path.mkdir(parents=True, exist_ok=True)
    schema = _schema(n_neg)
    n_files = 0
    for start in range(0, len(rows), rows_per_file):
        chunk = rows[start : start + rows_per_file]
        cols: dict[str, list] = {"query_id": [], "query": [], "answer": [], "image": []}
        for i in range(n_neg):
            cols[f"negative_{i}"] = []
        for r in chunk:
            cols["query_id"].append(r.query_id)
            cols["query"].append(r.query)
            cols["answer"].append(r.answer)
            cols["image"].append(_image_cell(page_png(r.positive, width, height), f"page-{r.positive.page_id:06d}.png"))
            for i, p in enumerate(r.negatives):
                cols[f"negative_{i}"].append(_image_cell(page_png(p, width, height), f"page-{p.page_id:06d}.png"))
        pq.write_table(pa.table(cols, schema=schema), path / f"part-{n_files:05d}.parquet")
        n_files += 1
    return n_files


def _write_jsonl(rows: list[SyntheticRow], path: Path, images: Path, width: int, height: int) -> None:
    images.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in rows:
            rec = {"query_id": r.query_id, "query": r.query, "answer": r.answer}
            for col, page in [("image", r.positive), *[(f"negative_{i}", p) for i, p in enumerate(r.negatives)]]:
                name = f"page-{page.page_id:06d}.png"
                if not (images / name).exists():
                    (images / name).write_bytes(page_png(page, width, height))
                rec[col] = f"{images.relative_to(path.parent).as_posix()}/{name}"
            fh.write(json.dumps(rec) + "\n")


def iter_pages(rows: list[SyntheticRow]) -> Iterator[Page]:
    seen: set[int] = set()
    for r in rows:
        for p in (r.positive, *r.negatives):
            if p.page_id not in seen:
                seen.add(p.page_id)
                yield p


def write_synthetic(cfg: SyntheticConfig, rows_per_file: int = 256) -> dict:
    """Generate and write the dataset under ``cfg.output_dir``. Returns a summary (also written as summary.json).

    Layout::

        train/part-*.parquet   query, image, negative_0..k-1 (+ query_id, answer)
        eval/part-*.parquet    query, image, negative_0..3: N queries over a 5N-page corpus
        train.jsonl, eval.jsonl            the same rows as JSONL over image files:
        images/train/, images/eval/        each split's pages (the splits share none): the eval corpus to index
    """
    out = Path(cfg.output_dir)
    for owned in ("train", "eval", "images"):  # a smaller rerun must not leave stale part files behind
        shutil.rmtree(out / owned, ignore_errors=True)
    train_rows, eval_rows = generate(cfg)
    w, h = cfg.page_width, cfg.page_height
    _write_parquet(train_rows, cfg.num_negatives, out / "train", w, h, rows_per_file)
    _write_parquet(eval_rows, cfg.eval_negatives, out / "eval", w, h, rows_per_file)
    if cfg.jsonl:
        _write_jsonl(train_rows, out / "train.jsonl", out / "images" / "train", w, h)
        _write_jsonl(eval_rows, out / "eval.jsonl", out / "images" / "eval", w, h)
    summary = {
        "seed": cfg.seed,
        "train_rows": len(train_rows),
        "train_pages": sum(1 for _ in iter_pages(train_rows)),
        "eval_queries": len(eval_rows),
        "eval_corpus_pages": sum(1 for _ in iter_pages(eval_rows)),
        "templates": sorted({p.template for p in iter_pages(train_rows + eval_rows)}),
        "page_size": [w, h],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("synthetic dataset written to %s: %s", out, summary)
    return summary
