"""Queries from a page's own text layer (no model): spans that single the page out. Pure functions, no Ray.

Three kinds of span, each a search a person could type:

- ``title_figures``: the page's title with a table row's label and some of that row's figures ("Northwind Logistics
  - 2021 quarterly results Revenue ($M) 617.2 672.5"), or the title alone on a page without a table ("Northwind
  Logistics: revenue by quarter, 2019": a chart's value labels are numbers from no sentence or row);
- ``table_row``: a table row with its column headers, under the page's heading ("Northwind Logistics - 2021
  quarterly results: Revenue ($M) Q1 854.6 Q2 617.2 Q3 634.4 Q4 672.5");
- ``sentence``: a sentence that holds a name and a number ("In 2012, Fabrikam Motors opened 120 new stores").

Lines that repeat on many pages of the corpus (headers, footers, disclaimers: the boilerplate) never make a span.
The choice among candidates is seeded by the page, so a rerun writes the same queries.

Every number in a span comes from the sentence or the table row it quotes: a person searching for a page types the
figures that belong together. A text layer also holds numbers that belong to nothing a person would type: page,
margin and line numbers and exponents on lines of their own, section numbers of headings, the numbers of captions and
cross-references ("Abbildung 3.2", "Satz 3.5"). Lines of numbers alone are left out before wrapped lines are joined,
a heading's section number is not part of the title, and a cross-reference's number neither makes a table row nor
counts as a sentence's figure.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

__all__ = ["KINDS", "normalize_line", "page_lines", "text_queries"]

KINDS = ("title_figures", "table_row", "sentence")
_NUMBER = re.compile(r"^[-+$€£(]*\d[\d,.]*%?[)]?$")
_WORD = re.compile(r"[^\W\d_](?:[^\W\d_]|['&.-])+")
# A heading's number: a section number ("3.2", "3.2.") after an optional page number (a running header "48 3.2.").
_SECTION = re.compile(r"^(?:\d{1,4}\s+)?\d{1,2}(?:\.\d{1,2})*\.?\s+(?=[^\W\d_])")
# A footnote's mark glued to the end of a sentence ("… enthält.2 Ist …"): it belongs to neither sentence.
_FOOTNOTE = re.compile(r"(?<=[^\d\s][.!?])\d{1,2}(?=\s)")
# Words whose number points elsewhere (a figure, a table, a section, a theorem, an equation, a page), not a figure.
_REFERENCES = frozenset({
    "abb", "abbildung", "fig", "figure", "tab", "tabelle", "table", "sec", "section", "abschnitt", "kap", "kapitel",
    "chapter", "satz", "lemma", "def", "definition", "theorem", "thm", "beispiel", "example", "bsp", "bemerkung",
    "remark", "korollar", "corollary", "proposition", "prop", "gleichung", "equation", "eq", "seite", "page",
    "aufgabe", "exercise"})


def normalize_line(line: str) -> str:
    """The form a line is compared in (boilerplate, duplicates): lower case, single spaces, no edge punctuation."""
    return " ".join(line.casefold().split()).strip(" .,:;|-")


def page_lines(text: str | None) -> list[str]:
    """The page's lines of text, stripped, without empty ones, and without the marks of hyphenation (a soft hyphen;
    pdfium's U+FFFE where it joins a word hyphenated across lines): "Abbil\ufffedung" is "Abbildung"."""
    text = (text or "").replace("\ufffe", "").replace("\u00ad", "")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


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
    """The heading: the first numbered heading, without its number ("3.2 Fundamentalgruppe" → "Fundamentalgruppe");
    else, of the lines of at most 12 tokens that neither end a sentence, nor lead into what follows (":", "=", ","),
    nor wrap onto the next line, nor hold a figure other than a year, the one with the most words of four letters or
    more (axis labels, table headers have few)."""
    best, score = None, (1, 0)
    for line in _paragraphs(lines):
        section = _SECTION.match(line)
        if section and line[section.end()].isupper():
            line = line[section.end():]
        else:
            section = None
        tokens = line.split()
        if (len(tokens) > 12 or not (line[-1].isalnum() or line.endswith(")"))
                or any(_figure(n) for n in _numbers(line)) or len(_numbers(line)) > len(tokens) // 3):
            continue
        if section:
            return line
        this = (sum(len(w) >= 4 for w in _words(line)), len(tokens))
        if this > score:
            best, score = line, this
    return best


def _is_reference(word: str) -> bool:
    return word.casefold().rstrip(".:") in _REFERENCES


def _table_rows(lines: list[str], skip: set[str]) -> list[tuple[str, list[str], list[str]]]:
    """Rows of a table as (label, column headers, figures): a line of a label then only figures, under a header line
    of short labels (one per figure, or one more for the label column). A caption or cross-reference ("Abbildung
    3.2") is no row, nor is a boilerplate line (in ``skip``); a header may be one (tables of a kind share theirs)."""
    out = []
    header: list[str] | None = None
    for line in lines:
        tokens = line.split()
        first = next((i for i, t in enumerate(tokens) if _is_number(_token(t))), len(tokens))
        label, figures = " ".join(tokens[:first]), [_token(t) for t in tokens[first:]]
        is_row = (first > 0 and figures and all(_is_number(f) and _figure(f) for f in figures)
                  and not _is_reference(tokens[first - 1]))
        if is_row and header and len(header) in (len(figures), len(figures) + 1):
            if normalize_line(line) not in skip:
                out.append((label, header[-len(figures):], figures))
        elif 2 <= len(tokens) <= 12 and not _numbers(line) and all(len(t) <= 12 and t[-1:].isalnum() or t == "($M)"
                                                                     for t in tokens):
            header = tokens  # a line of column labels, for the rows under it
        elif not is_row:
            header = None
    return out


def _paragraphs(lines: list[str]) -> list[str]:
    """Lines joined where a sentence wraps onto the next one (the next line starts in lower case). Lines of numbers
    alone (page, margin and line numbers, exponents, chart labels) are left out: they belong to no sentence, and a
    sentence wrapped around one is joined across it."""
    out: list[str] = []
    for line in lines:
        words = [t for t in line.split() if not _is_number(_token(t))]
        if not words:
            continue
        # "2 und ..." continues "Sei X = R": an exponent or a line number before a wrapped line's first word
        if out and not out[-1].endswith((".", "!", "?", ":")) and words[0][:1].islower():
            out[-1] += " " + line
        else:
            out.append(line)
    return out


def _sentences(lines: list[str]) -> list[str]:
    """Whole sentences (ending in . ! or ?, a decimal point inside) with a capitalised name beyond their first word,
    and a figure that is not a cross-reference's. Dot leaders (a table of contents: "Stetigkeit . . . 9") end none."""
    out = []
    for paragraph in _paragraphs(lines):
        paragraph = _FOOTNOTE.sub("", paragraph)
        for sentence in re.findall(r"(?:[^.!?]|(?<=\d)\.(?=\d))+(?:[.!?]|$)", paragraph):
            sentence = sentence.strip()
            tokens = sentence.split()
            if len(tokens) < 5 or not sentence.endswith((".", "!", "?")) or tokens[-1] in (".", "!", "?"):
                continue
            names = [t for t in tokens[1:] if t[:1].isupper() and _words(t)]
            figures = [_token(t) for i, t in enumerate(tokens) if _is_number(_token(t))
                       and not (i and _is_reference(tokens[i - 1]))]
            if names and any(_figure(n) or n.isdigit() for n in figures):
                out.append(sentence.rstrip("."))
    return out


def text_queries(text: str | None, *, n: int, seed: str, boilerplate: Iterable[str] = (),
                 kinds: Iterable[str] = KINDS, max_figures: int = 2) -> list[tuple[str, str]]:
    """Up to ``n`` (query, kind) spans of the page's text, chosen with a generator seeded by ``seed`` (the page's
    key: the same page gets the same queries); lines whose normalised form is in ``boilerplate`` are skipped."""
    skip = set(boilerplate)
    every = page_lines(text)
    lines = [line for line in every if normalize_line(line) not in skip]
    if not lines:
        return []
    rng = random.Random(seed)
    candidates: list[tuple[str, str]] = []
    kinds = set(kinds)
    rows = _table_rows(every, skip)
    title = _title(lines)
    if "title_figures" in kinds and title and rows:  # the figures of one row, never numbers from elsewhere
        label, _, figures = rows[rng.randrange(len(rows))]
        picked = sorted(rng.sample(range(len(figures)), min(max_figures, len(figures))))
        candidates.append((" ".join([title, label, *(figures[i] for i in picked)]), "title_figures"))
    elif "title_figures" in kinds and title:  # no table: the title alone ("Adatum Motors: revenue by quarter, 2019")
        candidates.append((title, "title_figures"))
    if "table_row" in kinds:  # under the page's heading, which says what the table is of
        for label, heads, figures in rows:
            row = " ".join([label, *(f"{h} {v}" for h, v in zip(heads, figures, strict=True))])
            candidates.append((f"{title}: {row}" if title else row, "table_row"))
    if "sentence" in kinds:
        candidates += [(s, "sentence") for s in _sentences(lines)]
    unique = list({normalize_line(q): (q, k) for q, k in candidates}.values())
    if len(unique) <= n:
        return unique
    return [unique[i] for i in sorted(rng.sample(range(len(unique)), n))]
