"""BatchFeeder without Ray: ranks in threads fetch their slices while the producer thread runs ahead."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from ray_vdr.feeder import BatchFeeder


class FakeDataset:
    """Stands in for a Ray Dataset: anything with iter_batches(batch_size=, batch_format="pyarrow")."""

    def __init__(self, n: int, fail_after: int | None = None):
        self.table = pa.table({"row_id": [f"r{i}" for i in range(n)], "query": [f"q{i}" for i in range(n)],
                               "image": [f"p{i}".encode() for i in range(n)]})
        self.fail_after = fail_after

    def iter_batches(self, batch_size: int, batch_format: str, **shuffle):
        assert batch_format == "pyarrow"
        for i, b in enumerate(self.table.to_batches(max_chunksize=batch_size)):
            if self.fail_after is not None and i >= self.fail_after:
                raise OSError("storage went away")
            yield pa.Table.from_batches([b])


def fetch_all(feeder: BatchFeeder, world: int) -> list[list[str]]:
    got: list[list[str]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def rank_loop(rank: int) -> None:
        step = 0
        try:
            while (rows := feeder.get(rank, step)) is not None:
                got[rank].extend(r["row_id"] for r in rows)
                step += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=rank_loop, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return got


@pytest.mark.parametrize("epochs", [1, 2])
def test_each_epoch_every_row_once_equal_ranks(epochs):
    feeder = BatchFeeder(FakeDataset(101), world_size=3, per_device=4, image_columns=["image"], epochs=epochs,
                         read_batch_size=7)
    got = fetch_all(feeder, 3)
    assert len({len(g) for g in got}) == 1
    trained = [rid for g in got for rid in g]
    dropped = [rid for rid, _ in feeder.dropped()]
    assert len(trained) + len(dropped) == 101 * epochs
    for rid in {f"r{i}" for i in range(101)}:
        assert trained.count(rid) + dropped.count(rid) == epochs


def test_stream_errors_reach_the_trainers():
    feeder = BatchFeeder(FakeDataset(100, fail_after=2), world_size=2, per_device=4, image_columns=["image"],
                         read_batch_size=10)
    with pytest.raises(RuntimeError, match="storage went away"):
        fetch_all(feeder, 2)
