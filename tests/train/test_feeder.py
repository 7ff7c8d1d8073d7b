"""BatchFeeder without Ray: ranks in threads fetch their slices while the producer thread runs ahead."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from ray_vdr.train.feeder import BatchFeeder


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


def fetch_all(feeder: BatchFeeder, world: int, token: str = "group-1", position: dict | None = None,
              stop_at: int | None = None) -> list[list[str]]:
    """Each rank (a thread) starts the feeder with the group token and fetches its slices until the data ends
    (or until ``stop_at``, like a worker group that fails there)."""
    got: list[list[str]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def rank_loop(rank: int) -> None:
        try:
            step = feeder.start(token, position)
            while step != stop_at and (batch := feeder.get(rank, step)) is not None:
                got[rank].extend(r["row_id"] for r in batch["rows"])
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


def test_resume_from_a_position_trains_each_row_once_per_epoch():
    """A worker group fails after step 7; a new group resumes from the position saved after step 4 (the last
    checkpoint), in a new feeder (a rerun of the job) and in the same one (a worker restart)."""
    for same_feeder in (False, True):
        make = lambda: BatchFeeder(FakeDataset(101), world_size=2, per_device=4,  # noqa: E731
                                   image_columns=["image"], epochs=2, read_batch_size=7, shuffle_buffer=16)
        first = make()
        fetch_all(first, 2, token="attempt-1", stop_at=8)
        position = first.position(5)
        assert position["step"] == 5 and position["epoch"] == 0 and len(position["history"]["row_id"]) == 5 * 8
        second = first if same_feeder else make()
        got = fetch_all(second, 2, token="attempt-2", position=position)
        trained = position["history"]["row_id"] + [rid for g in got for rid in g]
        dropped = [rid for rid, _ in second.dropped()]
        for rid in {f"r{i}" for i in range(101)}:
            assert trained.count(rid) + dropped.count(rid) == 2, rid
        assert len(got[0]) == len(got[1])
        # after the data is exhausted the position says so, with the whole run's history
        end = second.position(10_000 if same_feeder else 10_000)
        assert end["epoch"] == 2 and len(end["history"]["row_id"]) == len(trained)


def test_get_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="start"):
        BatchFeeder(FakeDataset(10), world_size=1, per_device=2, image_columns=["image"]).get(0, 0)
