"""BatchFeeder without Ray: ranks in threads fetch their slices while the producer thread runs ahead."""

from __future__ import annotations

import itertools
import threading

import pyarrow as pa
import pytest

from ray_vdr.train.feeder import BatchFeeder
from ray_vdr.train.slices import SliceStream


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


def in_rank_threads(world: int, rank_loop) -> None:
    """Run ``rank_loop(rank)`` for every rank in its own thread, as the workers of a group run; re-raise a failure."""
    errors: list[BaseException] = []

    def guarded(rank: int) -> None:
        try:
            rank_loop(rank)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a rank is still waiting for its data after 60 s"


def fetch_all(feeder: BatchFeeder, world: int, token: str = "group-1", position: dict | None = None,
              stop_at: int | None = None) -> list[list[str]]:
    """Each rank (a thread) starts the feeder with the group token and fetches its slices one step a call until the
    data ends (or until ``stop_at``, like a worker group that fails there)."""
    got: list[list[str]] = [[] for _ in range(world)]

    def rank_loop(rank: int) -> None:
        step = feeder.start(token, position)
        while step != stop_at and (batch := feeder.get(rank, step)):
            assert len(batch) == 1
            got[rank].extend(r["row_id"] for r in batch[0]["rows"])
            step += 1

    in_rank_threads(world, rank_loop)
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


def test_fetching_several_steps_a_call_serves_the_same_slices():
    """SliceStream fetching 4 or 5 steps a call yields each rank the same rows per step as one step a call, to the
    ragged end of the last epoch (a last call gets fewer steps, the next none), and records a step as trained only
    when it was yielded: an iteration stopped inside a fetched window continues with that window."""
    make = lambda fetch_steps: BatchFeeder(FakeDataset(101), world_size=3, per_device=4,  # noqa: E731
                                           image_columns=["image"], epochs=2, read_batch_size=7,
                                           fetch_steps=fetch_steps)
    one = make(1)
    by_step = [[] for _ in range(3)]  # per rank: (epoch, step, row_ids) of every step, one step a call

    def one_step_a_call(rank: int) -> None:
        step = one.start("group-1")
        while got := one.get(rank, step):
            by_step[rank].append((got[0]["epoch"], step, [r["row_id"] for r in got[0]["rows"]]))
            step += 1

    in_rank_threads(3, one_step_a_call)
    steps = len(by_step[0])
    assert steps > 10 and all(len(b) == steps for b in by_step)
    every_row = {f"r{i}" for i in range(101)}
    trained = [rid for b in by_step for _, _, rows in b for rid in rows] + [rid for rid, _ in one.dropped()]
    assert sorted(trained) == sorted([*every_row, *every_row])  # every row once per epoch (trained or dropped)

    for fetch_steps in (4, 5):
        assert steps % fetch_steps  # the last call gets fewer steps than asked for
        feeder = make(fetch_steps)
        streams = [SliceStream(feeder.get, rank, image_columns=[], fetch_steps=fetch_steps) for rank in range(3)]
        in_rank_threads(3, lambda rank, feeder=feeder, streams=streams: stream_in_two_parts(feeder, streams[rank],
                                                                                            steps))
        for rank, stream in enumerate(streams):
            got = [(epoch, step, [rid for rid, _, s in stream.trained if s == step])
                   for epoch, step in dict.fromkeys((e, s) for _, e, s in stream.trained)]
            assert got == by_step[rank], (fetch_steps, rank)
        with pytest.raises(ValueError, match="fetch_steps"):
            feeder.get(0, steps, fetch_steps + 1)


def stream_in_two_parts(feeder: BatchFeeder, stream: SliceStream, steps: int) -> None:
    """A rank's trainer takes 2 batches (inside the first fetched window), then iterates again to the end."""
    stream.step = feeder.start("group-1")
    first = list(itertools.islice(iter(stream), 2))
    assert len(first) == 2 and stream.step == 2 and {t[2] for t in stream.trained} == {0, 1}
    assert len(list(stream)) == steps - 2  # continues with the window's rest, to the end of the data
    assert list(stream) == []  # and stays at the end


def test_get_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="start"):
        BatchFeeder(FakeDataset(10), world_size=1, per_device=2, image_columns=["image"]).get(0, 0)


def test_the_feeder_module_imports_no_torch():
    """The feeder's actor process imports ray_vdr.train.feeder only: torch (~1.7 s of CPU there, every training run)
    stays on the workers' side (ray_vdr.train.slices)."""
    import subprocess
    import sys

    code = "import sys, ray_vdr.train.feeder; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
