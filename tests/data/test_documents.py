"""Synthetic unlabeled documents: vector PDFs whose text layer names the company, year and figures, and a held-out
labelled eval split from other companies' documents (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from ray_vdr.config import DataConfig, SyntheticConfig
from ray_vdr.data.documents import write_documents
from ray_vdr.data.triplets import TripletSpec, validate_batch


def test_documents_have_a_text_layer_and_a_heldout_eval_split(tmp_path):
    import pypdfium2 as pdfium

    cfg = SyntheticConfig(output_dir=str(tmp_path / "a"), kind="documents", documents=4, heldout_documents=3,
                          pages_per_document=3, page_width=224, page_height=288, seed=5)
    summary = write_documents(cfg)
    assert summary.document_pages == 12 and summary.heldout_queries == 9
    docs = sorted((tmp_path / "a" / "documents").glob("*.pdf"))
    heldout = sorted((tmp_path / "a" / "heldout" / "documents").glob("*.pdf"))
    assert len(docs) == 4 and len(heldout) == 3
    assert not {p.name for p in docs} & {p.name for p in heldout}, "a held-out company is never a training document"
    pdf = pdfium.PdfDocument(str(docs[0]))
    years = []
    for page in pdf:
        text = page.get_textpage().get_text_range()
        years.append(next(w for w in text.split() if w.isdigit() and len(w) == 4))
        assert "Annual report" in text and "confidential" in text
    assert len(set(years)) == 3, "one year per page"
    company = " ".join(w.capitalize() for w in docs[0].stem.split("-"))
    assert company.split()[0] in pdf[0].get_textpage().get_text_range()

    # the held-out split is a valid eval split: a query, its page, 4 negatives of other companies
    table = pq.read_table(tmp_path / "a" / "heldout" / "eval")
    accepted, rejects = validate_batch(table, TripletSpec.from_config(DataConfig(), split="eval"))
    assert accepted.num_rows == 9 and not rejects
    assert all(q.endswith("?") for q in table.column("query").to_pylist())

    # the same seed writes the same bytes (stable page keys); another seed other documents
    write_documents(cfg.model_copy(update={"output_dir": str(tmp_path / "b")}))
    again = sorted(Path(tmp_path / "b" / "documents").glob("*.pdf"))
    assert [p.read_bytes() for p in docs] == [p.read_bytes() for p in again]
