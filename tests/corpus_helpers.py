"""Test corpora: page images, PDFs (good, encrypted, empty, corrupt, huge) and Parquet, written to a folder."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def pdf_bytes(objects: list[str], trailer_extra: str = "") -> bytes:
    """A hand-written PDF from object bodies (object 1 is the catalog), with a correct xref table."""
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R {trailer_extra}>>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


CATALOG = "<< /Type /Catalog /Pages 2 0 R >>"
ONE_PAGE = ["<< /Type /Pages /Kids [3 0 R] /Count 1 >>", "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>"]
# the standard security handler with a user password: PDFium cannot open it without the password
ENCRYPTED_PDF = pdf_bytes([CATALOG, *ONE_PAGE, "<< /Filter /Standard /V 1 /R 2 /O <" + "11" * 32 + "> /U <"
                           + "22" * 32 + "> /P -44 >>"],
                          "/Encrypt 4 0 R /ID [<" + "33" * 16 + "> <" + "33" * 16 + ">] ")
EMPTY_PDF = pdf_bytes([CATALOG, "<< /Type /Pages /Kids [] /Count 0 >>"])
CORRUPT_PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8


def images_pdf(pngs: list[bytes], resolution: float = 100.0) -> bytes:
    """A PDF with one page per image (PIL's PDF writer); ``resolution`` sets the page size in dots per inch."""
    pages = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    buf = io.BytesIO()
    pages[0].save(buf, format="PDF", save_all=True, append_images=pages[1:], resolution=resolution)
    return buf.getvalue()


def write_corpus(root: Path, pngs: list[bytes], *, bad: bool = True) -> dict:
    """Lay out a mixed corpus under ``root``; returns the expected page counts.

    Good: ``len(pngs) - 7`` image files in two folders, a 4-page PDF, and a Parquet file with 3 pages (with doc ids).
    Bad (one reject each): a corrupt PNG, a text file, an encrypted, an empty and a corrupt PDF, and a PDF whose
    one page is far too large at any sane dpi.
    """
    assert len(pngs) >= 10
    (root / "scans" / "2021").mkdir(parents=True, exist_ok=True)
    singles, pdf_pages, table_pages = pngs[:-7], pngs[-7:-3], pngs[-3:]
    for i, png in enumerate(singles):
        (root / "scans" / ("2021" if i % 2 else "") / f"page-{i:03d}.png").write_bytes(png)
    (root / "report.pdf").write_bytes(images_pdf(pdf_pages))
    pq.write_table(pa.table({"doc_id": [f"table-{i}" for i in range(3)], "image": table_pages}),
                   root / "pages.parquet")
    good = len(singles) + len(pdf_pages) + len(table_pages)
    rejects = {}
    if bad:
        (root / "broken.png").write_bytes(pngs[0][: len(pngs[0]) // 3])
        (root / "notes.txt").write_text("not a page")
        (root / "locked.pdf").write_bytes(ENCRYPTED_PDF)
        (root / "empty.pdf").write_bytes(EMPTY_PDF)
        (root / "damaged.pdf").write_bytes(CORRUPT_PDF)
        # a 224x288 px page at 0.5 dpi: 448 x 576 inches, 2.6 G pixels at 100 dpi
        (root / "poster.pdf").write_bytes(images_pdf([pngs[0]], resolution=0.5))
        rejects = {"corrupt_image": 1, "unsupported_file_type": 1, "encrypted_pdf": 1, "empty_pdf": 1,
                   "corrupt_pdf": 1, "page_too_large": 1}
    return {"pages": good, "rejects": rejects, "inputs": good + sum(rejects.values())}


def tiny_versioned_index(out: Path, docs: int, pages_per_doc: int, dim: int = 16, seed: int = 0, *, shards: int = 1,
                         parts: int = 1, index: dict | None = None, late=None) -> Path:
    """Version 1 of an index over random page vectors (no model, no Ray): ``docs`` documents ``doc-<i>`` of
    ``pages_per_doc`` pages each, in ``parts`` page parts (documents dealt round-robin), with metadata
    ``{"collection": "c<i % 2>"}``; ``shards`` index shards (built in this process); ``index``: IndexConfig
    overrides. ``late`` (a LateIndexSpec): a multi-vector index, each page 12 random ``late.token_dim``-d token
    vectors (stored as it says; the page's vector is their FDE)."""

    import numpy as np

    from ray_vdr.config import IndexConfig
    from ray_vdr.corpus.build import build_version
    from ray_vdr.corpus.manifest import IndexManifest
    from ray_vdr.corpus.shards import build_sharded
    from ray_vdr.corpus.versions import docs_table, live_ids, publish
    from ray_vdr.models.binding import EmbedderBinding

    rng = np.random.default_rng(seed)
    tables, doc_rows = [[] for _ in range(parts)], []
    for d in range(docs):
        doc, rows = page_rows(out, d, pages_per_doc, dim, rng, late)
        doc_rows.append(doc)
        tables[d % parts] += rows
    if late is not None:
        dim = late.fde_dim
    names = [write_page_part(out, rows, dim) for rows in tables if rows]
    cfg = IndexConfig.model_validate({**(index or {}), "shards": shards})
    if shards > 1:
        fields, ids = build_sharded(str(out), sorted(names), dim, cfg, None, 1, shards)
    else:
        fields, ids = build_version(str(out), sorted(names), dim, cfg.model_dump(), None, 1)
    files = fields.pop("files")
    docs_t = docs_table(doc_rows)
    manifest = IndexManifest(model=EmbedderBinding(path="none", fingerprint="none", multi_vector=late is not None),
                             dim=late.token_dim if late else dim, late=late, **fields, version=1, files=files)
    publish(str(out), manifest, docs_t, live_ids(ids, docs_t), None)
    return out


def page_rows(out: Path, d: int, pages: int, dim: int, rng, late=None) -> tuple[dict, list[dict]]:
    """Document ``doc-<d>`` of an index under ``out`` (its docs row) and its pages' rows with random unit vectors
    (``late``: 12 random unit token vectors each, packed in ``tokens``, their FDE the ``embedding``)."""
    import json

    import numpy as np

    from ray_vdr.corpus.pages import page_key, scoped

    source, file_hash = f"{out.parent}/docs/doc-{d}.pdf", page_key(f"file {d}")
    doc = {"source": source, "doc_id": f"doc-{d}", "kind": "pdf", "file_hash": file_hash,
           "metadata": json.dumps({"collection": f"c{d % 2}"})}
    rows = []
    for p in range(pages):
        key, content, _ = scoped(page_key(file_hash, str(p + 1)), source, file_hash)
        v = rng.standard_normal(dim).astype(np.float32)
        row = {"key": key, "content": content, "file_hash": file_hash, "doc_id": f"doc-{d}", "source": source,
               "page": p + 1, "row_metadata": None, "embedding": (v / np.linalg.norm(v)).tolist()}
        if late is not None:
            from ray_vdr.corpus.late import fde_of, pack_tokens
            from ray_vdr.eval.matryoshka import truncated

            tokens = truncated(rng.standard_normal((12, late.token_dim)).astype(np.float32), late.token_dim)
            row["tokens"] = pack_tokens(tokens, late.storage)
            row["embedding"] = fde_of(late).encode_each([tokens], doc=True)[0].tolist()
        rows.append(row)
    return doc, rows


def write_page_part(out: Path, rows: list[dict], dim: int) -> str:
    """Publish ``rows`` as a page part of the index under ``out``; returns its name."""
    from ray_vdr.storage import part_name, write_table

    table = pa.Table.from_pylist(rows).cast(pa.schema([
        ("key", pa.string()), ("content", pa.string()), ("file_hash", pa.string()), ("doc_id", pa.string()),
        ("source", pa.string()), ("page", pa.int32()), ("row_metadata", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim))] + ([("tokens", pa.large_binary())] if "tokens" in rows[0] else [])))
    name = part_name(table.column("key").to_pylist())
    write_table(table, f"{out}/pages/{name}")
    return name
