"""Feeding Ray Train workers from one Ray Data stream, one equal slice of each global batch per rank.

A single :class:`BatchFeeder` (a Ray actor in training) consumes the validated stream, assembles duplicate-free
global batches with :class:`~ray_vdr.train.batching.GlobalBatcher` in a background thread (a few batches ahead of
the trainers), and hands rank r its slices of steps s, s+1, …, s+k-1 in one call (k = ``train.feeder_fetch_steps``: at
one row per rank and step the per-call cost, not the rows, bounds one feeder; see docs/bench/notes/feeder.md).
Because batch composition is decided in one place:

- every row is trained exactly once per epoch (or reported as dropped, with the reason, at the epoch's end);
- no global batch repeats a query or a page (in-batch negatives stay true negatives);
- every rank gets the same number of equally sized batches, so DDP/DeepSpeed collectives and the cross-rank
  ``all_gather`` of the loss always line up, even when rows are rejected or the last batch is partial.

The feeder also owns the *data position* that checkpoints store (:meth:`BatchFeeder.position`): the epoch of the
next step and which rows the steps before it trained or dropped. A worker group that starts — the first time, after
a worker failure, or in a rerun of the job — calls :meth:`BatchFeeder.start` with the position of the checkpoint it
resumes from; the feeder then rebuilds its stream from there, skipping the rows the epoch already used, so no row is
trained twice in an epoch however often the run is interrupted.

The worker side is :class:`ray_vdr.train.slices.SliceStream` (torch is imported there, not in this actor's process).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pyarrow as pa

from ray_vdr.train.batching import GlobalBatcher

logger = logging.getLogger(__name__)

HISTORY_SCHEMA = pa.schema([("row_id", pa.string()), ("epoch", pa.int32()), ("step", pa.int64()),
                            ("rank", pa.int32())])


class _Superseded(Exception):
    """Raised in a producer thread whose generation was replaced by a restart."""


def empty_position() -> dict[str, Any]:
    """The data position of a run that has not trained anything yet."""
    return {"step": 0, "epoch": 0, "history": HISTORY_SCHEMA.empty_table().to_pydict(), "dropped": []}


class BatchFeeder:
    """Builds global batches ahead of the trainers and serves them to each rank up to ``fetch_steps`` steps a call.

    At most ``prefetch`` × ``fetch_steps`` steps are held (built and not yet fetched by every rank): a call for
    ``fetch_steps`` steps then never waits for room that only its own later calls would free, and the memory held
    grows with the fetch size, not with the run.
    """

    def __init__(self, dataset: Any, *, world_size: int, per_device: int, image_columns: list[str],
                 epochs: int = 1, dedup: bool = True, fetch_steps: int = 1, prefetch: int = 2,
                 read_batch_size: int = 64, shuffle_buffer: int = 0, seed: int = 0):
        from ray_vdr.cluster import worker_logging

        worker_logging()
        if fetch_steps < 1 or prefetch < 1:
            raise ValueError(f"fetch_steps ({fetch_steps}) and prefetch ({prefetch}) must be at least 1")
        self.dataset = dataset
        self.epochs = epochs
        self.fetch_steps = fetch_steps
        self.held_steps = prefetch * fetch_steps
        self.read_batch_size = read_batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.world_size = world_size
        self.per_device = per_device
        self.image_columns = image_columns
        self.dedup = dedup
        self._cond = threading.Condition()
        self._start_lock = threading.Lock()  # one start() at a time: later ranks must see the finished restart
        self._token: str | None = None
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._reset(empty_position())

    # lifecycle --------------------------------------------------------------------------------------------------

    def _reset(self, position: dict[str, Any]) -> None:
        """State for a producer that starts at ``position`` (caller holds the lock or no thread runs)."""
        self._start_step = self._next_step = int(position["step"])
        self._start_epoch = int(position["epoch"])
        self._ready: dict[int, list[list[dict]]] = {}
        self._fetched: dict[int, set[int]] = {}
        self._epoch_of: dict[int, int] = {}
        self._drops_before: dict[int, int] = {}
        # rows trained by the steps before the start (from the checkpoint), then by each step built since
        hist = position["history"]
        self._history: list[tuple[str, int, int, int]] = list(zip(hist["row_id"], hist["epoch"], hist["step"],
                                                                   hist["rank"], strict=True))
        self._dropped: list[tuple[str, int, str]] = [tuple(d) for d in position["dropped"]]  # (row_id, epoch, reason)
        self._done = False
        self._error: BaseException | None = None

    def start(self, token: str, position: dict[str, Any] | None = None) -> int:
        """Begin (or restart) serving from ``position`` (a checkpoint's :meth:`position`; None = from the start).

        Every rank of a worker group calls this with the group's ``token`` before its first :meth:`get`; the first
        call of a new token stops any previous producer and rebuilds the stream, later calls are no-ops. Returns the
        step the group starts at.
        """
        with self._start_lock:
            return self._start(token, position)

    def _start(self, token: str, position: dict[str, Any] | None) -> int:
        with self._cond:
            if token == self._token:
                return self._start_step
            self._token = token
            self._generation += 1
            self._cond.notify_all()  # a producer waiting for room sees that it was superseded
            old = self._thread
        if old is not None:
            old.join(timeout=60)
        position = position or empty_position()
        with self._cond:
            self._reset(position)
            self._thread = threading.Thread(target=self._produce, args=(self._generation,), name="batch-feeder",
                                            daemon=True)
            self._thread.start()
        if position["step"]:
            logger.info("data stream resumes at step %d (epoch %d; %d rows of the run already trained)",
                        position["step"], position["epoch"], len(position["history"]["row_id"]))
        return self._start_step

    # producer ---------------------------------------------------------------------------------------------------

    def _publish(self, generation: int, epoch: int, slices: list[list[dict]]) -> None:
        with self._cond:
            while len(self._ready) >= self.held_steps and generation == self._generation:
                self._cond.wait()
            if generation != self._generation:
                raise _Superseded
            step = self._next_step
            self._ready[step] = slices
            self._fetched[step] = set()
            self._epoch_of[step] = epoch
            self._drops_before[step] = len(self._dropped)
            for rank, rows in enumerate(slices):
                self._history.extend((r["row_id"], epoch, step, rank) for r in rows)
            self._next_step += 1
            self._cond.notify_all()

    def _note_drops(self, generation: int, batcher: GlobalBatcher, epoch: int, seen: int) -> int:
        new = batcher.dropped()[seen:]
        with self._cond:
            if generation != self._generation:
                raise _Superseded
            self._dropped += [(row_id, epoch, reason) for row_id, reason in new]
        return seen + len(new)

    def _produce(self, generation: int) -> None:
        try:
            for epoch in range(self._start_epoch, self.epochs):
                # resuming mid-epoch: the rows this epoch already trained (or dropped) are not read again
                skip = set()
                if epoch == self._start_epoch:
                    skip = {h[0] for h in self._history if h[1] == epoch} | {d[0] for d in self._dropped
                                                                            if d[1] == epoch}
                batcher = GlobalBatcher(self.world_size, self.per_device, self.image_columns, dedup=self.dedup)
                seen = 0
                start, rows = time.monotonic(), 0
                shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer, "local_shuffle_seed": self.seed + epoch} \
                    if self.shuffle_buffer else {}
                batches = iter(self.dataset.iter_batches(batch_size=self.read_batch_size, batch_format="pyarrow",
                                                         **shuffle))
                try:
                    for table in batches:
                        if skip:
                            keep = [rid not in skip for rid in table.column("row_id").to_pylist()]
                            table = table.filter(pa.array(keep, pa.bool_()))
                        rows += table.num_rows
                        batcher.add_table(table)
                        while (slices := batcher.next_batch()) is not None:
                            self._publish(generation, epoch, slices)
                finally:
                    close = getattr(batches, "close", None)
                    if close is not None:
                        close()  # a superseded or failed stream stops its read tasks now
                while (slices := batcher.next_batch(final=True)) is not None:
                    seen = self._note_drops(generation, batcher, epoch, seen)
                    self._publish(generation, epoch, slices)
                seen = self._note_drops(generation, batcher, epoch, seen)
                logger.info("epoch %d: %d validated rows streamed in %.1fs%s; %d steps assembled so far, %d rows "
                            "dropped", epoch, rows, time.monotonic() - start,
                            f" ({len(skip)} skipped: trained before the resume)" if skip else "", self._next_step,
                            len(self._dropped))
        except _Superseded:
            return
        except BaseException as e:  # surfaced to the trainers on their next get()
            with self._cond:
                if generation == self._generation:
                    self._error = e
        finally:
            with self._cond:
                if generation == self._generation:
                    self._done = True
                    self._cond.notify_all()

    # consumers --------------------------------------------------------------------------------------------------

    def _wait_for(self, step: int) -> None:
        """Block until ``step`` is built or the data is exhausted (caller holds the lock)."""
        while step not in self._epoch_of and not (self._done and step >= self._next_step):
            if self._error is not None:
                break
            self._cond.wait(timeout=1.0)
        if self._error is not None:
            raise RuntimeError(f"the training data stream failed: {self._error!r}") from self._error

    def get(self, rank: int, step: int, count: int = 1) -> list[dict[str, Any]]:
        """Rank ``rank``'s slices of global batches ``step`` … ``step + count - 1``, each as {"epoch", "rows"}.

        Fewer than ``count`` when the data ends within them, none when it ended before ``step``. Waits until all
        ``count`` steps are built (or the data ends), so every rank gets the same steps in each call.
        """
        if not 1 <= count <= self.fetch_steps:
            raise ValueError(f"count {count}: this feeder serves 1 to {self.fetch_steps} steps a call (fetch_steps)")
        with self._cond:
            if self._token is None:
                raise RuntimeError("BatchFeeder.get before start(): every worker group calls start() first")
            self._wait_for(step + count - 1)  # steps are built in order: the last one built means all are
            slices = []
            for s in range(step, step + count):
                if s not in self._ready:
                    if s < self._next_step:
                        raise RuntimeError(f"step {s} was already served to every rank (a rank is out of step)")
                    break  # the data ended before this step
                slices.append({"epoch": self._epoch_of[s], "rows": self._ready[s][rank]})
                self._fetched[s].add(rank)
                if len(self._fetched[s]) == self.world_size:
                    del self._ready[s], self._fetched[s]
                    self._cond.notify_all()
            return slices

    def position(self, step: int) -> dict[str, Any]:
        """The data position before ``step``: what a checkpoint taken after ``step - 1`` stores to resume from.

        Holds the epoch ``step`` belongs to (``epochs`` when the data is exhausted), every row trained by the steps
        before it (row_id, epoch, step, rank) and the rows dropped so far.
        """
        with self._cond:
            self._wait_for(step)
            if step in self._epoch_of:
                epoch, n_dropped = self._epoch_of[step], self._drops_before[step]
            else:
                epoch, n_dropped = self.epochs, len(self._dropped)
            hist = [h for h in self._history if h[2] < step]
            dropped = self._dropped[:n_dropped]
        return {"step": step, "epoch": epoch,
                "history": {name: [h[i] for h in hist] for i, name in enumerate(HISTORY_SCHEMA.names)},
                "dropped": [list(d) for d in dropped]}

    def dropped(self) -> list[tuple[str, str]]:
        """(row_id, reason) of every row dropped so far in the run."""
        with self._cond:
            return [(row_id, f"epoch {epoch}: {reason}") for row_id, epoch, reason in self._dropped]
