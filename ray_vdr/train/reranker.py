"""The reranker's training run (jobs/train_reranker.py): its config, derived from the ``reranker`` section, and where
its model lands. The mined triplets train a CrossEncoder on Ray Train.

The ``reranker`` section of a config becomes a training config of its own (:func:`training_config`) and runs
through :func:`ray_vdr.train.run.run` with the reranker recipe: the same streaming, batching, checkpointing, resume and
DeepSpeed machinery as the embedder, with BinaryCrossEntropyLoss over (query, positive, 1) and (query, negative, 0)
pairs and CrossEncoderRerankingEvaluator on the eval split.
"""

from __future__ import annotations

from ray_vdr.config import DataConfig, ModelConfig, OutputConfig, SourceConfig, TrainConfig, VDRConfig


def training_config(cfg: VDRConfig) -> VDRConfig:
    """A training config for the reranker: its model, recipe, run and the mined triplets (default mine.output)."""
    r = cfg.reranker
    model = r.model.model_dump()
    if r.model.builder == "reranker-from-vlm" and not r.model.base_model:
        model["base_model"] = cfg.run.uri("model")  # build on the embedder this config trained
    from ray_vdr.eval.mine import TRIPLETS

    data = r.data or SourceConfig(uri=f"{cfg.mine.output or cfg.run.uri('mined')}/{TRIPLETS}", format="parquet")
    negatives = r.num_negatives or cfg.mine.num_negatives
    data_cfg = DataConfig.model_validate({
        **cfg.data.model_dump(), "train": data.model_dump(), "num_negatives": negatives,
        # rows without an id column are named by a hash of query and positive: a mined row keeps its training row's id
        "id_column": None if r.data is None else cfg.data.id_column,
        "rejects_path": None,
    })
    return VDRConfig.model_validate({
        **cfg.model_dump(),
        "model": ModelConfig.model_validate(model).model_dump(),
        "data": data_cfg.model_dump(),
        "train": TrainConfig.model_validate(r.train.model_dump()).model_dump(),
        "scaling": (r.scaling or cfg.scaling).model_dump(),
        "run": cfg.reranker_run().model_dump(),
        "output": OutputConfig(truncate_dim=None).model_dump(),
        "synthetic": None,
    })


def run(cfg: VDRConfig):
    """Train the reranker described by ``cfg.reranker``; returns :class:`ray_vdr.train.run.TrainResult`."""
    from ray_vdr.storage import is_file
    from ray_vdr.train.run import run as train

    tcfg = training_config(cfg)
    m = tcfg.model
    built = m.builder != "load" and is_file(f"{m.name_or_path}/modules.json")
    if m.builder == "reranker-from-vlm" and not built and m.base_model == cfg.run.uri("model") \
            and not is_file(f"{m.base_model}/config.json"):
        raise FileNotFoundError(f"reranker.model builds on this config's embedder, but there is no trained embedder "
                                f"at {m.base_model}: train it first (jobs/train_embedder.py) or set "
                                "reranker.model.base_model")
    return train(tcfg, task="reranker")
