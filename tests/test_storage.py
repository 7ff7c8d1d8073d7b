"""Storage helpers: atomic publication of files (a killed or failing writer leaves nothing half-written)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_vdr import storage


def test_tables_and_bytes_are_published_whole(tmp_path):
    storage.write_table(pa.table({"x": [1, 2, 3]}), str(tmp_path / "a" / "part-1.parquet"))
    storage.write_bytes(b"{}", str(tmp_path / "a" / "m.json"))
    assert pq.read_table(tmp_path / "a" / "part-1.parquet").column("x").to_pylist() == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.json", "part-1.parquet"]  # no temporaries


def test_a_failing_writer_leaves_no_file(tmp_path, monkeypatch):
    def broken(table, where, filesystem=None):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(storage.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        storage.write_table(pa.table({"x": [1]}), str(tmp_path / "part-1.parquet"))
    assert list(tmp_path.iterdir()) == []
