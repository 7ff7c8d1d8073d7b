"""The eval split's plan, without Ray: by document, page ranges inside large documents kept apart from their training
pages by a gap, `auto`'s fall-back from one to the other, and the warnings when the eval split is too small."""

from __future__ import annotations

import logging

import pytest

from ray_vdr.queries.split import EVAL, GAP, TRAIN, plan_split, short_eval_warning

# a 40-page manual holds most of the pages; two short notes hold 5; 3 candidate queries a page (none on page 20)
PAGES = {"manual.pdf": list(range(1, 41)), "notes-a.pdf": [1, 2], "notes-b.pdf": [1, 2, 3]}
COUNTS = {(d, p): 3 for d, pages in PAGES.items() for p in pages} | {("manual.pdf", 20): 0}
KW = {"eval_fraction": 0.1, "min_eval_rows": 20, "page_gap": 2, "seed": 0}


def _sides(plan, pages=PAGES) -> dict[tuple[str, int], str]:
    return {(d, p): plan.side(d, p) for d, ps in pages.items() for p in ps}


def test_by_document_warns_when_its_eval_split_is_too_small(caplog):
    with caplog.at_level(logging.WARNING, logger="ray_vdr.queries.split"):
        plan = plan_split(PAGES, COUNTS, mode="by_document", **KW)
    assert plan.mode == "by_document" and plan.eval_docs == {"notes-b.pdf"} and plan.eval_candidates == 9
    [warning] = plan.warnings
    assert "leaves 9 candidate queries" in warning and "min_eval_rows 20" in warning and "1 of 3 documents" in warning
    assert "queries.split=auto or page_range" in warning, "the remedy"
    assert [r.levelname for r in caplog.records] == ["WARNING"] and warning in caplog.text
    sides = _sides(plan)
    assert {s for (d, _), s in sides.items() if d == "notes-b.pdf"} == {EVAL}
    assert {s for (d, _), s in sides.items() if d != "notes-b.pdf"} == {TRAIN}


@pytest.mark.parametrize("mode", ["auto", "page_range"])
def test_page_ranges_hold_out_enough_rows_a_gap_apart_from_training_pages(mode, caplog):
    with caplog.at_level(logging.WARNING, logger="ray_vdr.queries.split"):
        plan = plan_split(PAGES, COUNTS, mode=mode, **KW)
    assert plan.mode == "page_range" and not plan.eval_docs and plan.eval_candidates >= 20
    assert plan == plan_split(PAGES, COUNTS, mode=mode, **KW), "a rerun plans the same split"
    sides = _sides(plan)
    eval_pages = sorted(p for (d, p), s in sides.items() if s == EVAL)
    train_pages = [p for (d, p), s in sides.items() if d == "manual.pdf" and s == TRAIN]
    assert {d for (d, _), s in sides.items() if s != TRAIN} == {"manual.pdf"}, "the short notes stay in train"
    assert eval_pages == list(range(eval_pages[0], eval_pages[-1] + 1)), "one contiguous range"
    assert plan.ranges == {"manual.pdf": (eval_pages[0], eval_pages[-1])}
    assert sum(COUNTS["manual.pdf", p] for p in eval_pages) == plan.eval_candidates
    assert min(abs(t - e) for t in train_pages for e in eval_pages) == 3, "2 pages between train and eval"
    gap = [p for (_, p), s in sides.items() if s == GAP]
    assert gap and all(min(abs(p - e) for e in eval_pages) <= 2 for p in gap), "in neither split"
    assert len(train_pages) >= len(eval_pages)
    if mode == "auto":  # it says why it left the split by document
        [warning] = plan.warnings
        assert "leaves 9 candidate queries" in warning and f"holding out {plan.eval_candidates}" in warning
        assert warning in caplog.text
    else:
        assert not plan.warnings and not caplog.records


def test_auto_keeps_documents_when_they_hold_enough_and_warns_when_short():
    reports = {f"report-{i:02d}.pdf": [1, 2, 3] for i in range(20)}
    counts = {(d, p): 3 for d in reports for p in reports[d]}
    enough = plan_split(reports, counts, mode="auto", **{**KW, "min_eval_rows": 18})
    assert enough.mode == "by_document" and len(enough.eval_docs) == 2 and not enough.warnings
    # 18 < 20 candidates, and no 3-page report has room for a range and its gaps: by document, with the warning
    short = plan_split(reports, counts, mode="auto", **KW)
    assert short.mode == "by_document" and short.eval_docs == enough.eval_docs
    assert "no document is large enough" in short.warnings[0]
    assert plan_split(reports, counts, mode="auto", **{**KW, "eval_fraction": 0}).eval_docs == frozenset()
    # after mining: the eval rows actually made, against the same bar
    assert short_eval_warning(enough, 18, 18) is None
    warning = short_eval_warning(enough, 7, 18)
    assert "holds 7 rows (min_eval_rows 18; 18 candidate queries" in warning and "split=auto or page_range" in warning


def test_cli_prints_the_split_warnings(monkeypatch, capsys):
    import ray_vdr.queries.run
    from ray_vdr.cli import main
    from ray_vdr.queries.run import TrainingDataResult

    warning = "the split by document leaves 1 candidate queries for the eval split (min_eval_rows 50) in 1 of 3 ..."
    summary = {"pages": {"in": 3, "kept": 3, "rejected": 0, "rejected_by_reason": {}},
               "splits": {"train": 231, "eval": 1},
               "queries": {"generated": 240, "rejected_by_reason": {}}, "consistency": "off",
               "rates": {"pages_per_second": 1.0, "queries_per_second": 3.0}, "seconds": {"total": 5.0},
               "split": {"warnings": [warning]}}
    monkeypatch.setattr(ray_vdr.queries.run, "run", lambda cfg: TrainingDataResult("out", summary, "out/README.md"))
    assert main(["make-training-data", "queries.sources=[docs]"]) == 0
    assert f"WARNING: {warning}" in capsys.readouterr().out.splitlines()
