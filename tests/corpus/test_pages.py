"""Source listing and page expansion: every input page becomes a page or a reject with its reason (no Ray)."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image

from ray_vdr.config import ImageLimits
from ray_vdr.corpus.pages import expand_file, list_sources
from tests.corpus_helpers import write_corpus


def _expand_all(root, known=lambda key: False, dpi=100):
    rows = []
    for f in list_sources([str(root)]):
        rows += list(expand_file(f, dpi=dpi, limits=ImageLimits(), known=known))
    return rows


def test_every_input_page_is_a_page_or_a_reject_with_its_reason(tmp_path, page_pngs):
    expected = write_corpus(tmp_path, page_pngs)
    rows = _expand_all(tmp_path)
    pages = [r for r in rows if r["reason"] is None]
    rejects = [r for r in rows if r["reason"] is not None]
    assert len(pages) == expected["pages"] and len(pages) + len(rejects) == expected["inputs"]
    assert Counter(r["reason"] for r in rejects) == expected["rejects"]
    assert len({r["key"] for r in rows}) == len(rows)  # one key per page
    pdf = sorted((r["doc_id"], r["page"]) for r in pages if r["source"].endswith("report.pdf"))
    assert pdf == [("report.pdf", p) for p in (1, 2, 3, 4)]
    assert sorted(r["doc_id"] for r in pages if r["source"].endswith(".parquet")) == ["table-0", "table-1", "table-2"]
    assert any(r["doc_id"] == "scans/2021/page-001.png" for r in pages)
    for r in pages:
        assert r["image"] and r["thumbnail"] is None and r["width"] >= 16 and r["height"] >= 16
        # the embedder gets the decoded page, and what is stored decodes to exactly that
        assert Image.open(io.BytesIO(r["image"])).convert("RGB").tobytes() == r["pixels"]
    png = next(r for r in pages if r["doc_id"] == "scans/2021/page-001.png")
    assert png["image"] == (tmp_path / "scans" / "2021" / "page-001.png").read_bytes()  # stored as it came
    poster = next(r for r in rejects if r["reason"] == "page_too_large")
    assert poster["page"] == 1 and "max_pixels" in poster["detail"]


def test_known_pages_are_skipped_before_decoding(tmp_path, page_pngs):
    write_corpus(tmp_path, page_pngs)
    first = _expand_all(tmp_path)
    done = {r["key"] for r in first[::2]}
    again = _expand_all(tmp_path, known=done.__contains__)
    assert {r["key"] for r in again} == {r["key"] for r in first} - done


def test_pdf_page_keys_follow_the_dpi(tmp_path, page_pngs):
    write_corpus(tmp_path, page_pngs, bad=False)
    at = {dpi: {r["key"] for r in _expand_all(tmp_path, dpi=dpi) if r["source"].endswith(".pdf")} for dpi in (72, 100)}
    assert len(at[72]) == len(at[100]) == 4 and not at[72] & at[100]  # another rasterisation is another page


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_sources([str(tmp_path / "nope")])


def _text_pdf(path, lines: list[str]) -> None:
    """A vector PDF whose text pypdfium2 extracts (matplotlib writes TrueType text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"pdf.fonttype": 42}):
        fig = plt.figure(figsize=(4, 5))
        for i, line in enumerate(lines):
            fig.text(0.05, 0.9 - 0.1 * i, line)
        fig.savefig(path, format="pdf")
        plt.close(fig)


def test_every_page_carries_its_own_text(tmp_path, page_pngs):
    """A PDF page's text layer, an image's sidecar <file>.txt and a Parquet text column come with the page; a .txt
    without its image is still an unsupported file, and a scanned page (no text layer) has none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _text_pdf(tmp_path / "report.pdf", ["Northwind Logistics 2021", "Revenue 512.3"])
    (tmp_path / "scan.png").write_bytes(page_pngs[0])
    (tmp_path / "scan.png.txt").write_text("Contoso Foods\r\nannual report 2019\n")
    (tmp_path / "plain.png").write_bytes(page_pngs[1])
    (tmp_path / "notes.txt").write_text("not a page")
    pq.write_table(pa.table({"image": [page_pngs[2]], "text": ["Fabrikam memo"]}), tmp_path / "rows.parquet")
    from tests.corpus_helpers import images_pdf

    (tmp_path / "scanned.pdf").write_bytes(images_pdf([page_pngs[3]]))
    sources = list_sources([str(tmp_path)])
    assert [f.doc_id for f in sources] == ["notes.txt", "plain.png", "report.pdf", "rows.parquet", "scan.png",
                                           "scanned.pdf"], "a sidecar travels with its image"
    text = {r["doc_id"]: r["text"] for r in _expand_all(tmp_path) if r["reason"] is None}
    assert text["report.pdf"].splitlines() == ["Northwind Logistics 2021", "Revenue 512.3"]
    assert text["scan.png"] == "Contoso Foods\nannual report 2019"
    assert text["rows.parquet#1"] == "Fabrikam memo"
    assert text["plain.png"] is None and text["scanned.pdf"] is None
    assert [r["reason"] for r in _expand_all(tmp_path) if r["doc_id"] == "notes.txt"] == ["unsupported_file_type"]
    single = list_sources([str(tmp_path / "scan.png")])[0]
    assert single.sidecar == str(tmp_path / "scan.png.txt")
