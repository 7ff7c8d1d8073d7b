from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

from ray_vdr.data.triplets import SOURCE_COLUMN, TripletSpec, validate_batch


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buf, format="PNG")
    return buf.getvalue()


def test_validate_batch_splits_and_ids_are_stable():
    good = _png()
    batch = pa.table({"query": ["a", "", "b"], "image": [good, good, b"bad"], "negative_0": [good, good, good],
                      SOURCE_COLUMN: ["f.parquet"] * 3})
    spec = TripletSpec(negative_columns=("negative_0",))
    accepted, rejects = validate_batch(batch, spec)
    assert accepted.column_names == ["row_id", "query", "image", "negative_0"]
    assert accepted.column("query").to_pylist() == ["a"]
    assert [(r["reason"], r["column"], r["source"]) for r in rejects] == [
        ("empty_query", "query", "f.parquet"), ("corrupt_image", "image", "f.parquet")]
    again, _ = validate_batch(batch, spec)
    assert again.column("row_id").to_pylist() == accepted.column("row_id").to_pylist()


def test_id_column_and_renamed_columns():
    good = _png()
    batch = pa.table({"id": [7, 8], "q": ["x", "y"], "page": [good, good]})
    spec = TripletSpec(query_column="q", positive_column="page", id_column="id")
    accepted, rejects = validate_batch(batch, spec)
    assert accepted.column("row_id").to_pylist() == ["7", "8"] and not rejects
