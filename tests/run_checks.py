"""Checks on a finished training run's audit trail, shared by the training and job tests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq


def check_exactly_once_and_in_sync(result, run_dir: Path, n_rows: int, epochs: int = 1) -> None:
    """Every accepted row trained exactly once per epoch (or reported as dropped); both ranks end with equal
    weights and the optimizer's own step count equals the run's steps (its state survived any resume)."""
    audit = pq.read_table(run_dir / "row_ids")
    trained = list(zip(audit.column("epoch").to_pylist(), audit.column("row_id").to_pylist(), strict=True))
    dropped_table = pq.read_table(run_dir / "dropped.parquet") if (run_dir / "dropped.parquet").exists() else None
    dropped = dropped_table.column("row_id").to_pylist() if dropped_table else []
    reasons = dropped_table.column("reason").to_pylist() if dropped_table else []
    assert len(trained) == len(set(trained)), "a row was trained twice in one epoch"
    assert sorted({e for e, _ in trained}) == list(range(epochs))
    assert len(trained) + len(dropped) == n_rows * epochs
    # only the uneven remainder (< world size) or rows that would repeat a page/query of each other are dropped
    assert sum("evenly" in r for r in reasons) < 2 * epochs
    assert all("evenly" in r or "repeating" in r for r in reasons)
    assert (result.rows_trained, result.rows_dropped) == (len(trained), len(dropped))
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("*.json"))]
    assert len(ranks) == 2 and ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    assert ranks[0]["rows"] == ranks[1]["rows"] and ranks[0]["steps"] == result.metrics["step"]
    assert result.metrics["world_size"] == 2
    if ranks[0]["optimizer_steps"] is not None:  # DeepSpeed keeps its own optimizer state
        assert ranks[0]["optimizer_steps"] == result.metrics["step"]
