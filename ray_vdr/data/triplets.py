"""Validation of (query, positive page, hard negatives) rows: pure functions over Arrow batches (no Ray).

:func:`validate_batch` splits a batch into accepted rows in the canonical layout the trainers read
(``row_id, query, image, negative_0..k-1`` with validated image bytes) and reject records that say which row,
from where, which column and why. Input rows = accepted + rejected, always.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ray_vdr.config import DataConfig, ImageLimits
from ray_vdr.data.images import ImageRejected, normalize_image

__all__ = ["REJECT_SCHEMA", "DataError", "TripletSpec", "validate_batch"]

SOURCE_COLUMN = "__source"

REJECT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("column", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("query", pa.string()),
    ]
)


class DataError(ValueError):
    """Input data that cannot be read at all (missing columns, no files): fails the job with this message."""


@dataclass(frozen=True)
class TripletSpec:
    """Which input columns hold what, and the bounds every image must meet."""

    query_column: str = "query"
    positive_column: str = "image"
    negative_columns: tuple[str, ...] = ()
    id_column: str | None = None
    limits: ImageLimits = field(default_factory=ImageLimits)
    max_query_chars: int = 2048

    @classmethod
    def from_config(cls, data: DataConfig, *, split: str = "train") -> TripletSpec:
        negs = data.negative_columns if split == "train" else data.eval_negative_columns
        return cls(data.query_column, data.positive_column, tuple(negs), data.id_column, data.image)

    @property
    def image_columns(self) -> tuple[str, ...]:
        return (self.positive_column, *self.negative_columns)

    @property
    def input_columns(self) -> list[str]:
        cols = [self.query_column, *self.image_columns]
        return cols + ([self.id_column] if self.id_column else [])

    @property
    def output_columns(self) -> list[str]:
        return ["row_id", "query", "image", *[f"negative_{i}" for i in range(len(self.negative_columns))]]

    def output_schema(self) -> pa.Schema:
        return pa.schema(
            [("row_id", pa.string()), ("query", pa.string())]
            + [(c, pa.binary()) for c in self.output_columns[2:]]
        )

    def missing_columns(self, present: list[str]) -> list[str]:
        return [c for c in self.input_columns if c not in present]


def _row_id(query: Any, positive: Any) -> str:
    """Content id when the data has no id column: stable across runs, readers and workers."""
    h = hashlib.blake2b(digest_size=12)
    h.update(str(query).encode())
    if isinstance(positive, dict):
        positive = positive.get("bytes") or positive.get("path")
    if isinstance(positive, str):
        positive = positive.encode()
    if isinstance(positive, (bytes, bytearray)):
        h.update(b"\0")
        h.update(positive)
    return h.hexdigest()


ImageLoader = Callable[[Any], Any]


def validate_batch(
    batch: pa.Table, spec: TripletSpec, load_image: ImageLoader | None = None
) -> tuple[pa.Table, list[dict[str, str]]]:
    """Validate every row of ``batch``. Returns (accepted rows as a table in ``spec.output_schema()``, rejects).

    ``load_image`` turns a cell into image bytes before validation (e.g. reads a path from a JSONL row); it may
    raise :class:`ImageRejected`.
    """
    missing = spec.missing_columns(batch.column_names)
    if missing:
        raise DataError(f"input is missing column(s) {missing}; it has {batch.column_names}")
    cols = {c: batch.column(c).to_pylist() for c in spec.input_columns}
    sources = batch.column(SOURCE_COLUMN).to_pylist() if SOURCE_COLUMN in batch.column_names else [None] * len(batch)
    out: dict[str, list] = {c: [] for c in spec.output_columns}
    rejects: list[dict[str, str]] = []
    for i in range(batch.num_rows):
        query = cols[spec.query_column][i]
        rid = str(cols[spec.id_column][i]) if spec.id_column else _row_id(query, cols[spec.positive_column][i])

        def reject(column: str, reason: str, detail: str, rid=rid, query=query, i=i) -> None:
            rejects.append({"row_id": rid, "source": str(sources[i] or ""), "column": column, "reason": reason,
                            "detail": detail[:500], "query": str(query or "")[:200]})

        if not isinstance(query, str) or not query.strip():
            reject(spec.query_column, "empty_query", f"query is {query!r}")
            continue
        if len(query) > spec.max_query_chars:
            reject(spec.query_column, "query_too_long", f"{len(query)} chars > {spec.max_query_chars}")
            continue
        images = []
        for col in spec.image_columns:
            try:
                value = cols[col][i]
                if load_image is not None:
                    value = load_image(value)
                images.append(normalize_image(value, spec.limits))
            except ImageRejected as e:
                reject(col, e.reason, e.detail)
                break
        else:
            out["row_id"].append(rid)
            out["query"].append(query.strip())
            for name, data in zip(spec.output_columns[2:], images, strict=False):
                out[name].append(data)
    return pa.table(out, schema=spec.output_schema()), rejects
