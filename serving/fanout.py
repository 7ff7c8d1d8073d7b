"""The ingress's calls to the index's Retriever groups (one, or one per shard of a sharded index): a search asks every
shard in parallel and merges by score; a page is looked up in every shard (a document lives in one). No Ray import
here: the handles are Ray Serve's, passed in.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray_vdr.corpus.store import merge_hits
from serving import core
from serving.deployments import Batched

__all__ = ["error_cause", "lookup", "search"]


def error_cause(e: BaseException) -> BaseException:
    """The exception a deployment raised (Ray wraps it in RayTaskError, which may or may not subclass it)."""
    return getattr(e, "cause", None) or e


async def search(retrievers: list[Any], gid: str, vector, k: int, clauses: list | None, scope: list | None, *,
                 allow_partial: bool, timeout: float, last: bool) -> tuple[Batched, list[int]]:
    """Every shard's top ``k`` in generation ``gid``, in parallel, merged by score; and the shards missing (only
    with ``allow_partial``). A shard still loading ``gid`` sends the whole request to the previous generation
    (NotReady; ``last``: there is none); a shard with no live replica answering within ``timeout`` seconds, or
    loading in the last generation too, is a ShardUnavailable naming it (503), or missing from a partial answer."""
    if len(retrievers) == 1:
        return await retrievers[0].search.remote(gid, vector, k, clauses, scope), []

    async def one(handle) -> Batched:
        return await handle.search.remote(gid, vector, k, clauses, scope)

    answers = await asyncio.gather(*(asyncio.wait_for(one(h), timeout) for h in retrievers), return_exceptions=True)
    found, loading, gone = [], [], []
    for i, answer in enumerate(answers):
        cause = error_cause(answer) if isinstance(answer, BaseException) else None
        if cause is None:
            found.append(answer)
        elif isinstance(cause, core.RequestError):
            raise cause
        elif isinstance(cause, core.NotReady):
            loading.append((i, str(cause)))
        else:
            gone.append((i, f"no replica answered within {timeout}s" if isinstance(cause, TimeoutError)
                         else f"{type(cause).__name__}: {cause}"[:200]))
    missing = sorted(i for i, _ in loading + gone)
    if loading and not gone and not last:
        raise core.NotReady(f"index shards {missing} have not loaded {gid}")  # the previous generation answers
    if missing and not allow_partial:
        why = "; ".join(f"shard {i}: {reason}" for i, reason in sorted(loading + gone))
        raise core.ShardUnavailable(f"index shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                                    f"of {len(retrievers)} unavailable ({why}); ask with allow_partial for the other "
                                    "shards' results", missing)
    hits = merge_hits([a.value for a in found], k)
    return Batched(hits, max((a.seconds for a in found), default=0.0), max((a.batch for a in found), default=0)), \
        missing


async def lookup(retrievers: list[Any], gid: str, doc_id: str, page: int | None, scope: list | None
                 ) -> tuple[Any, int] | None:
    """The retriever holding a live page the caller may see, and its position (a document is in one shard)."""
    found = await asyncio.gather(*(h.lookup.remote(gid, doc_id, page, scope) for h in retrievers))
    return next(((h, p) for h, p in zip(retrievers, found, strict=True) if p is not None), None)
