"""GradCache (the cached contrastive losses) under DeepSpeed ZeRO-1, -2 and -3.

Sentence Transformers' cached losses (CachedMultipleNegativesRankingLoss, also inside MatryoshkaLoss) run in three
steps: embed every mini-batch without gradients, compute the loss over the whole batch and its gradient with
respect to the embeddings (the cache), then re-embed each mini-batch with gradients and back-propagate the cached
gradient. Upstream, step 3 runs as several nested ``backward()`` calls from a hook inside the *one* backward pass
the trainer makes per optimizer step. DeepSpeed ZeRO-2/3 reduce gradients from per-parameter hooks and reset that
state only at the end of an engine backward pass, so the nested passes reduce a parameter twice ("Gradient
computed twice for this partition", ZeRO-2) or put it twice in a bucket (the ``ds_id`` assertion, ZeRO-3);
sentence-transformers#3173.

:func:`deepspeed_cached_step` runs the same three steps but makes step 3 what DeepSpeed is built for: gradient
accumulation. Each replayed mini-batch is its own ``engine.backward`` (with the engine's epilogue), the
accumulation boundary is set only on the last one, and the caller makes one ``engine.step``. It reuses the loss's
own pieces (``embed_minibatch_iter`` with its RNG snapshots, ``calculate_loss`` — which MatryoshkaLoss decorates
to sum over its dims) and needs no change to DeepSpeed or Sentence Transformers. In-batch negatives gathered
across ranks (``gather_across_devices``) are complete after step 2, whose all_gather backward sums the
embedding gradients from every rank.

The multi-vector cached loss (Sentence Transformers' CachedMultiVectorMultipleNegativesRankingLoss, also inside
MultiVectorMatryoshkaLoss) has the same three steps with token vectors and their scoring masks, and takes the same
path.

Every rank must make the same number of forward and backward calls (ZeRO-2/3 communicate in each), so mini-batches
are cut by count (``mini_batch_size``), never by token budget.

Pages are collated per mini-batch. Sentence Transformers' collator turns every page of a batch into pixel tensors
before the loss splits it, so memory grew with the batch (batch 64 holds 128 pages' patches at once).
:func:`defer_page_collation` makes the trainer's collator hand the loss the pages themselves
(:class:`DeferredPages`, with the prompt and task the collator resolved), and :class:`PageCachedMNRL` preprocesses
each mini-batch when it embeds it: in step (1), and again in step (3), since keeping step (1)'s tensors would hold
the whole batch again. The processor is deterministic, so both passes see the same tensors. On a GPU the next
mini-batch is collated in a thread while the current one runs. Text columns are still collated by the trainer.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import torch
from PIL import Image
from sentence_transformers.base.losses.gradcache import RandContext
from sentence_transformers.multi_vector_encoder.losses import CachedMultiVectorMultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

__all__ = ["DeferredPages", "PageCachedMNRL", "cached_loss_of", "deepspeed_cached_step", "defer_page_collation"]

PAGES = "pixel_values"  # the feature key of deferred pages: ST's collect_features groups a column's keys by it
ROWS = "batch_index"  # a tensor of the column's rows, from which the loss reads the batch size


class DeferredPages:
    """A column of pages the collator left as images, with the preprocessing it would have applied to them."""

    def __init__(self, pages: list, preprocess: Callable[[list], dict[str, Any]]):
        self.pages = pages
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.pages)

    def collate(self, begin: int, end: int) -> dict[str, Any]:
        """Tensors of rows ``begin:end``, what the collator would have made of them (on the CPU)."""
        return self.preprocess([_decoded_once(page) for page in self.pages[begin:end]])


def _decoded_once(page):
    """A page opened lazily from bytes (the feeder's stream) is decoded from a new handle, so the batch keeps only
    the encoded page between the two passes; a page already decoded is used as it is."""
    fp = getattr(page, "fp", None)
    if isinstance(fp, io.BytesIO) and getattr(page, "tile", None):
        return Image.open(io.BytesIO(fp.getvalue()))
    return page


class _DeferPages:
    """The collator's preprocess function, except that a column of images comes back as :class:`DeferredPages`."""

    def __init__(self, preprocess: Callable[..., dict[str, Any]]):
        self.preprocess = preprocess

    def __call__(self, inputs: list, **kwargs) -> dict[str, Any]:
        if not inputs or not all(isinstance(x, Image.Image) for x in inputs):
            return self.preprocess(inputs, **kwargs)
        return {PAGES: DeferredPages(list(inputs), lambda pages: self.preprocess(pages, **kwargs)),
                ROWS: torch.arange(len(inputs))}


def defer_page_collation(trainer) -> bool:
    """Collate pages per mini-batch when the trainer's loss is a :class:`PageCachedMNRL`; returns whether it does."""
    collator = getattr(trainer, "data_collator", None)
    if not isinstance(cached_loss_of(trainer.loss), PageCachedMNRL) or not hasattr(collator, "preprocess_fn"):
        return False
    if not isinstance(collator.preprocess_fn, _DeferPages):
        collator.preprocess_fn = _DeferPages(collator.preprocess_fn)
    return True


class PageCachedMNRL(CachedMultipleNegativesRankingLoss):
    """CachedMultipleNegativesRankingLoss that also takes :class:`DeferredPages` columns and collates them per
    mini-batch. Other columns, and every column of a trainer whose collator does not defer, take ST's own path."""

    def embed_minibatch_iter(self, sentence_feature: dict[str, Any], with_grad: bool, copy_random_state: bool,
                             random_states: list | None = None, ranges: list[tuple[int, int]] | None = None
                             ) -> Iterator[tuple[torch.Tensor, RandContext | None]]:
        pages = sentence_feature.get(PAGES)
        if not isinstance(pages, DeferredPages):
            yield from super().embed_minibatch_iter(sentence_feature, with_grad, copy_random_state, random_states,
                                                    ranges)
            return
        device = sentence_feature[ROWS].device  # the trainer moved the row index where the model runs
        if ranges is None:  # cut by count (the DeepSpeed path): pages have no token counts until collated
            ranges = [(b, min(b + self.mini_batch_size, len(pages)))
                      for b in range(0, len(pages), self.mini_batch_size)]
        # on a GPU, collate the next mini-batch on the CPU while this one runs; on a CPU both would share the cores
        pool = ThreadPoolExecutor(1, thread_name_prefix="collate") if device.type == "cuda" else None
        try:
            ahead = pool.submit(pages.collate, *ranges[0]) if pool and ranges else None
            for i, (begin, end) in enumerate(ranges):
                features = ahead.result() if ahead else pages.collate(begin, end)
                if pool and i + 1 < len(ranges):
                    ahead = pool.submit(pages.collate, *ranges[i + 1])
                features = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                            for k, v in features.items()}
                replay = nullcontext() if random_states is None else random_states[i]  # step (1)'s RNG state
                with replay, nullcontext() if with_grad else torch.no_grad():
                    snapshot = RandContext(*features.values()) if copy_random_state else None
                    reps = self.model(features)["sentence_embedding"]
                yield reps, snapshot
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)


def cached_loss_of(loss: Any) -> Any | None:
    """The gradient-caching loss inside ``loss`` (itself, or the one a MatryoshkaLoss wraps), else None."""
    from sentence_transformers.base.losses.gradcache import uses_gradient_cache

    wraps = type(loss).__name__ in ("MatryoshkaLoss", "MultiVectorMatryoshkaLoss")
    inner = getattr(loss, "loss", None) if wraps else loss
    return inner if inner is not None and uses_gradient_cache(inner) else None


def deepspeed_cached_step(engine, cached_loss, features: list[dict[str, Any]], labels, *, boundary: bool,
                          scale: float = 1.0) -> torch.Tensor:
    """Forward and backward of one batch of a cached loss through a DeepSpeed engine; returns the detached loss.

    ``cached_loss.model`` must be the engine (Sentence Transformers' trainer puts the wrapped model there), so every
    forward goes through the engine's hooks. ``boundary`` says whether this batch ends a gradient-accumulation
    cycle; the caller then calls ``engine.step()``. ``scale`` multiplies the gradients (1 / accumulation steps).
    """
    if getattr(cached_loss, "mini_batch_num_tokens", None) is not None:
        raise ValueError("mini_batch_num_tokens gives ranks different numbers of mini-batches, which deadlocks "
                         "DeepSpeed ZeRO-2/3: use mini_batch_size")

    # A multi-vector cached loss embeds token vectors with their scoring masks, and routes each column by its task
    # (query first, then documents), which its own forward stamps on the features.
    multi = isinstance(cached_loss, CachedMultiVectorMultipleNegativesRankingLoss)
    if multi:
        features = [{**f, "task": f.get("task", "query" if i == 0 else "document")} for i, f in enumerate(features)]

    # (1) embeddings of every mini-batch, no graph; keep each forward's RNG state for the replay. The loss cuts the
    # mini-batches itself (by mini_batch_size, the same way on both passes), so the count comes from this pass.
    reps: list[list[torch.Tensor]] = []
    masks: list[list[torch.Tensor]] = []
    states: list[list[Any]] = []
    for feature in features:
        column, column_masks, column_states = [], [], []
        for emb, *mask, state in cached_loss.embed_minibatch_iter(feature, with_grad=False, copy_random_state=True):
            column.append(emb.detach().requires_grad_())
            column_masks.extend(mask)
            column_states.append(state)
        reps.append(column)
        masks.append(column_masks)
        states.append(column_states)

    # (2) the loss over the whole (gathered) batch, back-propagated to the embeddings only: the cache
    loss = cached_loss.calculate_loss(reps, masks if multi else labels, with_backward=True)
    cache = [[emb.grad for emb in column] for column in reps]
    if any(g is None for column in cache for g in column):
        raise ValueError("the loss did not use every input column; remove unused columns from the data")

    # (3) replay each mini-batch with gradients: one engine backward each, the boundary on the last
    remaining = sum(len(column) for column in cache)
    for feature, column_states, column_grads in zip(features, states, cache, strict=True):
        replay = cached_loss.embed_minibatch_iter(feature, with_grad=True, copy_random_state=False,
                                                  random_states=column_states)
        for grad in column_grads:
            remaining -= 1
            emb = next(replay)[0]
            engine.set_gradient_accumulation_boundary(boundary and remaining == 0)
            surrogate = torch.dot(emb.flatten().float(), grad.flatten().float()) * scale
            engine.backward(surrogate, scale_wrt_gas=False)
    return loss.detach()
