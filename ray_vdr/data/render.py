"""Drawing the synthetic document pages: results tables, bar and line charts, memos and two-column segment reports, in
several fonts, with light scan noise. Deterministic for a given page (its seed drives layout jitter and noise)."""

from __future__ import annotations

import io
import multiprocessing
import os
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFilter, ImageFont

from ray_vdr.data.facts import MONTHS, PALETTES, QUARTERS, YEAR_COLOURS, Page, page_facts

__all__ = ["FONT_FILES", "map_in_processes", "page_png", "render_page", "render_pages"]

FONT_FILES = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf"]


@cache
def _font_path(index: int) -> str:
    """Fonts ship inside matplotlib (a dependency), so pages render identically on every machine."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONT_FILES[index % len(FONT_FILES)])


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
        draw.text((px - 8, y + h + 4), MONTHS[i][:3], font=font, fill="#111111")
    return y + h + font.size + 10


def render_page(page: Page, width: int, height: int) -> Image.Image:
    """Draw one page. Deterministic for a given page (its seed drives layout jitter and noise)."""
    rng = random.Random(page.seed + 7)
    f = page_facts(page)
    fg, bg = PALETTES[page.palette % len(PALETTES)]
    # paper tinted in the year's brand colour (as a report's stock is): a cue that survives any downscaling
    brand = ImageColor.getrgb(YEAR_COLOURS[page.year % len(YEAR_COLOURS)])
    paper = tuple(int(0.8 * (255 - rng.uniform(0, 10)) + 0.2 * c) for c in brand)
    img = Image.new("RGB", (width, height), paper)
    d = ImageDraw.Draw(img)
    s = width / 448  # scale fonts with the page
    title_f, body_f, small_f = (_font(page.font, int(20 * s)), _font(page.font, int(12 * s)),
                                _font(page.font, int(10 * s)))
    m = int(24 * s + rng.uniform(-4, 4))
    w = width - 2 * m
    c, yr = page.company, page.year
    # the annual report's header band in that year's brand colour, with the year on it, as on every page of the report
    band = int(40 * s)
    d.rectangle([0, 0, width, band], fill=YEAR_COLOURS[yr % len(YEAR_COLOURS)])
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
        y = _table(d, m, y, w, ["", *QUARTERS], rows, body_f, fg, bg) + int(14 * s)
        y = _paragraph(d, m, y, w, " ".join(rng.sample(_FILLER, 3)), body_f, "#222222")
    elif page.template == "bar":
        y = _paragraph(d, m, y, w, f"Revenue ($M) of {c} in each quarter of {yr}.", body_f, "#222222") + 8
        y = _bars(d, m + 10, y + small_f.size, w - 20, int(height * 0.38), QUARTERS, f["revenue"], small_f, fg) + 10
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


# Drawing one page takes ~25 ms here: below this many pages a worker, starting processes costs more than it saves
PAGES_PER_WORKER = 64


def map_in_processes(fn: Callable, *iterables: Iterable, workers: int, chunksize: int = 1) -> list:
    """``fn`` over the iterables' items in ``workers`` spawned processes, results in order: for drawing, which is
    CPU-bound, where each call is a pure function of its arguments (the synthetic pages and documents)."""
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, *iterables, chunksize=chunksize))


def render_pages(pages: Iterable[Page], width: int, height: int) -> None:
    """Draw the pages not drawn yet on every core, so that ``page_png`` returns them at once. A page is a pure
    function of its fields: the bytes are the ones ``page_png`` would draw in this process."""
    todo = [p for p in pages if p._png is None]
    workers = min(os.cpu_count() or 1, len(todo) // PAGES_PER_WORKER)
    if workers < 2:
        return
    drawn = map_in_processes(page_png, todo, repeat(width), repeat(height), workers=workers, chunksize=16)
    for page, png in zip(todo, drawn, strict=True):
        page._png = png
