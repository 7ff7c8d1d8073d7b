"""`ray-vdr make-training-data` on a real local Ray cluster: unlabeled PDFs (and a scan, an image with a sidecar text,
an encrypted and a corrupt PDF) → queries → filters → mined negatives → train/eval split by document. Every page is
kept or rejected with its reason, every generated query is in exactly one place, after a killed mining actor and
after an interrupted run; the splits are what the trainers read; a rerun does nothing twice."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_vdr.config import DataConfig, SyntheticConfig, load_config
from tests.corpus_helpers import CORRUPT_PDF, ENCRYPTED_PDF, images_pdf

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sources(tmp_path_factory, page_pngs):
    """6 company reports (3 pages each) and the odd ones: a scan without text, an image with its sidecar text, an
    image without, an encrypted and a corrupt PDF."""
    from ray_vdr.data.documents import write_documents

    root = tmp_path_factory.mktemp("own-docs")
    write_documents(SyntheticConfig(output_dir=str(root / "made"), kind="documents", documents=6, heldout_documents=3,
                                    pages_per_document=3, page_width=224, page_height=288, seed=7))
    src = root / "sources"
    (root / "made" / "documents").rename(src)
    (src / "scan.pdf").write_bytes(images_pdf([page_pngs[0]]))
    (src / "photo.png").write_bytes(page_pngs[1])
    (src / "photo.png.txt").write_text("Contoso Foods annual report 2019\nIn 2019, Contoso Foods opened 88 new stores "
                                       "and hired 1,204 people.\n")
    (src / "plain.png").write_bytes(page_pngs[2])
    (src / "locked.pdf").write_bytes(ENCRYPTED_PDF)
    (src / "damaged.pdf").write_bytes(CORRUPT_PDF)
    return src


def _cfg(tiny_qwen, sources, out, *extra):
    return load_config(ROOT / "configs/demo.yaml", [
        f"queries.sources=[{sources}]", f"queries.output={out}", f"queries.base_model={tiny_qwen}",
        "queries.consistency_k=12", "queries.eval_fraction=0.3", "queries.batch_size=8", "index.batch_size=8",
        "index.dim=32", "index.cpus_per_actor=0.5", "index.decode_cpus=0.25", "mine.rank_max=100", "mine.margin=null",
        "mine.duplicate_similarity=1.0", "mine.cpus_per_actor=0.5", "data.cpus_per_task=0.25",
        "queries.cpus_per_task=0.25", "synthetic=null", *extra])


def _ids(out: Path, folder: str) -> list[str]:
    if not (out / folder).is_dir():
        return []
    return pq.read_table(out / folder, columns=["row_id"]).column("row_id").to_pylist()


def _check_exactly_once(out: Path, summary: dict) -> None:
    """Every page kept or rejected once; every generated query in train, eval or a mining/dedupe reject, once."""
    pages = summary["pages"]
    rejected = pq.read_table(out / "rejected-pages.parquet").to_pylist()
    kept = {r["page_key"] for split in ("train", "eval") if (out / split).is_dir()
            for r in pq.read_table(out / split, columns=["page_key"]).to_pylist()}
    assert pages["in"] == pages["kept"] + pages["rejected"] == len(kept) + len(rejected)
    assert len({r["key"] for r in rejected}) == len(rejected) and not kept & {r["key"] for r in rejected}
    generated = pq.read_table(out / "generated").to_pylist()
    candidates = [r["row_id"] for r in generated if r["reason"] is None]
    placed = _ids(out, "train") + _ids(out, "eval") + _ids(out, "rejects")
    assert len(candidates) == len(set(candidates)) and sorted(placed) == sorted(candidates)
    parts_of = Counter(key for part in (out / "generated").glob("part-*.parquet")
                       for key in set(pq.read_table(part, columns=["page_key"]).column("page_key").to_pylist()))
    assert set(parts_of.values()) == {1}, "each page's generation is in exactly one part"


def test_unlabeled_documents_become_a_training_set(ray_local, tiny_qwen, sources, tmp_path):
    from ray_vdr.corpus.store import IndexMismatch
    from ray_vdr.data.triplets import TripletSpec, validate_batch
    from ray_vdr.queries.run import run

    out = tmp_path / "training-data"
    marker = tmp_path / "killed"
    result = run(_cfg(tiny_qwen, sources, out), chaos={"after_batches": 1, "marker": str(marker)})
    assert marker.exists(), "a mining actor was killed after its first batch"
    s = result.summary
    _check_exactly_once(out, s)

    # every page: 6 x 3 report pages, the scan, two images; plus the two PDFs the corpus job refuses
    assert s["pages"]["in"] == 18 + 3 + 2 and s["documents"] == 9
    reasons = Counter((r["stage"], r["reason"]) for r in pq.read_table(out / "rejected-pages.parquet").to_pylist())
    assert reasons[("corpus", "encrypted_pdf")] == reasons[("corpus", "corrupt_pdf")] == 1
    assert reasons[("generate", "no_text")] == 2, "the scan and the image without text"
    candidates = [r for r in pq.read_table(out / "generated").to_pylist() if r["reason"] is None]
    assert any(c["doc_id"] == "photo.png" and "Contoso Foods" in c["query"] for c in candidates), "sidecar text"
    assert {c["query_source"].split(":")[0] for c in candidates} == {"text"}
    assert s["queries"]["rejected_by_reason"].get("inconsistent", 0) > 0, "the consistency filter rejected some"
    assert s["consistency_kept"] + s["queries"]["rejected_by_reason"].get("inconsistent", 0) == s["consistency_checked"]

    # split by document, negatives mined from other documents, in the layout the trainers read
    train, evals = pq.read_table(out / "train").to_pylist(), pq.read_table(out / "eval").to_pylist()
    assert train and evals and not {r["doc_id"] for r in train} & {r["doc_id"] for r in evals}
    for row in train + evals:
        negatives = [row[c] for c in row if c.startswith("negative_") and c[-1].isdigit()]
        assert row["image"] not in negatives and row["doc_id"] not in row["negative_doc_ids"]
        assert row["positive_rank"] <= 12
    assert all(r["negative_3"] for r in evals) and "negative_1" not in train[0], "4 negatives in eval, 1 in train"
    for split, k in (("train", 1), ("eval", 4)):
        table = pq.read_table(out / split)
        spec = TripletSpec.from_config(DataConfig(num_negatives=k, eval_num_negatives=k), split="train")
        accepted, rejects = validate_batch(table, spec)
        assert accepted.num_rows == table.num_rows and not rejects

    # the card: a Hugging Face dataset card and every count
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nconfigs:") and "path: train/*.parquet" in readme and "inconsistent" in readme
    assert json.loads((out / "card.json").read_text())["pages"] == s["pages"]

    # an interrupted run: the last mining parts and a generation part are lost; the rerun redoes exactly those
    lost = sorted((out / "train").glob("part-*.parquet"))[-1]
    lost_rows = pq.read_table(lost).num_rows
    lost.unlink()
    gen_part = sorted((out / "generated").glob("part-*.parquet"))[0]
    lost_pages = {r["page_key"] for r in pq.read_table(gen_part).to_pylist()}
    gen_part.unlink()
    again = run(_cfg(tiny_qwen, sources, out)).summary
    assert again["this_run"]["pages_generated_for"] == len(lost_pages)
    assert again["this_run"]["queries_mined"] >= lost_rows
    _check_exactly_once(out, again)
    assert again["pages"] == s["pages"] and again["splits"] == s["splits"]
    finished = run(_cfg(tiny_qwen, sources, out)).summary
    assert finished["this_run"] == {"pages_generated_for": 0, "queries_mined": 0}, "nothing is done twice"

    # data made with other settings is never mixed into the same output
    with pytest.raises(IndexMismatch, match="per_page"):
        run(_cfg(tiny_qwen, sources, out, "queries.per_page=1"))


def test_one_large_document_gets_a_page_range_eval_split(ray_local, tiny_qwen, sources, tmp_path):
    """A folder where one document holds most pages (a user's: 1 eval row, 231 train rows): split auto warns that the
    split by document leaves too few eval rows and holds out a page range of the large document instead, a gap of
    pages apart from its training pages."""
    import shutil

    import pypdfium2 as pdfium

    from ray_vdr.queries.run import run

    reports = sorted(p for p in sources.glob("*.pdf") if p.name not in ("scan.pdf", "locked.pdf", "damaged.pdf"))
    src = tmp_path / "src"
    src.mkdir()
    manual = pdfium.PdfDocument.new()
    for path in reports[:5]:
        manual.import_pages(pdfium.PdfDocument(path))
    manual.save(src / "manual.pdf")  # 15 pages; a 3-page report and an image with its text are the small ones
    shutil.copy(reports[5], src / "report.pdf")
    for name in ("photo.png", "photo.png.txt"):
        shutil.copy(sources / name, src / name)
    out = tmp_path / "ranged"
    s = run(_cfg(tiny_qwen, src, out, "queries.consistency_k=null", "queries.min_eval_rows=6", "queries.page_gap=1",
                 "queries.eval_negatives=2")).summary
    _check_exactly_once(out, s)
    split = s["split"]
    assert (split["requested"], split["mode"], list(split["eval_ranges"])) == ("auto", "page_range", ["manual.pdf"])
    [warning] = split["warnings"]
    assert "1 of 3 documents" in warning and "holding out" in warning, "the split by document held out photo.png"
    assert f"> **Warning**: {warning}" in (out / "README.md").read_text()
    assert s["splits"]["eval"] >= 6 and s["queries"]["rejected_by_reason"]["split_gap"] > 0
    first, last = split["eval_ranges"]["manual.pdf"]
    evals = pq.read_table(out / "eval", columns=["doc_id", "page"]).to_pylist()
    assert {r["doc_id"] for r in evals} == {"manual.pdf"} and all(first <= r["page"] <= last for r in evals)
    train = pq.read_table(out / "train", columns=["doc_id", "page"]).to_pylist()
    assert {r["doc_id"] for r in train} == {"manual.pdf", "report.pdf", "photo.png"}
    assert all(r["page"] < first - 1 or r["page"] > last + 1 for r in train if r["doc_id"] == "manual.pdf")


def test_vlm_generator_pipeline(ray_local, tiny_qwen, sources, tmp_path):
    """A generative VLM (a tiny random-weight Qwen3-VL chat model: its text is gibberish) writes the questions in an
    actor pool; every page ends up with candidates or a reject with the reason, and the counts add up."""
    from ray_vdr.queries.run import run

    out = tmp_path / "vlm-data"
    cfg = _cfg(tiny_qwen, sources, out, "queries.generator=vlm", f"queries.vlm.model={tmp_path / 'tiny-vlm'}",
               "queries.vlm.builder=tiny-qwen3vl-generator", "queries.vlm.max_tokens=24", "queries.vlm.batch_size=4",
               "queries.vlm.cpus_per_actor=0.5", "queries.consistency_k=null", "queries.min_words=1")
    s = run(cfg).summary
    _check_exactly_once(out, s)
    rows = pq.read_table(out / "generated").to_pylist()
    assert {r["query_source"] for r in rows if r["query"] is not None} <= {"vlm"}
    assert {r["reason"] for r in rows if r["query"] is None} <= {"no_usable_question", "no_query"}
    assert len({r["page_key"] for r in rows}) == 21, "every indexed page went through the VLM (the scan, the images)"
    assert s["consistency"] == "off" and "The consistency filter was off." in (out / "README.md").read_text()
