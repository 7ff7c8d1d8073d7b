"""Page corpora: listing sources and turning each file into pages or rejects (pure functions, no Ray).

A *page* is one image the embedder sees: an image file, one page of a PDF rasterised at ``dpi``, or one row of a
Parquet file with image bytes. Every page has a ``key``: its ``content`` hash scoped to its source, which makes the
embedding job resumable and exactly-once: a page whose key is already in the output (embedded or rejected) is
skipped, and the same file under two sources is two pages (each with its document's metadata). Keys are cheap to
compute before decoding (the file bytes; for PDF pages the file bytes, the page number and the dpi), so a rerun skips
pages without rendering them. Each row also carries its file's content hash (``file_hash``): the index's version
says which (source, file_hash) pairs are live (:mod:`ray_vdr.corpus.versions`).

Nothing is dropped silently: a file or page that cannot be used becomes a reject row with a short reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from ray_vdr.config import ImageLimits
from ray_vdr.data.images import ImageRejected, decode_image, image_bytes
from ray_vdr.storage import fs_path

logger = logging.getLogger(__name__)

__all__ = ["PAGE_SCHEMA", "SourceFile", "expand_file", "list_sources", "page_key", "scoped", "thumbnail"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
KINDS = {**{s: "image" for s in IMAGE_SUFFIXES}, ".pdf": "pdf", ".parquet": "parquet"}

# What the expansion stage hands to the embedder: one row per page, a reject when ``reason`` is set. ``text`` is the
# page's own text where it has one: a PDF page's text layer, an image's sidecar ``<file>.txt``, a Parquet text column.
PAGE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("content", pa.string()),
    ("file_hash", pa.string()),
    ("doc_id", pa.string()),
    ("source", pa.string()),
    ("page", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image", pa.binary()),  # the source's own bytes when the page is them as it is, else a PNG
    ("thumbnail", pa.binary()),  # always null: served thumbnails are made on request (PageStore); kept for old shards
    ("pixels", pa.large_binary()),  # the decoded page (RGB, width x height) for the embedder; not stored
    ("text", pa.string()),
    ("row_metadata", pa.string()),  # a Parquet row's own metadata (its other scalar columns), as JSON
    ("reason", pa.string()),
    ("detail", pa.string()),
])


MAX_TEXT_CHARS = 100_000  # a page's text is cut here (a page holds a few thousand characters; more is not text)
SIDECAR_SUFFIX = ".txt"  # page.png + page.png.txt: the text of an image page
META_SUFFIX = ".json"  # report.pdf + report.pdf.json: a document's metadata (ray_vdr.corpus.metadata)


@dataclass(frozen=True)
class SourceFile:
    uri: str  # as given, or under a given folder
    doc_id: str  # path relative to the source folder (the file name for a single file)
    kind: str  # image | pdf | parquet | unsupported
    sidecar: str | None = None  # an image's text file (<file>.txt next to it)
    meta_sidecar: str | None = None  # the document's metadata (<file>.json next to it)
    file_hash: str | None = None  # its content hash, when known (sync: from the hashing pass)
    stamp: str | None = None  # "size:mtime_ns" as listed: a sync does not read a file whose stamp is unchanged


def list_sources(sources: list[str]) -> list[SourceFile]:
    """Every file under the given folders/files/URIs, sorted, by normalised URI (an absolute path for local files):
    a source's identity across syncs. Sidecars go with their file rather than being sources of their own: an image's
    text (``<file>.txt``) and any document's metadata (``<file>.json``). Raises FileNotFoundError for a missing
    source."""
    out: list[SourceFile] = []
    for src in sources:
        fs, path = fs_path(src)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"index source {src!r} does not exist")
        prefix = src.split("://", 1)[0] + "://" if "://" in src else ""
        if info.type == pafs.FileType.File:
            infos, root = [info], posixpath.dirname(path)
            infos += [i for i in fs.get_file_info([path + SIDECAR_SUFFIX, path + META_SUFFIX])
                      if i.type == pafs.FileType.File]
        else:
            infos, root = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                           if f.type == pafs.FileType.File and not posixpath.basename(f.path).startswith(".")], path
        stamps = {i.path: _stamp(i) for i in infos}
        files = list(stamps)
        present = set(files)
        texts = {f for f in files if f.endswith(SIDECAR_SUFFIX) and _kind(f[: -len(SIDECAR_SUFFIX)]) == "image"
                 and f[: -len(SIDECAR_SUFFIX)] in present}
        metas = {f for f in files if f.endswith(META_SUFFIX) and f[: -len(META_SUFFIX)] in present}
        for f in sorted(present - texts - metas):
            text, meta = f + SIDECAR_SUFFIX, f + META_SUFFIX
            out.append(SourceFile(prefix + f, posixpath.relpath(f, root), _kind(f),
                                  prefix + text if text in texts else None, prefix + meta if meta in metas else None,
                                  stamp=stamps[f]))
    return out


def _stamp(info: pafs.FileInfo) -> str | None:
    """What says a file changed without reading it: its size and modification time (an object store's last-modified
    time: every write of an object sets it). None where the filesystem gives no time."""
    return None if info.mtime_ns is None else f"{info.size}:{info.mtime_ns}"


def _kind(path: str) -> str:
    return KINDS.get(posixpath.splitext(path)[1].lower(), "unsupported")


def page_key(*parts: bytes | str) -> str:
    """The content hash identifying a page: sha256 over the parts."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def thumbnail(data: bytes, side: int) -> bytes:
    """A stored page's JPEG thumbnail, longest side ``side`` (made when it is first asked for: most pages of a large
    corpus are never shown, so the embedding job does not make them)."""
    img = Image.open(io.BytesIO(data))
    img.thumbnail((side, side), Image.Resampling.LANCZOS)  # decodes a JPEG at a reduced scale (draft) where it can
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    """Lossless and fast: zlib level 1 writes a page ~3.5x faster than PNG's default level 6, a little larger."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _reject(key: str, doc_id: str, source: str, page: int | None, reason: str, detail: str = "",
            file_hash: str | None = None) -> dict[str, Any]:
    return {"key": key, "content": None, "file_hash": file_hash, "doc_id": doc_id, "source": source, "page": page,
            "width": None, "height": None, "image": None, "thumbnail": None, "pixels": None, "text": None,
            "row_metadata": None, "reason": reason, "detail": detail[:500]}


def _clean_text(text: str | None) -> str | None:
    """A page's text with line ends normalised, cut at MAX_TEXT_CHARS; None when it has none."""
    if text is None:
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").strip()
    return text[:MAX_TEXT_CHARS] or None


def _accept(key: tuple[str, str, str], doc_id: str, source: str, page: int, img: Image.Image, data: bytes | None,
            text: str | None = None) -> dict[str, Any]:
    """A page: ``data`` is stored when it encodes ``img`` exactly (else a PNG of it); the decoded pixels travel to the
    embedder, which then does not decode the page a second time."""
    return {"key": key[0], "content": key[1], "file_hash": key[2], "doc_id": doc_id, "source": source, "page": page,
            "width": img.width, "height": img.height, "image": data if data is not None else _png(img),
            "thumbnail": None, "pixels": img.tobytes(), "text": _clean_text(text), "row_metadata": None, "reason": None,
            "detail": None}


def scoped(content: str, source: str, file_hash: str | None) -> tuple[str, str, str | None]:
    """(key, content, file_hash) of a page: its key is its content key scoped to its source and to that source's
    content, so the same file under two sources (two teams' copies) is two pages, each with its document's metadata,
    and a changed Parquet file's rows are pages of the new file (its version's live rows), not skipped as known."""
    return page_key(content, "@", source, file_hash or ""), content, file_hash


def _image_page(data: bytes, key: tuple[str, str, str | None], doc_id: str, source: str, page: int,
                limits: ImageLimits, text: str | None = None) -> dict[str, Any]:
    try:
        img, changed = decode_image(data, limits)
    except ImageRejected as e:
        return _reject(key[0], doc_id, source, page, e.reason, e.detail, key[2])
    return _accept(key, doc_id, source, page, img, None if changed else data, text)


def _sidecar_text(uri: str | None) -> str | None:
    """An image's sidecar text (UTF-8; undecodable bytes replaced), None when it has none or it cannot be read."""
    if uri is None:
        return None
    fs, path = fs_path(uri)
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read(4 * MAX_TEXT_CHARS).decode("utf-8", errors="replace")
    except OSError as e:
        logger.warning("cannot read the sidecar text %s: %s", uri, e)
        return None


def _pdf_pages(data: bytes, file_key: str, f: SourceFile, dpi: int, limits: ImageLimits,
               known: Callable[[str], bool]) -> Iterator[dict[str, Any]]:
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        yield _reject(scoped(page_key(file_key, "file"), f.uri, file_key)[0], f.doc_id, f.uri, None,
                      _pdf_failure(data), str(e), file_key)
        return
    try:
        n = len(doc)
        if n == 0:
            yield _reject(scoped(page_key(file_key, "file"), f.uri, file_key)[0], f.doc_id, f.uri, None,
                          "empty_pdf", "the PDF has no pages", file_key)
            return
        scale = dpi / 72.0
        for i in range(n):
            keys = scoped(page_key(file_key, str(i + 1), str(dpi)), f.uri, file_key)
            key = keys[0]
            if known(key):
                continue
            try:
                page = doc[i]
                w_pt, h_pt = page.get_size()
                w, h = round(w_pt * scale), round(h_pt * scale)
                if w * h > limits.max_pixels:
                    yield _reject(key, f.doc_id, f.uri, i + 1, "page_too_large",
                                  f"{w_pt:.0f}x{h_pt:.0f} pt at {dpi} dpi = {w}x{h} px "
                                  f"> max_pixels {limits.max_pixels}",
                                  file_key)
                    continue
                if min(w, h) < limits.min_side:
                    yield _reject(key, f.doc_id, f.uri, i + 1, "too_small", f"{w}x{h} px at {dpi} dpi", file_key)
                    continue
                img = page.render(scale=scale).to_pil().convert("RGB")
                textpage = page.get_textpage()
                text = textpage.get_text_range()
                textpage.close()
                page.close()
            except Exception as e:  # pdfium raises for damaged page trees and content streams
                yield _reject(key, f.doc_id, f.uri, i + 1, "corrupt_pdf_page", f"{type(e).__name__}: {e}", file_key)
                continue
            if max(img.size) > limits.max_side:
                img.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
            yield _accept(keys, f.doc_id, f.uri, i + 1, img, None, text)
    finally:
        doc.close()


def _pdf_failure(data: bytes) -> str:
    """Why PDFium refused a document. Its error code is process-global and not reset on every failure (a zero-page
    PDF after an encrypted one reads "Incorrect password"), so classify from the file itself."""
    if re.search(rb"/Encrypt\s", data):
        return "encrypted_pdf"
    if re.search(rb"/Count\s+0\b", data) and not re.search(rb"/Type\s*/Page(?!s)", data):
        return "empty_pdf"
    return "corrupt_pdf"


def _metadata_columns(schema: pa.Schema, used: set[str]) -> list[str]:
    """A Parquet source's other scalar columns (strings, numbers, booleans, dates): each row's metadata. Binary,
    list and struct columns (images, negatives) are not metadata."""
    def scalar(t: pa.DataType) -> bool:
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_date(t)
                or pa.types.is_timestamp(t))
    return [f.name for f in schema if f.name not in used and scalar(f.type)]


def _parquet_pages(f: SourceFile, image_column: str, id_column: str | None, limits: ImageLimits,
                   known: Callable[[str], bool], text_column: str | None = None) -> Iterator[dict[str, Any]]:
    from ray_vdr.corpus.metadata import MetadataError, validate_metadata

    fs, path = fs_path(f.uri)
    file_reject = page_key(f.uri, "file", f.file_hash or "")
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except Exception as e:
        yield _reject(file_reject, f.doc_id, f.uri, None, "corrupt_parquet", f"{type(e).__name__}: {e}", f.file_hash)
        return
    names = pf.schema_arrow.names
    if image_column not in names:
        yield _reject(file_reject, f.doc_id, f.uri, None, "missing_column", f"no column {image_column!r} (has {names})",
                      f.file_hash)
        return
    has_id, has_text = bool(id_column and id_column in names), bool(text_column and text_column in names)
    columns = [image_column] + ([id_column] if has_id else []) + ([text_column] if has_text else [])
    meta_columns = _metadata_columns(pf.schema_arrow, set(columns))
    row = 0
    for batch in pf.iter_batches(batch_size=64, columns=columns + meta_columns):
        images = batch.column(image_column).to_pylist()
        ids = batch.column(id_column).to_pylist() if has_id else [None] * len(images)
        texts = batch.column(text_column).to_pylist() if has_text else [None] * len(images)
        metas = batch.select(meta_columns).to_pylist() if meta_columns else [None] * len(images)
        for value, doc, text, meta in zip(images, ids, texts, metas, strict=True):
            row += 1
            doc_id = str(doc) if doc is not None else f"{f.doc_id}#{row}"
            row_key = page_key(f.uri, "row", str(row), f.file_hash or "")
            try:
                data = image_bytes(value)
                meta = validate_metadata(meta, f"{f.doc_id} row {row}") if meta else None
            except ImageRejected as e:
                yield _reject(row_key, doc_id, f.uri, row, e.reason, e.detail, f.file_hash)
                continue
            except MetadataError as e:
                yield _reject(row_key, doc_id, f.uri, row, e.reason, e.detail, f.file_hash)
                continue
            keys = scoped(page_key(data), f.uri, f.file_hash)
            if not known(keys[0]):
                page = _image_page(data, keys, doc_id, f.uri, row, limits,
                                   text if isinstance(text, str) else None)
                if meta and page["reason"] is None:
                    page["row_metadata"] = json.dumps(meta, sort_keys=True, separators=(",", ":"))
                yield page


def expand_file(f: SourceFile, *, dpi: int, limits: ImageLimits, image_column: str = "image",
                id_column: str | None = "doc_id", text_column: str | None = "text",
                known: Callable[[str], bool] = lambda key: False) -> Iterator[dict[str, Any]]:
    """The pages (and rejects) of one source file, as PAGE_SCHEMA rows with their text; pages whose key ``known``
    returns True for (already embedded or rejected) are skipped before decoding."""
    if f.kind == "parquet":
        yield from _parquet_pages(f, image_column, id_column, limits, known, text_column)
        return
    fs, path = fs_path(f.uri)
    try:
        with fs.open_input_stream(path) as fh:
            data = fh.read()
    except OSError as e:
        yield _reject(page_key(f.uri, "file", f.file_hash or ""), f.doc_id, f.uri, None, "unreadable", str(e),
                      f.file_hash)
        return
    file_key = page_key(data)
    if f.file_hash is not None and file_key != f.file_hash:
        yield _reject(page_key(f.uri, "changed", file_key), f.doc_id, f.uri, None, "changed_while_indexing",
                      "the file changed after it was hashed: the next sync indexes it", f.file_hash)
        return
    if f.kind == "unsupported":
        key = scoped(page_key(file_key, "file"), f.uri, file_key)[0]
        if not known(key):
            yield _reject(key, f.doc_id, f.uri, None, "unsupported_file_type",
                          f"{posixpath.splitext(path)[1] or 'no suffix'}: expected an image, PDF or Parquet file",
                          file_key)
    elif f.kind == "pdf":
        if not known(scoped(page_key(file_key, "file"), f.uri, file_key)[0]):
            yield from _pdf_pages(data, file_key, f, dpi, limits, known)
    elif not known((keys := scoped(file_key, f.uri, file_key))[0]):
        yield _image_page(data, keys, f.doc_id, f.uri, 1, limits, _sidecar_text(f.sidecar))
