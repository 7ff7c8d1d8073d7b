"""Global batch assembly for contrastive training from a stream: duplicate-free, exactly-once, equal per rank.

In-batch negatives make a batch's composition part of the loss: a page or query that appears twice in one global
batch is a false negative. Sentence Transformers' NO_DUPLICATES sampler needs a map-style dataset; here rows
arrive as a stream, so :class:`GlobalBatcher` builds each global batch from a look-ahead buffer, deferring (never
dropping) rows that would repeat a query or a page, and cuts it into one equal slice per rank (``all_gather``
needs identical shapes on every rank).

Every row ends up in exactly one global batch, except when the stream ends: the final partial batch is trained
with ``len // world`` rows per rank, and the at most ``world - 1`` rows that cannot be split evenly — or rows that
could only form a batch with duplicates — are returned by :meth:`GlobalBatcher.dropped` with a reason, so the
caller records them. Pure Python over Arrow rows; no Ray.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field

import pyarrow as pa

__all__ = ["GlobalBatcher", "Row"]


@dataclass
class Row:
    """One validated training row with the keys that must stay unique within a global batch."""

    data: dict
    query_key: str
    page_keys: tuple[str, ...]

    @property
    def row_id(self) -> str:
        return self.data["row_id"]

    @classmethod
    def from_dict(cls, data: dict, image_columns: list[str]) -> Row:
        pages = tuple(hashlib.blake2b(data[c], digest_size=8).hexdigest() for c in image_columns)
        return cls(data, " ".join(str(data["query"]).casefold().split()), pages)


@dataclass
class GlobalBatcher:
    world_size: int
    per_device: int
    image_columns: list[str]
    dedup: bool = True
    lookahead: int = 4  # buffer up to this many global batches of rows while hunting for duplicate-free rows
    _buffer: deque[Row] = field(default_factory=deque)
    _dropped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_device

    def add_table(self, table: pa.Table) -> None:
        for data in table.to_pylist():
            self._buffer.append(Row.from_dict(data, self.image_columns))

    def _take(self, n: int) -> list[Row]:
        """Up to n rows from the front of the buffer with no repeated query or page; skipped rows keep their place."""
        taken: list[Row] = []
        skipped: list[Row] = []
        queries: set[str] = set()
        pages: set[str] = set()
        while self._buffer and len(taken) < n:
            row = self._buffer.popleft()
            if self.dedup and (row.query_key in queries or pages.intersection(row.page_keys)
                               or len(set(row.page_keys)) < len(row.page_keys)):
                skipped.append(row)
                continue
            taken.append(row)
            queries.add(row.query_key)
            pages.update(row.page_keys)
        self._buffer.extendleft(reversed(skipped))
        return taken

    def next_batch(self, final: bool = False) -> list[list[dict]] | None:
        """The next global batch as ``world_size`` slices, or None when more input is needed (or, if final,
        none is left).

        Without ``final`` a batch is only cut when the buffer yields a full one; with ``final`` (the stream has
        ended) the remainder is drained into equal-sized partial batches.
        """
        if not final and len(self._buffer) < self.global_batch:
            return None
        rows = self._take(self.global_batch)
        if len(rows) == self.global_batch:
            return self._slices(rows, self.per_device)
        if not final:  # not enough distinct rows buffered yet: keep them and wait for more input
            self._buffer.extendleft(reversed(rows))
            return None
        per = len(rows) // self.world_size
        rows, extra = rows[: per * self.world_size], rows[per * self.world_size :]
        if self._buffer and rows:  # rows skipped as duplicates remain: the extras can join their batch
            self._buffer.extendleft(reversed(extra))
        else:
            reason = f"end of epoch: the last rows cannot be split evenly across {self.world_size} workers"
            self._dropped += [(r.row_id, reason) for r in extra]
        if not rows:
            self._dropped += [(r.row_id, "end of epoch: only rows repeating a query or page of each other were left")
                              for r in self._buffer]
            self._buffer.clear()
            return None
        return self._slices(rows, per)

    def _slices(self, rows: list[Row], per_device: int) -> list[list[dict]]:
        return [[r.data for r in rows[i * per_device : (i + 1) * per_device]] for i in range(self.world_size)]

    def dropped(self) -> list[tuple[str, str]]:
        """(row_id, reason) of rows that could not be placed in any batch."""
        return list(self._dropped)
