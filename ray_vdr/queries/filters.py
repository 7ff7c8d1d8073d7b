"""The filters generated queries pass, as pure functions (no Ray): each names the reason it rejects a query for.

- :func:`length_problem`: empty, too short or too long;
- :func:`boilerplate_lines` / :func:`is_boilerplate`: text that repeats on many pages (headers, footers,
  disclaimers) singles no page out;
- :func:`query_key`: the form duplicates are found in (a query generated for two pages singles out neither);
- :func:`parse_questions`: the questions in a generative model's answer (numbering, bullets and quotes removed).

The consistency filter (the base embedder must rank the query's own page within the top k of the corpus) needs the
index, and runs with the mining (:mod:`ray_vdr.queries.pairs`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ray_vdr.queries.text import normalize_line

__all__ = ["boilerplate_lines", "is_boilerplate", "length_problem", "parse_questions", "per_page_unique",
           "query_key"]


def length_problem(query: str | None, *, min_words: int, max_words: int, max_chars: int) -> tuple[str, str] | None:
    """(reason, detail) when the query is empty, too short or too long; None when it is fine."""
    text = (query or "").strip()
    if not text:
        return "empty_query", "no text"
    if len(text) > max_chars:
        return "query_too_long", f"{len(text)} characters > {max_chars}"
    words = len(text.split())
    if words < min_words:
        return "query_too_short", f"{words} words < {min_words}"
    if words > max_words:
        return "query_too_long", f"{words} words > {max_words}"
    return None


def query_key(query: str) -> str:
    """The form queries are compared in: normalised case and spaces, no edge punctuation or question mark."""
    return normalize_line(query).rstrip("?").strip()


def boilerplate_lines(line_pages: dict[str, int], pages: int, *, share: float, min_pages: int) -> set[str]:
    """The normalised lines found on at least ``share`` of the ``pages`` (and on ``min_pages`` at least), from
    {line: number of pages it is on}."""
    bar = max(min_pages, share * pages)
    return {line for line, n in line_pages.items() if n >= bar}


def is_boilerplate(query: str, boilerplate: set[str]) -> bool:
    """A query that is, or is part of, a boilerplate line (a header, a footer, a disclaimer)."""
    key = normalize_line(query)
    if key in boilerplate:
        return True
    return len(key) >= 12 and any(key in line for line in boilerplate)


_BULLET = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,2}[.):]|q\d{1,2}[.):]|question\s*\d*\s*[.):]?)\s*", re.IGNORECASE)


def parse_questions(answer: str | None) -> list[str]:
    """The questions in a generative model's answer: one per line, numbering, bullets and quotes stripped; lines that
    hold no word are dropped. A line need not end with a question mark (searches often do not)."""
    out = []
    for line in (answer or "").splitlines():
        text = _BULLET.sub("", line).strip().strip("\"'`").strip()
        if re.search(r"[^\W\d_]{2,}", text):
            out.append(text)
    return list(dict.fromkeys(out))


def per_page_unique(queries: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(query, source) pairs of one page with repeats removed (the first of each query key is kept)."""
    seen: set[str] = set()
    out = []
    for query, source in queries:
        if (key := query_key(query)) not in seen:
            seen.add(key)
            out.append((query, source))
    return out
