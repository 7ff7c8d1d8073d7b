"""The endpoint's batcher (serving/batching.py) and the stages' batch loop (serving/deployments.py's Stage), without
Ray: a lone request is not held back, requests that arrive while the model runs go together in the next call,
answers go back to their own callers, an error fails only its batch, and a per-request error (a generation not
loaded) only its own request."""

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


async def _outcome(call) -> tuple[str, object]:
    """("answered", the answer) or ("raised", the exception): an exception *returned* is not one raised."""
    try:
        return "answered", await call
    except Exception as e:
        return "raised", e


def test_an_exception_answer_is_raised_to_its_own_caller_only():
    async def model(items):
        return [ValueError(f"no {x}") if x % 2 else x for x in items]

    async def main():
        batcher = Batcher(model, max_batch_size=4)
        return await asyncio.gather(*(_outcome(batcher(x)) for x in range(4)))

    got = asyncio.run(main())
    assert [got[0], got[2]] == [("answered", 0), ("answered", 2)]
    assert [(how, str(e)) for how, e in (got[1], got[3])] == [("raised", "no 1"), ("raised", "no 3")]


def test_a_stage_raises_not_ready_to_the_requests_of_a_generation_it_has_not_loaded(tmp_path):
    """One batch with requests for the loaded generation and for another one (a promotion switching): the loaded
    generation's requests get their answers, with the batch's size; the others raise NotReady, each."""
    from ray_vdr.config import ServeConfig
    from serving.core import NotReady
    from serving.deployments import Batched, EmbedCall, Stage

    class Echo(Stage):
        def load(self, gen, say):
            return gen.id

        async def run_batch(self, loaded, requests):
            return [f"{loaded}:{r.item}" for r in requests]

    cfg = ServeConfig(index=str(tmp_path / "index"), metrics=False, embedder={"max_batch_size": 8})
    stage = Echo(cfg.model_dump(mode="json"))
    deadline = time.time() + 10
    while stage.status().state != "ready":
        assert time.time() < deadline, stage.status()
        time.sleep(0.01)
    gid = stage.status().generation

    async def main():
        calls = [EmbedCall(gid, "a"), EmbedCall("g-other", "b"), EmbedCall(gid, "c"), EmbedCall("g-other", "d")]
        return await asyncio.gather(*(_outcome(stage.batcher(c)) for c in calls))

    (how_a, a), (how_b, b), (how_c, c), (how_d, d) = asyncio.run(main())
    assert (how_a, how_c) == ("answered", "answered") and isinstance(a, Batched) and isinstance(c, Batched)
    assert (a.value, c.value, a.batch) == (f"{gid}:a", f"{gid}:c", 4)
    assert (how_b, how_d) == ("raised", "raised") and isinstance(b, NotReady) and isinstance(d, NotReady)
    assert "g-other is not served here" in str(b)


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
