"""The demo as a plan of jobs: every stage is one ``jobs/`` entrypoint, and the plan adds only the overrides that tie
the stages together (one run name, the paths as resolved here, where each index goes). ``ray-vdr demo`` runs the
plan in one process on a local Ray cluster; ``ray-vdr demo --plan`` prints the same stages as ``ray job submit``
commands for a cluster, and the integration test (tests/test_jobs.py) submits the own-documents plan's stages to a Ray
head. So the demo, the jobs and the test cannot drift.

Stages: synthetic pages → train the embedder (Ray Train) → embed the eval corpus into the serving index → embed the
training pages into a second index → mine hard negatives from it → train the reranker on them (Ray Train) →
evaluate both stages → serve the endpoint and the search page.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass

from ray_vdr.config import ConfigError, VDRConfig

JOBS = {
    "make-data": "jobs/make_synthetic.py",
    "make-training-data": "jobs/make_training_data.py",
    "train": "jobs/train_embedder.py",
    "embed": "jobs/embed_corpus.py",
    "mine": "jobs/mine_negatives.py",
    "train-reranker": "jobs/train_reranker.py",
    "evaluate": "jobs/evaluate.py",
}


@dataclass(frozen=True)
class Stage:
    name: str
    """Unique within the plan (two stages may run the same command)."""
    command: str
    """The ``ray-vdr`` subcommand (and, through JOBS, the jobs/ entrypoint) this stage runs."""
    title: str
    overrides: tuple[str, ...] = ()
    """Dotted overrides added to the user's config and overrides for this stage."""
    artifacts: tuple[str, ...] = ()
    """Where the stage writes (printed by the demo)."""

    @property
    def job(self) -> str | None:
        return JOBS.get(self.command)


def run_name(cfg: VDRConfig, overrides: list[str]) -> str:
    """A demo trains afresh under ``<run.name>-<time>`` (rerunning a finished run would only return its model),
    unless the user names the run with a ``run.name=`` override."""
    if any(_key(o) == "run.name" for o in overrides):
        return cfg.run.name
    return f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan(cfg: VDRConfig, name: str, *, serve: bool = True) -> list[Stage]:
    """The demo's stages for a config with a ``synthetic`` section, run under the run name ``name``: the labelled
    triplets' pipeline, or (``synthetic.kind: documents``) the own-documents loop."""
    if cfg.synthetic is None:
        raise ConfigError("invalid configuration:\n  synthetic: the demo builds its data from the synthetic section "
                          "(for your own data, run the jobs/ entrypoints)")
    if cfg.synthetic.kind == "documents":
        return _own_documents_plan(cfg, name, serve=serve)
    data = cfg.synthetic.output_dir.rstrip("/")
    run = cfg.run.model_copy(update={"name": name})
    index, pages = run.uri("index"), run.uri("train-pages")
    # every stage names the run and the paths as resolved here, so jobs whose working directory is a copy of the
    # repo on the cluster read and write the same places as the stages before them
    paths = [f"run.storage_path={cfg.run.storage_path}", f"synthetic.output_dir={data}",
             f"model.name_or_path={cfg.model.name_or_path}"]
    splits = (("train", cfg.data.train), ("eval", cfg.data.eval))
    paths += [f"data.{split}.uri={src.uri}" for split, src in splits if src]
    named = (f"run.name={name}", *paths)
    reranker = cfg.model_copy(update={"run": run}).reranker_run().uri("model")
    reranker_workers = (cfg.reranker.scaling or cfg.scaling).num_workers
    stages = [
        Stage("make-data", "make-data", "synthetic VDR pages", named, (data,)),
        Stage("train", "train", f"train the embedder on Ray Train ({cfg.scaling.num_workers} workers)", named,
              (run.uri("model"),)),
        Stage("embed-corpus", "embed", "embed the eval corpus → Parquet + FAISS (the serving index)",
              (*named, f"index.sources=[{data}/images/eval]", f"index.output={index}"), (index,)),
        Stage("embed-train-pages", "embed", "embed the training pages → the index hard negatives are mined from",
              (*named, f"index.sources=[{data}/images/train]", f"index.output={pages}"), (pages,)),
        Stage("mine", "mine", "mine hard negatives for the training queries", (*named, f"mine.index={pages}"),
              (run.uri("mined"),)),
        Stage("train-reranker", "train-reranker", f"train the reranker on them (Ray Train, {reranker_workers} workers)",
              (*named, f"reranker.model.name_or_path={run.uri('reranker-base')}"), (reranker,)),
        Stage("evaluate", "evaluate", "evaluate both stages: embed only vs embed + rerank", named, (run.uri("eval"),)),
    ]
    if serve:
        # following a live manifest, so that `ray-vdr promote` with the same serve.live can switch it to a new model
        stages.append(Stage("serve", "serve", "serve the two-stage endpoint and the search page (Ray Serve)",
                            (*named, f"serve.index={index}", f"serve.live={run.uri('live.json')}")))
    return stages


def _own_documents_plan(cfg: VDRConfig, name: str, *, serve: bool) -> list[Stage]:
    """Unlabeled documents → training data → the embedder trained on it, evaluated on held-out documents' template
    questions → the documents indexed with it → the endpoint."""
    data = cfg.synthetic.output_dir.rstrip("/")
    run = cfg.run.model_copy(update={"name": name})
    made, index = run.uri("training-data"), run.uri("index")
    named = (f"run.name={name}", f"run.storage_path={cfg.run.storage_path}", f"synthetic.output_dir={data}",
             f"model.name_or_path={cfg.model.name_or_path}", f"queries.sources=[{data}/documents]",
             f"queries.output={made}", f"data.train.uri={made}/train", f"data.eval.uri={data}/heldout/eval")
    stages = [
        Stage("make-data", "make-data", "unlabeled documents (vector PDFs) and held-out documents' questions", named,
              (f"{data}/documents", f"{data}/heldout/eval")),
        Stage("make-training-data", "make-training-data", "training data from the documents: generated queries, "
              "filters, mined negatives, a split by document", named, (made,)),
        Stage("train", "train", f"train the embedder on it (Ray Train, {cfg.scaling.num_workers} workers); evaluated "
              "on the held-out documents", named, (run.uri("model"),)),
        Stage("embed-documents", "embed", "embed the documents with the finetuned embedder → Parquet + FAISS",
              (*named, f"index.sources=[{data}/documents]", f"index.output={index}"), (index,)),
    ]
    if serve:
        # the sample query: a generated one of the documents' own eval split (their pages are the ones served)
        stages.append(Stage("serve", "serve", "serve the endpoint over the documents (Ray Serve)",
                            (*named, f"serve.index={index}", f"serve.live={run.uri('live.json')}",
                             f"data.eval.uri={made}/eval")))
    return stages


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def stage_overrides(stage: Stage, overrides: list[str]) -> list[str]:
    """The user's overrides, then the stage's (which win; a key the stage sets is not repeated)."""
    mine = {_key(o) for o in stage.overrides}
    return [o for o in overrides if _key(o) not in mine] + list(stage.overrides)


def submit_command(stage: Stage, config: str, overrides: list[str], address: str = "$RAY_ADDRESS") -> str:
    """The ``ray job submit`` line that runs ``stage`` on a cluster (from the repo root)."""
    args = shlex.join(["--config", config, *stage_overrides(stage, overrides)])
    if stage.job is None:  # serving is not a batch job: it deploys onto the cluster and returns
        return f"RAY_ADDRESS={address} ray-vdr {stage.command} {args}"
    return f"ray job submit --address {address} --working-dir . -- python {stage.job} {args}"
