"""The synthetic documents' facts: which company and year each page is about, its numbers (a pure function of its
seed) and the queries only it answers. Rendering is :mod:`ray_vdr.data.render`; the datasets are
:mod:`ray_vdr.data.synthetic` (labelled triplets) and :mod:`ray_vdr.data.documents` (unlabeled PDFs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

PREFIXES = [
    "Northwind", "Contoso", "Fabrikam", "Tailspin", "Wingtip", "Litware", "Proseware", "Woodgrove", "Alpine",
    "Blue Yonder", "Coho", "Lucerne", "Trey", "Wide World", "Humongous", "Southridge", "Adatum", "Relecloud",
    "Bellows", "Fourth Coffee", "Margie", "Nod", "Tasmanian", "Graphic", "Lamna", "Munson", "Olympia", "Quarry",
    "Redwood", "Silverline", "Tidewater", "Umber", "Vantage", "Westbrook", "Yellowfin", "Zephyr", "Ironbark",
    "Kestrel", "Harbor", "Juniper",
]
SUFFIXES = [
    "Logistics", "Foods", "Energy", "Robotics", "Pharma", "Airlines", "Bank", "Retail", "Media", "Motors",
    "Telecom", "Insurance", "Mining", "Software", "Textiles", "Shipping",
]
YEARS = list(range(2010, 2026))
QUARTERS = ["Q1", "Q2", "Q3", "Q4"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
SEGMENTS = ["Cloud", "Devices", "Services", "Consumer", "Enterprise", "Licensing", "Advertising", "Hardware"]
TEMPLATES = ["table", "bar", "line", "memo", "segments"]
YEAR_COLOURS = ["#c0392b", "#d35400", "#b7950b", "#27ae60", "#16a085", "#2980b9", "#8e44ad", "#2c3e50",
                 "#e91e63", "#795548", "#607d8b", "#9e9d24", "#00838f", "#6a1b9a", "#ef6c00", "#1b5e20"]
PALETTES = [("#1f4e79", "#dbe8f5"), ("#7a1f1f", "#f5e0db"), ("#1f5e3a", "#dcf0e3"), ("#4b2a75", "#e8dff5"),
             ("#333333", "#e6e6e6")]


def max_pages() -> int:
    """Distinct (company, year) pairs: the most pages one dataset can hold without two pages sharing facts."""
    return len(PREFIXES) * len(SUFFIXES) * len(YEARS)


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


def page_facts(page: Page) -> dict:
    """Numbers shown on the page, a pure function of its seed."""
    rng = random.Random(page.seed)
    base = rng.uniform(20, 900)
    facts: dict = {"revenue": [round(base * rng.uniform(0.8, 1.25), 1) for _ in QUARTERS]}
    facts["operating income"] = [round(r * rng.uniform(0.05, 0.3), 1) for r in facts["revenue"]]
    facts["net profit"] = [round(o * rng.uniform(0.5, 0.9), 1) for o in facts["operating income"]]
    facts["headcount"] = [int(base * rng.uniform(8, 12)) + 10 * i for i in range(4)]
    users = rng.uniform(0.5, 40)
    facts["users"] = [round(users * (1 + 0.03 * m + rng.uniform(-0.02, 0.02)), 2) for m in range(12)]
    facts["stores"] = rng.randint(3, 140)
    facts["hires"] = rng.randint(40, 4000)
    facts["satisfaction"] = rng.randint(61, 98)
    segs = rng.sample(SEGMENTS, 4)
    facts["segments"] = {s: round(base * rng.uniform(0.3, 1.4), 1) for s in segs}
    return facts


def make_queries(page: Page, rng: random.Random) -> list[Query]:
    f = page_facts(page)
    c, y, pc = page.company, page.year, _possessive(page.company)
    pool: list[Query] = []
    if page.template == "table":
        for qi, q in enumerate(QUARTERS):
            pool.append(Query(f"What was {pc} {q} {y} revenue?", _money(f["revenue"][qi])))
            pool.append(Query(f"What operating income did {c} report for {q} {y}?", _money(f["operating income"][qi])))
            pool.append(Query(f"How many employees did {c} have at the end of {q} {y}?", f"{f['headcount'][qi]:,}"))
    elif page.template == "bar":
        for qi, q in enumerate(QUARTERS):
            pool.append(Query(f"What was {pc} {q} {y} revenue?", _money(f["revenue"][qi])))
        pool.append(Query(f"In which quarter of {y} did {c} have its highest revenue?",
                          QUARTERS[int(np.argmax(f["revenue"]))]))
    elif page.template == "line":
        for m in (0, 2, 5, 8, 11):
            pool.append(Query(f"How many monthly active users did {c} have in {MONTHS[m]} {y}?",
                              f"{f['users'][m]:.2f}M"))
    elif page.template == "memo":
        pool.append(Query(f"How many new stores did {c} open in {y}?", str(f["stores"])))
        pool.append(Query(f"How many people did {c} hire in {y}?", f"{f['hires']:,}"))
        pool.append(Query(f"What customer satisfaction score did {c} report for {y}?", f"{f['satisfaction']}%"))
    else:  # segments
        for s, v in f["segments"].items():
            pool.append(Query(f"What was {pc} {s} segment revenue in {y}?", _money(v)))
    rng.shuffle(pool)
    return pool
