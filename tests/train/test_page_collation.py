"""Pages collated per mini-batch inside the cached loss (ray_vdr.train.gradcache): the same loss and gradients as
Sentence Transformers' CachedMNRL on a batch its collator preprocessed whole, while no preprocessing call sees more
pages than one mini-batch, and the batch keeps its pages encoded (decoded one mini-batch at a time)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

MINI = 2
ROWS = 6
DIMS = [64, 32]


@pytest.fixture(scope="module")
def batch(synthetic):
    cfg, _ = synthetic
    table = pq.read_table(f"{cfg.output_dir}/train").slice(0, ROWS)
    def png(column: str) -> list[bytes]:
        return [v["bytes"] if isinstance(v, dict) else v for v in table.column(column).to_pylist()]

    return table.column("query").to_pylist(), png("image"), png("negative_0")


def _step(model_dir, batch, *, deferred: bool):
    """One forward/backward of CachedMNRL (mini-batch 2) in MatryoshkaLoss through the trainer's collator; returns
    the loss, the gradients, the largest number of pages one preprocessing call saw, and the batch's pages."""
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss, MatryoshkaLoss

    from ray_vdr.train.gradcache import PageCachedMNRL, defer_page_collation

    torch.manual_seed(0)
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.train()
    seen = [0]

    def preprocess(inputs, **kwargs):
        seen[0] = max(seen[0], sum(isinstance(x, Image.Image) for x in inputs))
        return model.preprocess(inputs, **kwargs)

    prompts = {"query": model.prompts.get("query"), "image": model.prompts.get("document"),
               "negative_0": model.prompts.get("document")}
    collator = SentenceTransformerDataCollator(preprocess_fn=preprocess,
                                               prompts={k: v for k, v in prompts.items() if v})
    cls = PageCachedMNRL if deferred else CachedMultipleNegativesRankingLoss
    loss = MatryoshkaLoss(model, cls(model, mini_batch_size=MINI), matryoshka_dims=DIMS)
    assert defer_page_collation(SimpleNamespace(loss=loss, data_collator=collator)) is deferred
    queries, pages, negatives = batch
    opened = [Image.open(io.BytesIO(b)) for b in pages + negatives]  # lazily, as the feeder's stream opens them
    rows = [{"query": q, "image": p, "negative_0": n} for q, p, n in
            zip(queries, opened[:ROWS], opened[ROWS:], strict=True)]
    inputs = collator(rows)
    features = [{k[len(c) + 1:]: v for k, v in inputs.items() if k.startswith(c + "_")}
                for c in ("query", "image", "negative_0")]
    value = loss(features, None)
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.item(), grads, seen[0], opened


def test_pages_collated_per_mini_batch_give_st_loss_and_gradients(tiny_qwen, batch):
    ref_loss, ref_grads, ref_seen, _ = _step(tiny_qwen, batch, deferred=False)
    loss, grads, seen, opened = _step(tiny_qwen, batch, deferred=True)
    assert ref_seen == ROWS  # ST preprocesses each column's pages at once
    assert seen == MINI  # here never more than one mini-batch of pages at a time
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(page.tile for page in opened), "the batch's pages were decoded in place (they stay encoded)"
