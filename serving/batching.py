"""Dynamic batching that does not wait: requests queue while the model runs, and each model call takes every queued
request (up to ``max_batch_size``).

Ray Serve's ``@serve.batch`` (2.60) closes a batch ``batch_wait_timeout_s`` after its first request and then starts
the next one at once, while the first is still running: a lone request always pays the wait (7 ms across the
embedder and the retriever with the earlier defaults), and with no wait every request under load became a batch of
one queued behind the others (bench/serve_overhead.py, docs/benchmarks.md). Here the next batch is taken only when
the model is free, so a lone request goes at once and batches grow with the load by themselves. ``wait_s`` > 0 also
holds a batch that is not full for up to that long before the call (for models whose cost barely grows with the
batch).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Batcher"]


class Batcher:
    """``await batcher(item)`` → ``fn``'s answer for ``item``; ``fn`` takes a list of items and returns one answer per
    item, in order. An answer that is an exception is raised to its own caller only (a per-request error: the batch's
    other requests get their answers); an exception ``fn`` raises goes to every request of that batch."""

    def __init__(self, fn: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int, wait_s: float = 0.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._runner: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._queue:
            if self.wait_s and len(self._queue) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]
            batch = [(item, f) for item, f in batch if not f.done()]  # a caller that gave up (timeout) is skipped
            if not batch:
                continue
            try:
                answers = await self.fn([item for item, _ in batch])
                if len(answers) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(answers)} answers for {len(batch)} items")
            except Exception as e:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), answer in zip(batch, answers, strict=True):
                if f.done():
                    continue
                if isinstance(answer, BaseException):
                    f.set_exception(answer)
                else:
                    f.set_result(answer)
