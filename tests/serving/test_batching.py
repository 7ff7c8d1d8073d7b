"""The endpoint's batcher (serving/batching.py), without Ray: a lone request is not held back, requests that arrive
while the model runs go together in the next call, answers go back to their own callers, and an error fails only
its batch."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.batching import Batcher


def test_a_lone_request_goes_at_once_and_batches_form_while_the_model_runs():
    calls: list[list[int]] = []

    async def model(items):
        calls.append(list(items))
        await asyncio.sleep(0.05)  # the model's forward
        return [x * 10 for x in items]

    async def lone(wait_s: float) -> float:
        t = time.perf_counter()
        assert await Batcher(model, max_batch_size=4, wait_s=wait_s)(1) == 10
        return time.perf_counter() - t

    async def main():
        batcher = Batcher(model, max_batch_size=4)
        first = asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0.01)  # the model is busy with [2]: these queue up behind it
        rest = [asyncio.ensure_future(batcher(x)) for x in range(3, 9)]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first == 20 and rest == [x * 10 for x in range(3, 9)]
    assert calls == [[2], [3, 4, 5, 6], [7, 8]]  # full batches of what queued, in order, up to max_batch_size
    # no wait for company by default; a configured wait holds a batch that is not full (wide margins: a busy machine)
    assert asyncio.run(lone(0.0)) < 0.5 <= asyncio.run(lone(0.5))


def test_a_failing_batch_fails_its_own_requests_only():
    async def model(items):
        await asyncio.sleep(0.02)
        if 13 in items:
            raise ValueError("bad item")
        return items

    async def main():
        batcher = Batcher(model, max_batch_size=2)
        first = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.005)
        bad = [asyncio.ensure_future(batcher(x)) for x in (12, 13)]
        good = asyncio.ensure_future(batcher(14))
        return await first, await asyncio.gather(*bad, return_exceptions=True), await good

    first, bad, good = asyncio.run(main())
    assert first == 1 and good == 14
    assert all(isinstance(e, ValueError) for e in bad)


def test_wrong_answer_count_and_size_are_refused():
    async def model(items):
        return items[:1]

    async def main():
        batcher = Batcher(model, max_batch_size=4)
        first = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0)
        return await asyncio.gather(first, batcher(2), batcher(3), return_exceptions=True)

    assert asyncio.run(main())[0] == 1
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(model, max_batch_size=0)
