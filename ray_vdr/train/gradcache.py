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

Every rank must make the same number of forward and backward calls (ZeRO-2/3 communicate in each), so mini-batches
are cut by count (``mini_batch_size``), never by token budget.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["cached_loss_of", "deepspeed_cached_step"]


def cached_loss_of(loss: Any) -> Any | None:
    """The gradient-caching loss inside ``loss`` (itself, or the one a MatryoshkaLoss wraps), else None."""
    from sentence_transformers.base.losses.gradcache import uses_gradient_cache

    inner = getattr(loss, "loss", None) if type(loss).__name__ == "MatryoshkaLoss" else loss
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

    # (1) embeddings of every mini-batch, no graph; keep each forward's RNG state for the replay. The loss cuts the
    # mini-batches itself (by mini_batch_size, the same way on both passes), so the count comes from this pass.
    reps: list[list[torch.Tensor]] = []
    states: list[list[Any]] = []
    for feature in features:
        column, column_states = [], []
        for emb, state in cached_loss.embed_minibatch_iter(feature, with_grad=False, copy_random_state=True):
            column.append(emb.detach().requires_grad_())
            column_states.append(state)
        reps.append(column)
        states.append(column_states)

    # (2) the loss over the whole (gathered) batch, back-propagated to the embeddings only: the cache
    loss = cached_loss.calculate_loss(reps, labels, with_backward=True)
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
            emb, _ = next(replay)
            engine.set_gradient_accumulation_boundary(boundary and remaining == 0)
            surrogate = torch.dot(emb.flatten().float(), grad.flatten().float()) * scale
            engine.backward(surrogate, scale_wrt_gas=False)
    return loss.detach()
