"""The worker side of the feeder (:mod:`ray_vdr.train.feeder`): :class:`SliceStream`, a torch IterableDataset that
fetches k steps at a time and yields one ready-made per-device batch per step; the trainer's collator (the model's
processor) turns it into tensors. A step counts as trained (in the stream's history, and in the checkpoint's position)
only once it was yielded, so steps fetched ahead but not trained are fetched again after a restart. And
:func:`history_table`, a rank's audit trail.

Kept apart from the feeder so that the feeder's actor process never imports torch (~1.7 s of CPU a training run).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch.utils.data

from ray_vdr.train.feeder import HISTORY_SCHEMA, empty_position


class SliceStream(torch.utils.data.IterableDataset):
    """torch IterableDataset of this rank's per-device batches, fetched from the feeder ``fetch_steps`` at a time.

    ``get_slices(rank, step, count)`` is :meth:`BatchFeeder.get` (through Ray in training). Iterating again continues
    where the last iteration stopped — with the slices fetched but not yet yielded — so a trainer that restarts its
    epoch loop after the data ran out sees an empty epoch and stops, instead of training rows twice.
    """

    def __init__(self, get_slices: Callable[[int, int, int], list[dict[str, Any]]], rank: int,
                 image_columns: list[str], start_step: int = 0, transform=None, fetch_steps: int = 1):
        super().__init__()
        self.get_slices = get_slices
        self.transform = transform  # per-device rows → the collator's features (e.g. a reranker's labelled pairs)
        self.rank = rank
        self.image_columns = image_columns
        self.fetch_steps = fetch_steps
        self.step = start_step  # the next step to yield
        self._fetched: deque[dict[str, Any]] = deque()  # slices of steps self.step, self.step + 1, … not yet yielded
        self.trained: list[tuple[str, int, int]] = []  # (row_id, epoch, step) handed to the trainer

    @property
    def rows(self) -> int:
        """Rows this rank has handed to the trainer since this stream started."""
        return len(self.trained)

    def __iter__(self) -> Iterator[list[dict]]:
        import io

        from PIL import Image

        while True:
            if not self._fetched:
                self._fetched.extend(self.get_slices(self.rank, self.step, self.fetch_steps))
                if not self._fetched:
                    return
            got = self._fetched.popleft()
            rows = got["rows"]
            self.trained.extend((r["row_id"], got["epoch"], self.step) for r in rows)
            self.step += 1
            batch = [
                # opened, not decoded: the collator (or, with a cached loss, each mini-batch) decodes what it needs
                {"query": r["query"], **{c: Image.open(io.BytesIO(r[c])) for c in self.image_columns}}
                for r in rows
            ]
            yield self.transform(batch) if self.transform else batch


def history_table(position: dict[str, Any] | None, trained: list[tuple[str, int, int]], rank: int) -> pa.Table:
    """This rank's audit trail for the whole run: its rows in the resumed-from position plus ``trained`` since."""
    hist = pa.table((position or empty_position())["history"], schema=HISTORY_SCHEMA)
    mine = hist.filter(pc.equal(hist["rank"], rank)) if hist.num_rows else hist
    new = pa.table({"row_id": [t[0] for t in trained], "epoch": [t[1] for t in trained],
                    "step": [t[2] for t in trained], "rank": [rank] * len(trained)}, schema=HISTORY_SCHEMA)
    return pa.concat_tables([mine, new])
