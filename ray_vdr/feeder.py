"""Feeding Ray Train workers from one Ray Data stream, one equal slice of each global batch per rank.

A single :class:`BatchFeeder` (a Ray actor in training) consumes the validated stream, assembles duplicate-free
global batches with :class:`~ray_vdr.data.batching.GlobalBatcher` in a background thread (a few batches ahead of
the trainers), and hands rank r its slice of step s. Because batch composition is decided in one place:

- every row is trained exactly once per epoch (or reported as dropped, with the reason, at the epoch's end);
- no global batch repeats a query or a page (in-batch negatives stay true negatives);
- every rank gets the same number of equally sized batches, so DDP/DeepSpeed collectives and the cross-rank
  ``all_gather`` of the loss always line up, even when rows are rejected or the last batch is partial.

The worker side, :class:`SliceStream`, is a torch IterableDataset that yields one ready-made per-device batch per
step; the trainer's collator (the model's processor) turns it into tensors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import torch.utils.data

from ray_vdr.data.batching import GlobalBatcher

logger = logging.getLogger(__name__)


class BatchFeeder:
    """Builds global batches ahead of the trainers and serves them slice by slice."""

    def __init__(self, dataset: Any, *, world_size: int, per_device: int, image_columns: list[str],
                 epochs: int = 1, dedup: bool = True, prefetch: int = 2, read_batch_size: int = 64,
                 shuffle_buffer: int = 0, seed: int = 0):
        from ray_vdr.cluster import worker_logging

        worker_logging()
        self.dataset = dataset
        self.epochs = epochs
        self.prefetch = prefetch
        self.read_batch_size = read_batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.batcher = GlobalBatcher(world_size, per_device, image_columns, dedup=dedup)
        self.world_size = world_size
        self._ready: dict[int, list[list[dict]]] = {}
        self._fetched: dict[int, set[int]] = {}
        self._next_step = 0  # the next step the producer builds
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._produce, name="batch-feeder", daemon=True)
        self._thread.start()

    # producer ---------------------------------------------------------------------------------------------------

    def _publish(self, slices: list[list[dict]]) -> None:
        with self._cond:
            while len(self._ready) >= self.prefetch:
                self._cond.wait()
            self._ready[self._next_step] = slices
            self._fetched[self._next_step] = set()
            self._next_step += 1
            self._cond.notify_all()

    def _produce(self) -> None:
        try:
            for epoch in range(self.epochs):
                start, rows = time.monotonic(), 0
                shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer, "local_shuffle_seed": self.seed + epoch} \
                    if self.shuffle_buffer else {}
                batches = self.dataset.iter_batches(batch_size=self.read_batch_size, batch_format="pyarrow", **shuffle)
                for table in batches:
                    rows += table.num_rows
                    self.batcher.add_table(table)
                    while (slices := self.batcher.next_batch()) is not None:
                        self._publish(slices)
                while (slices := self.batcher.next_batch(final=True)) is not None:
                    self._publish(slices)
                logger.info("epoch %d: %d validated rows streamed in %.1fs; %d steps assembled so far, %d rows "
                            "dropped", epoch, rows, time.monotonic() - start, self._next_step,
                            len(self.batcher.dropped()))
        except BaseException as e:  # surfaced to the trainers on their next get()
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    # consumers --------------------------------------------------------------------------------------------------

    def get(self, rank: int, step: int) -> list[dict] | None:
        """Rank ``rank``'s slice of global batch ``step``; None when the data is exhausted."""
        with self._cond:
            while step not in self._ready and not (self._done and step >= self._next_step):
                if self._error is not None:
                    break
                self._cond.wait(timeout=1.0)
            if self._error is not None:
                raise RuntimeError(f"the training data stream failed: {self._error!r}") from self._error
            if step not in self._ready:
                return None
            rows = self._ready[step][rank]
            self._fetched[step].add(rank)
            if len(self._fetched[step]) == self.world_size:
                del self._ready[step], self._fetched[step]
                self._cond.notify_all()
            return rows

    def dropped(self) -> list[tuple[str, str]]:
        return self.batcher.dropped()


class SliceStream(torch.utils.data.IterableDataset):
    """torch IterableDataset of this rank's per-device batches, fetched from the feeder step by step.

    Iterating again continues where the last iteration stopped, so a trainer that restarts its epoch loop after
    the data ran out sees an empty epoch and stops, instead of training rows twice.
    """

    def __init__(self, get_slice, rank: int, image_columns: list[str]):
        super().__init__()
        self.get_slice = get_slice
        self.rank = rank
        self.image_columns = image_columns
        self.step = 0
        self.trained_ids: list[str] = []

    @property
    def rows(self) -> int:
        """Rows this rank has trained (handed to the trainer) so far."""
        return len(self.trained_ids)

    def __iter__(self) -> Iterator[list[dict]]:
        import io

        from PIL import Image

        while True:
            rows = self.get_slice(self.rank, self.step)
            if rows is None:
                return
            self.step += 1
            self.trained_ids.extend(r["row_id"] for r in rows)
            yield [
                {"query": r["query"], **{c: Image.open(io.BytesIO(r[c])).convert("RGB") for c in self.image_columns}}
                for r in rows
            ]


def trained_ids_table(ids: list[str], rank: int) -> pa.Table:
    return pa.table({"row_id": pa.array(ids, pa.string()), "rank": pa.array([rank] * len(ids), pa.int32())})
