"""Helpers for the serving tests: a tiny embedder overfitted so that planted queries find their pages."""

from __future__ import annotations

import io
import shutil
from pathlib import Path


def overfit_embedder(src: str | Path, dest: str | Path, queries: list[str], pages: list[bytes], *, steps: int = 40,
                     lr: float = 5e-3) -> Path:
    """Copy the model at ``src`` to ``dest`` and train it in-process (plain MNRL, query/document prompts) on the
    (query, page) pairs until each query's page is its nearest: a random-weight model cannot retrieve anything, and
    the endpoint tests need queries with a known right answer."""
    import datasets
    from PIL import Image
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    from ray_vdr.models.processor import install_image_only_processor

    install_image_only_processor()
    dest = Path(dest)
    model = SentenceTransformer(str(src), device="cpu")
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pages]
    ds = datasets.Dataset.from_dict({"query": queries, "page": images})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(dest.with_name(dest.name + "-trainer")), max_steps=steps, per_device_train_batch_size=len(queries),
        learning_rate=lr, warmup_steps=0, lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=steps, seed=0, disable_tqdm=True,
        prompts={"query": model.prompts["query"], "page": model.prompts["document"]},
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                         loss=MultipleNegativesRankingLoss(model))
    trainer.train()
    if dest.exists():
        shutil.rmtree(dest)
    model.save(str(dest))
    shutil.rmtree(dest.with_name(dest.name + "-trainer"), ignore_errors=True)
    return dest
