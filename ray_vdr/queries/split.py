"""The eval split of made training data, planned from each page's count of candidate queries (pure, no Ray).

``queries.split``:

- ``by_document``: ``eval_fraction`` of the documents form the eval split; no document is in both splits.
- ``page_range``: inside each large document, a contiguous range of pages forms the eval split, kept apart from the
  document's training pages by ``page_gap`` pages on each side, whose queries are dropped (reason ``split_gap``):
  neighbouring pages share their text, and a query of one would find the other. A range starts as ``eval_fraction`` of
  its document's pages and grows, largest document first, until the ranges hold ``min_eval_rows`` candidate queries
  or no document has room (a document keeps at least as many training pages as eval pages). Smaller documents stay
  in train.
- ``auto``: by document, unless its eval documents hold fewer than ``min_eval_rows`` candidate queries (one document
  holding most of the pages): then page ranges, where they hold more.

A split that holds fewer than ``min_eval_rows`` candidates is logged as a WARNING, with the numbers and the remedy,
and the warning goes into the summary and the card. Candidates are counted before the consistency filter and the
negatives, which drop some: the driver checks the eval rows it finally has against the same bar.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["EVAL", "GAP", "TRAIN", "SplitPlan", "eval_documents", "plan_split", "short_eval_warning"]

TRAIN, EVAL, GAP = "train", "eval", "gap"


def _draw(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()


def eval_documents(docs: list[str], fraction: float, seed: int) -> list[str]:
    """The documents whose queries form the eval split: ``fraction`` of them (at least one when the fraction is not
    0 and there are two or more), chosen by a seeded hash of their ids, so the choice is stable as documents come
    and go."""
    if fraction <= 0 or len(docs) < 2:
        return []
    n = min(len(docs) - 1, max(1, math.ceil(fraction * len(docs))))
    return sorted(docs, key=lambda d: _draw(seed, d))[:n]


@dataclass(frozen=True)
class SplitPlan:
    """Which pages are eval, which train, and which lie in a gap between them."""

    mode: str  # the split used: "by_document" or "page_range"
    eval_docs: frozenset[str] = frozenset()
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # document → its first and last eval page
    page_gap: int = 0
    eval_candidates: int = 0  # candidate queries on the eval pages
    warnings: tuple[str, ...] = ()

    def side(self, doc_id: str, page: int) -> str:
        """TRAIN, EVAL or GAP (a page within ``page_gap`` pages of its document's eval range: in neither split)."""
        if doc_id in self.eval_docs:
            return EVAL
        if (r := self.ranges.get(doc_id)) is None:
            return TRAIN
        if r[0] <= page <= r[1]:
            return EVAL
        return GAP if r[0] - self.page_gap <= page <= r[1] + self.page_gap else TRAIN

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "eval_documents": len(self.eval_docs), "page_gap": self.page_gap,
                "eval_ranges": {d: list(r) for d, r in sorted(self.ranges.items())},
                "eval_candidates": self.eval_candidates}


def _by_document(pages: Mapping[str, list[int]], counts: Mapping[tuple[str, int], int], fraction: float,
                 seed: int) -> SplitPlan:
    docs = eval_documents(sorted(pages), fraction, seed)
    return SplitPlan("by_document", frozenset(docs),
                     eval_candidates=sum(counts.get((d, p), 0) for d in docs for p in pages[d]))


def _page_ranges(pages: Mapping[str, list[int]], counts: Mapping[tuple[str, int], int], fraction: float,
                 gap: int, target: int, seed: int) -> SplitPlan:
    """One contiguous eval range per large document (module doc), placed at a seeded position."""
    span = {d: (min(p), max(p)) for d, p in pages.items() if p}

    def fits(doc: str, size: int) -> bool:  # as many training pages as eval pages, even with a gap on both sides
        lo, hi = span[doc]
        return hi - lo + 1 >= 2 * size + 2 * gap

    def place(doc: str, size: int) -> tuple[int, int]:
        lo, hi = span[doc]
        start = lo + int.from_bytes(_draw(seed, doc), "big") % (hi - lo + 2 - size)
        return start, start + size - 1

    def held(doc: str, r: tuple[int, int]) -> int:
        return sum(counts.get((doc, p), 0) for p in pages[doc] if r[0] <= p <= r[1])

    sizes = {d: max(1, math.ceil(fraction * (hi - lo + 1))) for d, (lo, hi) in span.items()}
    sizes = {d: s for d, s in sizes.items() if fits(d, s)}
    ranges = {d: place(d, s) for d, s in sizes.items()}
    total = sum(held(d, r) for d, r in ranges.items())
    while total < target:  # grow the range of the largest document with room, one page at a time
        room = sorted((d for d, s in sizes.items() if fits(d, s + 1)), key=lambda d: (span[d][0] - span[d][1], d))
        if not room:
            break
        d = room[0]
        total -= held(d, ranges[d])
        sizes[d] += 1
        ranges[d] = place(d, sizes[d])
        total += held(d, ranges[d])
    return SplitPlan("page_range", ranges=ranges, page_gap=gap, eval_candidates=total)


def plan_split(pages: Mapping[str, list[int]], counts: Mapping[tuple[str, int], int], *, mode: str,
               eval_fraction: float, min_eval_rows: int, page_gap: int, seed: int) -> SplitPlan:
    """The split of ``pages`` ({document: its page numbers}) given ``counts`` ({(document, page): candidate queries})
    for ``queries.split`` = ``mode`` (module doc). Warnings are logged and kept in the plan."""
    if eval_fraction <= 0:
        return SplitPlan("by_document")
    n_docs = len(pages)
    by_doc = _by_document(pages, counts, eval_fraction, seed)
    short = (f"the split by document leaves {by_doc.eval_candidates} candidate queries for the eval split "
             f"(min_eval_rows {min_eval_rows}) in {len(by_doc.eval_docs)} of {n_docs} documents "
             f"(eval_fraction {eval_fraction})")
    plan, warning = by_doc, None
    if mode != "by_document":
        ranged = _page_ranges(pages, counts, eval_fraction, page_gap, min_eval_rows, seed)
        where = (f"{ranged.eval_candidates} candidate queries in page ranges inside {len(ranged.ranges)} large "
                 f"document(s), {page_gap} pages apart from their training pages")
        if mode == "page_range":
            plan = ranged
            if ranged.eval_candidates < min_eval_rows:
                warning = (f"the split by page range holds out {where} (min_eval_rows {min_eval_rows}): raise "
                           "queries.eval_fraction, lower queries.page_gap, or add documents")
        elif by_doc.eval_candidates < min_eval_rows and ranged.eval_candidates > by_doc.eval_candidates:
            plan = ranged
            warning = f"{short}: holding out {where} instead (queries.split auto)"
            if ranged.eval_candidates < min_eval_rows:
                warning += "; still short: raise queries.eval_fraction, lower queries.page_gap, or add documents"
        elif by_doc.eval_candidates < min_eval_rows:
            warning = (f"{short}, and no document is large enough for a page-range hold-out (a document of n pages "
                       f"holds out at most (n - 2 x page_gap) / 2): add documents or raise queries.eval_fraction")
    elif by_doc.eval_candidates < min_eval_rows:
        warning = (f"{short}: set queries.split=auto or page_range to hold out page ranges inside large documents, "
                   "raise queries.eval_fraction, or add documents")
    if warning:
        logger.warning("eval split: %s", warning)
        plan = replace(plan, warnings=(warning,))
    return plan


def short_eval_warning(plan: SplitPlan, eval_rows: int, min_eval_rows: int) -> str | None:
    """The warning (logged) when the finished eval split holds fewer than ``min_eval_rows`` rows, else None."""
    if eval_rows >= min_eval_rows:
        return None
    warning = (f"the eval split holds {eval_rows} rows (min_eval_rows {min_eval_rows}; {plan.eval_candidates} "
               f"candidate queries on its pages before the consistency filter and the negatives, split {plan.mode}): "
               + ("set queries.split=auto or page_range, " if plan.mode == "by_document" else "")
               + "raise queries.eval_fraction, loosen queries.consistency_k, or add documents")
    logger.warning("eval split: %s", warning)
    return warning
