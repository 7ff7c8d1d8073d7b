"""Queries from a page's own text layer (no model): spans that single the page out. Pure functions, no Ray.

Three kinds of span, each a search a person could type:

- ``title_figures``: the page's title (its first line of words) with key figures from the page ("Northwind Logistics
  2021 quarterly results revenue 512.3");
- ``table_row``: a table row with its column headers, under the page's heading ("Northwind Logistics - 2021
  quarterly results: Revenue ($M) Q1 854.6 Q2 617.2 Q3 634.4 Q4 672.5");
- ``sentence``: a sentence that holds a name and a number ("In 2012, Fabrikam Motors opened 120 new stores").

Lines that repeat on many pages of the corpus (headers, footers, disclaimers: the boilerplate) never make a span.
The choice among candidates is seeded by the page, so a rerun writes the same queries.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

__all__ = ["KINDS", "normalize_line", "page_lines", "text_queries"]

KINDS = ("title_figures", "table_row", "sentence")
_NUMBER = re.compile(r"^[-+$€£(]*\d[\d,.]*%?[)]?$")
_WORD = re.compile(r"[A-Za-z][A-Za-z'&.-]+")


def normalize_line(line: str) -> str:
    """The form a line is compared in (boilerplate, duplicates): lower case, single spaces, no edge punctuation."""
    return " ".join(line.casefold().split()).strip(" .,:;|-")


def page_lines(text: str | None) -> list[str]:
    """The page's lines of text, stripped, without empty ones."""
    return [" ".join(line.split()) for line in (text or "").splitlines() if line.strip()]


def _is_number(token: str) -> bool:
    return bool(_NUMBER.match(token))


def _token(t: str) -> str:
    return t.strip(",;:").rstrip(".") if t.endswith(".") and t[:-1][-1:].isdigit() else t.strip(",;:")


def _numbers(line: str) -> list[str]:
    return [_token(t) for t in line.split() if _is_number(_token(t))]


def _figure(token: str) -> bool:
    """A figure worth searching for: a decimal, a number with a thousands separator or of 3+ digits, not a year."""
    digits = re.sub(r"\D", "", token)
    if re.fullmatch(r"(19|20)\d\d", digits) and len(token) == 4:
        return False
    return "." in token or "," in token or len(digits) >= 3


def _words(line: str) -> list[str]:
    return _WORD.findall(line)


def _title(lines: list[str]) -> str | None:
    """The heading: of the lines of at most 12 tokens that neither end a sentence nor wrap onto the next line and
    are mostly words, the one with the most words of four letters or more (axis labels, table headers have few)."""
    best, score = None, (1, 0)
    for line in _paragraphs(lines):
        tokens = line.split()
        if len(tokens) > 12 or line.endswith((".", "!", "?")) or len(_numbers(line)) > len(tokens) // 3:
            continue
        this = (sum(len(w) >= 4 for w in _words(line)), len(tokens))
        if this > score:
            best, score = line, this
    return best


def _table_rows(lines: list[str]) -> list[str]:
    """Rows of a table with their column headers: a line of a label then only figures, under a header line of short
    labels (one per figure, or one more for the label column)."""
    out = []
    header: list[str] | None = None
    for line in lines:
        tokens = line.split()
        first = next((i for i, t in enumerate(tokens) if _is_number(_token(t))), len(tokens))
        label, figures = " ".join(tokens[:first]), [_token(t) for t in tokens[first:]]
        is_row = first > 0 and figures and all(_is_number(f) and _figure(f) for f in figures)
        if is_row and header and len(header) in (len(figures), len(figures) + 1):
            heads = header[-len(figures):]
            out.append(" ".join([label, *(f"{h} {v}" for h, v in zip(heads, figures, strict=True))]))
        elif 2 <= len(tokens) <= 12 and not _numbers(line) and all(len(t) <= 12 and t[-1:].isalnum() or t == "($M)"
                                                                     for t in tokens):
            header = tokens  # a line of column labels, for the rows under it
        elif not is_row:
            header = None
    return out


def _paragraphs(lines: list[str]) -> list[str]:
    """Lines joined where a sentence wraps onto the next one (the next line starts in lower case)."""
    out: list[str] = []
    for line in lines:
        if out and not out[-1].endswith((".", "!", "?", ":")) and line[:1].islower():
            out[-1] += " " + line
        else:
            out.append(line)
    return out


def _sentences(lines: list[str]) -> list[str]:
    """Whole sentences (ending in . ! or ?) with a capitalised name beyond their first word, and a figure."""
    out = []
    for paragraph in _paragraphs(lines):
        for sentence in re.findall(r"[^.!?]+(?:[.!?](?!\d)|$)", paragraph):
            sentence = sentence.strip()
            tokens = sentence.split()
            if len(tokens) < 5 or not sentence.endswith((".", "!", "?")):
                continue
            names = [t for t in tokens[1:] if t[:1].isupper() and _words(t)]
            if names and any(_figure(n) or n.isdigit() for n in _numbers(sentence)):
                out.append(sentence.rstrip("."))
    return out


def text_queries(text: str | None, *, n: int, seed: str, boilerplate: Iterable[str] = (),
                 kinds: Iterable[str] = KINDS, max_figures: int = 2) -> list[tuple[str, str]]:
    """Up to ``n`` (query, kind) spans of the page's text, chosen with a generator seeded by ``seed`` (the page's
    key: the same page gets the same queries); lines whose normalised form is in ``boilerplate`` are skipped."""
    skip = set(boilerplate)
    lines = [line for line in page_lines(text) if normalize_line(line) not in skip]
    if not lines:
        return []
    rng = random.Random(seed)
    candidates: list[tuple[str, str]] = []
    kinds = set(kinds)
    rows = _table_rows(lines)
    if "title_figures" in kinds and (title := _title(lines)):
        figures = list(dict.fromkeys(f for line in lines if line != title for f in _numbers(line) if _figure(f)))
        if figures:
            picked = rng.sample(figures, min(max_figures, len(figures)))
            label = next((r.split()[0] for r in rows if any(f in r for f in picked)), "")
            candidates.append((" ".join([title, label, *picked]).replace("  ", " "), "title_figures"))
    if "table_row" in kinds:  # under the page's heading, which says what the table is of
        title = _title(lines)
        candidates += [(f"{title}: {row}" if title else row, "table_row") for row in rows]
    if "sentence" in kinds:
        candidates += [(s, "sentence") for s in _sentences(lines)]
    unique = list({normalize_line(q): (q, k) for q, k in candidates}.values())
    if len(unique) <= n:
        return unique
    return [unique[i] for i in sorted(rng.sample(range(len(unique)), n))]
