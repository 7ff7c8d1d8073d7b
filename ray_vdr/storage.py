"""Local paths and remote URIs (s3://, gs://, …) through pyarrow filesystems: the one place jobs read and write.

Every artifact a run writes (rejects, row-id audit trail, per-rank reports, the final model, index shards) goes
through these helpers, so a run behaves the same with ``run.storage_path: ./runs`` and ``s3://bucket/runs``. Files
are published atomically: a reader never sees a half-written file, even after the writer was killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["copy_tree", "dedupe_parts", "fs_path", "is_file", "list_dirs", "list_parts", "part_name", "read_bytes",
           "read_file", "read_json", "read_json_files", "read_table", "remove_tree", "write_bytes", "write_file",
           "write_table", "write_tables"]


def fs_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI or a local path (made absolute)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _parent(fs: pafs.FileSystem, path: str) -> None:
    fs.create_dir(posixpath.dirname(path), recursive=True)


def _publish(fs: pafs.FileSystem, path: str, write) -> None:
    """Write a file so that readers see all of it or nothing. Object stores publish an upload atomically; on a local
    filesystem write a hidden temporary sibling, then rename it (a killed writer leaves no truncated file)."""
    _parent(fs, path)
    if not isinstance(fs, pafs.LocalFileSystem):
        write(path)
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def write_bytes(data: bytes, uri: str) -> None:
    fs, path = fs_path(uri)

    def write(target: str) -> None:
        with fs.open_output_stream(target) as fh:
            fh.write(data)

    _publish(fs, path, write)


def write_table(table: pa.Table, uri: str) -> None:
    fs, path = fs_path(uri)
    _publish(fs, path, lambda target: pq.write_table(table, target, filesystem=fs))


def write_file(local: str | Path, uri: str) -> None:
    """Publish a local file at ``uri``, streamed (never whole in memory)."""
    fs, path = fs_path(uri)
    _publish(fs, path, lambda target: pafs.copy_files(str(local), target, source_filesystem=pafs.LocalFileSystem(),
                                                      destination_filesystem=fs))


def read_file(uri: str, local: str | Path) -> None:
    """Copy the file at ``uri`` to the local path ``local``, streamed (never whole in memory)."""
    fs, path = fs_path(uri)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def write_tables(tables: list[pa.Table], uri: str, row_group_rows: int = 65_536) -> None:
    """One Parquet file of ``tables`` (one schema) in order, each in row groups of its own of at most
    ``row_group_rows``: a reader filtering on a column constant within each (a shard number) reads only its groups,
    and a reader going group by group holds one at a time."""
    fs, path = fs_path(uri)

    def write(target: str) -> None:
        with pq.ParquetWriter(target, tables[0].schema, filesystem=fs) as writer:
            for t in tables:
                writer.write_table(t, row_group_size=row_group_rows)

    _publish(fs, path, write)


def is_file(uri: str) -> bool:
    fs, path = fs_path(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(uri: str) -> bytes:
    fs, path = fs_path(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def read_json(uri: str) -> Any:
    """A JSON file's content, or None when it does not exist."""
    return json.loads(read_bytes(uri)) if is_file(uri) else None


def read_table(uri: str, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    fs, path = fs_path(uri)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters)


def part_name(ids: list[str]) -> str:
    """The file name of a published part holding rows with these ids: a hash of the sorted ids, so a batch retried
    after its writer died rewrites the same file instead of adding a second copy (exactly-once)."""
    h = hashlib.sha256()
    for part in sorted(ids):
        h.update(part.encode() + b"\0")
    return f"part-{h.hexdigest()[:40]}.parquet"


def list_parts(uri: str) -> list[str]:
    """Names of the parts published directly under ``uri``, sorted (hidden temporary files are skipped; an empty list
    when the folder does not exist)."""
    fs, path = fs_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos
                  if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith("part-"))


def read_json_files(uri: str) -> list[dict]:
    """Every ``*.json`` directly under ``uri`` (an empty list when the folder does not exist)."""
    fs, path = fs_path(uri)
    out = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), key=lambda i: i.path):
        if info.path.endswith(".json"):
            with fs.open_input_stream(info.path) as fh:
                out.append(json.loads(fh.read()))
    return out


def copy_tree(src_uri: str, dst_uri: str) -> None:
    src_fs, src = fs_path(src_uri)
    dst_fs, dst = fs_path(dst_uri)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly under ``uri`` (an empty list when it does not exist)."""
    fs, path = fs_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def remove_tree(uri: str) -> None:
    fs, path = fs_path(uri)
    fs.delete_dir(path)


def dedupe_parts(folders: list[str], column: str, *, first: frozenset[str] | set[str] = frozenset(),
                 unique_rows: bool = True) -> int:
    """Keep each value of ``column`` in the first part that holds it, over the parts of ``folders`` in order (within a
    folder the parts named in ``first`` come first, then by name); rewrite or delete the parts that repeat one.
    Returns the rows removed.

    Parts are named by their rows' ids, so a batch retried after its writer died rewrites its own part; a repeat only
    arises when a retried batch was cut differently, or when two inputs have the same content. ``unique_rows``: each
    row has its own value (also within a part); else a part may hold many rows of one value (a page's queries).
    """
    removed = 0
    seen: set[str] = set()
    for folder in folders:
        for name in sorted(list_parts(folder), key=lambda n: (n not in first, n)):
            values = read_table(f"{folder}/{name}", [column]).column(column).to_pylist()
            keep, here = [], set()
            for i, value in enumerate(values):
                if value in seen or (unique_rows and value in here):
                    continue
                keep.append(i)
                here.add(value)
            seen |= here
            if len(keep) == len(values):
                continue
            removed += len(values) - len(keep)
            if keep:
                write_table(read_table(f"{folder}/{name}").take(keep), f"{folder}/{name}")
            else:
                fs, path = fs_path(f"{folder}/{name}")
                fs.delete_file(path)
    return removed


def now_iso() -> str:
    """Now in UTC, ISO 8601 to the second (manifests' timestamps)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
