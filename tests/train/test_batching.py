from __future__ import annotations

import random

import pyarrow as pa
import pytest

from ray_vdr.train.batching import GlobalBatcher


def table(rows: list[tuple[str, str, bytes, bytes]]) -> pa.Table:
    return pa.table({"row_id": [r[0] for r in rows], "query": [r[1] for r in rows],
                     "image": [r[2] for r in rows], "negative_0": [r[3] for r in rows]})


def drain(batcher: GlobalBatcher, t: pa.Table, chunk: int = 5) -> list[list[list[dict]]]:
    out = []
    for start in range(0, t.num_rows, chunk):
        batcher.add_table(t.slice(start, chunk))
        while (b := batcher.next_batch()) is not None:
            out.append(b)
    while (b := batcher.next_batch(final=True)) is not None:
        out.append(b)
    return out


@pytest.mark.parametrize(("n", "world", "per_device"), [(64, 2, 8), (67, 2, 8), (53, 4, 3), (5, 2, 4), (1, 2, 4)])
def test_every_row_once_or_reported(n, world, per_device):
    rows = [(f"r{i}", f"query {i}", f"page {i}".encode(), f"neg {i}".encode()) for i in range(n)]
    b = GlobalBatcher(world, per_device, ["image", "negative_0"])
    batches = drain(b, table(rows))
    trained = [r["row_id"] for batch in batches for s in batch for r in s]
    dropped = [rid for rid, _ in b.dropped()]
    assert len(trained) == len(set(trained))
    assert sorted(trained + dropped) == sorted(r[0] for r in rows)
    assert len(dropped) < world
    for batch in batches:
        assert len(batch) == world and len({len(s) for s in batch}) == 1  # equal slices for all_gather
        assert all(len(s) <= per_device for s in batch)


def test_batches_are_duplicate_free_and_nothing_is_lost():
    rng = random.Random(0)
    pages = [f"p{i}".encode() for i in range(30)]
    queries = [f"q{i}" for i in range(40)]
    rows = [(f"r{i}", rng.choice(queries), rng.choice(pages), rng.choice(pages)) for i in range(200)]
    b = GlobalBatcher(2, 4, ["image", "negative_0"])
    batches = drain(b, table(rows))
    trained = [r for batch in batches for s in batch for r in s]
    for batch in batches:
        flat = [r for s in batch for r in s]
        qs = [" ".join(r["query"].casefold().split()) for r in flat]
        ps = [p for r in flat for p in (r["image"], r["negative_0"])]
        assert len(qs) == len(set(qs)) and len(ps) == len(set(ps))
    dropped = b.dropped()
    assert len(trained) + len(dropped) == len(rows)
    assert len({r["row_id"] for r in trained}) == len(trained)
    assert all("repeat" in why or "evenly" in why for _, why in dropped)


def test_dedup_can_be_disabled():
    rows = [(f"r{i}", "same query", b"same page", b"same neg") for i in range(8)]
    b = GlobalBatcher(2, 2, ["image", "negative_0"], dedup=False)
    assert len(drain(b, table(rows))) == 2 and not b.dropped()
    b = GlobalBatcher(2, 2, ["image", "negative_0"])
    assert drain(b, table(rows)) == [] and len(b.dropped()) == 8
