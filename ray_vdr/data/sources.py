"""Triplet sources on Ray Data: read Parquet, saved datasets, JSONL + images or the Hub, then validate in map_batches.

Sources: Parquet (local path or any pyarrow-filesystem URI such as s3://), a folder written by
``datasets.save_to_disk``, an images folder + JSONL, or a Hub dataset. Validation runs in Ray Data tasks; rejected
rows are written by those tasks to ``<rejects_uri>/rejects-<hash>.parquet`` with a reason, so the pipeline keeps
streaming (nothing is collected in the driver) and accepted + rejected = input rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_vdr.config import DataConfig, SourceConfig
from ray_vdr.data.images import ImageRejected
from ray_vdr.data.triplets import REJECT_SCHEMA, SOURCE_COLUMN, DataError, TripletSpec, validate_batch
from ray_vdr.storage import fs_path

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

__all__ = ["SourceUnreachable", "blocks_table", "build_dataset", "check_source", "count_rejects", "count_rows",
           "eval_blocks", "infer_format", "read_rejects", "read_source", "split_blocks", "unreachable"]


def infer_format(source: SourceConfig) -> str:
    if source.format != "auto":
        return source.format
    uri = source.uri
    if uri.endswith(".jsonl") or uri.endswith(".json"):
        return "images_jsonl"
    fs, path = fs_path(uri)
    if fs.get_file_info(posixpath.join(path, "dataset_info.json")).type == pafs.FileType.File and \
            fs.get_file_info(posixpath.join(path, "state.json")).type == pafs.FileType.File:
        return "hf_disk"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data source not found: {uri} (for a Hub dataset set format: hf_hub)")
    return "parquet"


def _hub_filesystem() -> pafs.FileSystem:
    from huggingface_hub import HfFileSystem

    return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))


class SourceUnreachable(FileNotFoundError):
    """A data source (a Hub dataset) that cannot be reached from here: the message names it and the remedies."""


def unreachable(what: str, e: BaseException) -> str:
    """One line saying that ``what`` cannot be reached, why (the error's first line) and what to do instead."""
    why = (str(e).strip().splitlines() or [""])[0][:200]
    return (f"{what} cannot be reached ({type(e).__name__}: {why}): use a local path or a bucket URI, a copy in the "
            "local Hugging Face cache with HF_HUB_OFFLINE=1, or a machine with network access to the Hub")


def hub_parquet_files(source: SourceConfig) -> list[str]:
    """Parquet files of a Hub dataset config/split (the layout `push_to_hub` writes), streamed by Ray workers.
    Raises SourceUnreachable, one line, when the Hub cannot be reached (offline, no network)."""
    from huggingface_hub import HfFileSystem

    base = f"datasets/{source.uri}"
    config = source.hf_config or "default"
    split = source.hf_split
    try:
        fs = HfFileSystem()
        for pattern in (f"{base}/{config}/{split}-*.parquet", f"{base}/{config}/{split}/*.parquet",
                        f"{base}/data/{split}-*.parquet", f"{base}/{split}-*.parquet"):
            files = sorted(fs.glob(pattern))
            if files:
                return files
    except Exception as e:  # httpx/requests connection errors, huggingface_hub's offline mode, timeouts
        raise SourceUnreachable(unreachable(f"the Hub dataset {source.uri!r}", e)) from None
    return []


def _source_columns(source: SourceConfig, fmt: str) -> list[str]:
    """Column names of a source, read cheaply (Parquet metadata, Arrow schema, first JSONL line)."""
    fs, path = fs_path(source.uri) if fmt != "hf_hub" else (None, source.uri)
    if fmt == "parquet":
        return pq.ParquetDataset(path, filesystem=fs).schema.names
    if fmt == "hf_disk":
        first_fs, first = fs_path(_hf_disk_files(source.uri)[0])
        with first_fs.open_input_stream(first) as fh:
            return pa.ipc.open_stream(fh).schema.names
    if fmt == "hf_hub":
        files = hub_parquet_files(source)
        return pq.read_schema(files[0], filesystem=_hub_filesystem()).names if files else []
    if fmt == "images_jsonl":
        with fs.open_input_stream(path) as fh:
            first = fh.read(1 << 20).split(b"\n", 1)[0]
        return list(json.loads(first).keys()) if first.strip() else []
    return []


def _hf_disk_files(uri: str) -> list[str]:
    fs, path = fs_path(uri)
    with fs.open_input_stream(posixpath.join(path, "state.json")) as fh:
        state = json.loads(fh.read())
    base = uri.rstrip("/") if "://" in uri else path
    files = [f"{base}/{f['filename']}" for f in state.get("_data_files", [])]
    if not files:
        raise DataError(f"{uri}: state.json lists no data files")
    return files


def _read_arrow_files(batch: dict[str, Any]):
    """Stream record batches out of `datasets` Arrow files (one task per file; nothing is loaded whole)."""
    for uri in batch["file"]:
        fs, path = fs_path(str(uri))
        with fs.open_input_stream(path) as fh:
            for rb in pa.ipc.open_stream(fh):
                table = pa.Table.from_batches([rb])
                yield table.append_column(SOURCE_COLUMN, pa.array([str(uri)] * table.num_rows, pa.string()))


def read_source(source: SourceConfig, columns: list[str] | None = None, num_cpus: float = 1.0) -> ray.data.Dataset:
    """A Ray Dataset of the raw rows of ``source`` with a ``__source`` column saying where each row came from. Its
    read tasks reserve ``num_cpus`` each."""
    import ray.data

    fmt = infer_format(source)
    if fmt == "parquet":
        ds = ray.data.read_parquet(source.uri, include_paths=True, num_cpus=num_cpus)
        if columns:
            ds = ds.select_columns([*columns, "path"])
        ds = ds.rename_columns({"path": SOURCE_COLUMN})
    elif fmt == "hf_disk":
        files = _hf_disk_files(source.uri)
        ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
        ds = ds.map_batches(_read_arrow_files, batch_size=1, batch_format="numpy", num_cpus=num_cpus)
        if columns:
            ds = ds.select_columns([*columns, SOURCE_COLUMN])
    elif fmt == "images_jsonl":
        ds = ray.data.read_json(source.uri, lines=True, include_paths=True, num_cpus=num_cpus)
        ds = ds.rename_columns({"path": SOURCE_COLUMN})
    elif fmt == "hf_hub":
        files = hub_parquet_files(source)
        if files:
            ds = ray.data.read_parquet(files, filesystem=_hub_filesystem(), include_paths=True, num_cpus=num_cpus)
            if columns:
                ds = ds.select_columns([*columns, "path"])
            ds = ds.rename_columns({"path": SOURCE_COLUMN})
        else:  # a Hub dataset without Parquet files: load it with `datasets` (materialised by Ray's adapter)
            import datasets

            logger.warning("%s has no Parquet files for %s/%s; loading through `datasets`", source.uri,
                           source.hf_config, source.hf_split)
            hf = datasets.load_dataset(source.uri, source.hf_config, split=source.hf_split)
            ds = ray.data.from_huggingface(hf.select_columns(columns) if columns else hf)
            ds = ds.add_column(SOURCE_COLUMN, lambda b: pa.array([f"hf://datasets/{source.uri}"] * len(b)),
                               batch_format="pyarrow")
    else:  # pragma: no cover - guarded by the config Literal
        raise ValueError(fmt)
    if source.limit:
        ds = ds.limit(source.limit)
    return ds


class _JsonlImageLoader:
    """Reads image files named in JSONL rows, relative to the JSONL file; a missing file is a reject, never text."""

    def __init__(self, jsonl_uri: str):
        if "://" not in jsonl_uri:
            jsonl_uri = str(Path(jsonl_uri).expanduser().resolve())  # workers may run elsewhere
        self.base_uri = jsonl_uri.rsplit("/", 1)[0]

    def __call__(self, value: Any) -> bytes:
        if value is None:
            raise ImageRejected("missing_image", "null path")
        if not isinstance(value, str):
            return value
        uri = value if ("://" in value or value.startswith("/")) else f"{self.base_uri}/{value}"
        fs, path = fs_path(uri)
        try:
            with fs.open_input_stream(path) as fh:
                return fh.read()
        except FileNotFoundError:
            raise ImageRejected("missing_file", uri) from None
        except OSError as e:
            if "not found" in str(e).lower() or "no such file" in str(e).lower():
                raise ImageRejected("missing_file", uri) from None
            raise


class ValidateTriplets:
    """Ray Data map_batches callable: validate rows, write this batch's rejects, return accepted rows."""

    def __init__(self, spec: TripletSpec, rejects_uri: str, image_base_uri: str | None = None):
        self.spec = spec
        self.rejects_uri = rejects_uri
        self.loader = _JsonlImageLoader(image_base_uri) if image_base_uri else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        accepted, rejects = validate_batch(batch, self.spec, self.loader)
        if rejects:
            self._write_rejects(rejects)
        return accepted

    def _write_rejects(self, rejects: list[dict[str, str]]) -> None:
        table = pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)
        # content-derived name: a retried task rewrites the same file instead of duplicating its rejects
        digest = hashlib.blake2b("\n".join(r["row_id"] + r["column"] for r in rejects).encode(), digest_size=10)
        fs, path = fs_path(self.rejects_uri)
        fs.create_dir(path, recursive=True)
        pq.write_table(table, posixpath.join(path, f"rejects-{digest.hexdigest()}.parquet"), filesystem=fs)


def check_source(source: SourceConfig, spec: TripletSpec, field: str) -> None:
    """Fail at once, naming ``field`` (e.g. ``data.train.uri``), when a source cannot be found or reached or lacks
    the columns ``spec`` reads (the driver checks this before it starts Ray)."""
    try:
        fmt = infer_format(source)
        present = _source_columns(source, fmt)
    except (SourceUnreachable, DataError) as e:
        raise SourceUnreachable(f"{field}: {e}") from None
    missing = spec.missing_columns(present)
    if present and missing:
        raise DataError(f"{field}: {source.uri}: missing column(s) {missing}; it has {present}")


def build_dataset(
    source: SourceConfig,
    spec: TripletSpec,
    rejects_uri: str,
    *,
    batch_size: int = 16,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """The validated triplet stream for one source. Lazy: nothing runs until a consumer iterates."""
    fmt = infer_format(source)
    present = _source_columns(source, fmt)
    missing = spec.missing_columns(present)
    if present and missing:
        raise DataError(f"{source.uri}: missing column(s) {missing}; it has {present}")
    ds = read_source(source, columns=spec.input_columns if fmt in ("parquet", "hf_hub") else None, num_cpus=num_cpus)
    validate = ValidateTriplets(spec, rejects_uri, source.uri if fmt == "images_jsonl" else None)
    return ds.map_batches(validate, batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus)


def split_blocks(source: SourceConfig, spec: TripletSpec, rejects_uri: str, *, batch_size: int = 16,
                 num_cpus: float = 1.0) -> list:
    """A small split (an eval split) read and validated by Ray Data from the driver: object refs of its Arrow blocks
    (rejects with their reasons under ``rejects_uri``), for the tasks and training workers that evaluate to fetch
    with :func:`blocks_table`. They get the refs, not a dataset to run: a task or worker running Ray Data itself
    holds its CPU while its read tasks wait for one (an evaluation job beside an embedding job on a 2-CPU head hung
    so), and every run of it would start its own executor."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # a small split: bars would garble the job log
    return build_dataset(source, spec, rejects_uri, batch_size=batch_size, num_cpus=num_cpus).to_arrow_refs()


def eval_blocks(data: DataConfig, rejects_uri: str) -> list | None:
    """``data.eval`` as :func:`split_blocks` (None without an eval split): what training, two-stage evaluation and
    promotion evaluate on."""
    if data.eval is None:
        return None
    return split_blocks(data.eval, TripletSpec.from_config(data, split="eval"), rejects_uri,
                        batch_size=data.batch_size, num_cpus=data.cpus_per_task)


def blocks_table(blocks: list) -> pa.Table:
    """The rows of :func:`split_blocks`' refs as one table (fetched from the object store)."""
    import ray

    if not blocks:
        raise DataError("the split has no valid rows (empty, or every row rejected: see its rejects)")
    return pa.concat_tables(ray.get(list(blocks)))


def count_rows(source: SourceConfig) -> int | None:
    """Input rows of a source from metadata where that is cheap (local or remote Parquet), else None."""
    fmt = infer_format(source)
    if fmt == "parquet":
        fs, path = fs_path(source.uri)
        n = sum(f.metadata.num_rows for f in pq.ParquetDataset(path, filesystem=fs).fragments)
    elif fmt == "hf_hub" and (files := hub_parquet_files(source)):
        fs = _hub_filesystem()
        n = sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)
    else:
        return None
    return min(n, source.limit) if source.limit else n


def read_rejects(rejects_uri: str) -> pa.Table:
    """All reject records written under ``rejects_uri`` (an empty table when there are none)."""
    fs, path = fs_path(rejects_uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return REJECT_SCHEMA.empty_table()
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(path)) if f.path.endswith(".parquet")]
    if not files:
        return REJECT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in sorted(files)])


def count_rejects(rejects_uri: str) -> dict[str, int]:
    table = read_rejects(rejects_uri)
    counts: dict[str, int] = {}
    for reason in table.column("reason").to_pylist():
        counts[reason] = counts.get(reason, 0) + 1
    return counts
