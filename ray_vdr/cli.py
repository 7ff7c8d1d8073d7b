"""The ``ray-vdr`` command line. Every subcommand takes ``--config FILE`` and dotted overrides (``train.lr=1e-4``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ray_vdr.cli_index import cmd_compact, cmd_delete, cmd_embed
from ray_vdr.config import ConfigError, VDRConfig, dump_config, load_config
from ray_vdr.config_help import command_epilog, show

logger = logging.getLogger("ray_vdr")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 scaling.num_workers=2")


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the config sections it reads (ray_vdr/config_help.py)."""
    p = sub.add_parser(name, help=help_text, epilog=command_epilog(name),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> VDRConfig:
    return load_config(args.config, args.overrides)


def cmd_config(cfg: VDRConfig) -> int:
    """Validate and print the resolved config."""
    sys.stdout.write(dump_config(cfg))
    return 0


def cmd_make_data(cfg: VDRConfig) -> int:
    from ray_vdr.data.documents import write_documents
    from ray_vdr.data.synthetic import write_synthetic

    if cfg.synthetic is None:
        raise ConfigError("invalid configuration:\n  synthetic: this command needs a synthetic section")
    summary = (write_documents if cfg.synthetic.kind == "documents" else write_synthetic)(cfg.synthetic)
    print(f"synthetic dataset in {cfg.synthetic.output_dir}: {summary.model_dump_json()}")
    return 0


def cmd_build_model(cfg: VDRConfig) -> int:
    from ray_vdr.models.load import ensure_model_files

    print(f"model files at {ensure_model_files(cfg.model)}")
    return 0


def _report_training(result, run_name: str, what: str, eval_label: str) -> None:
    """What a training run made: artifact, metrics, rows trained, dropped and rejected, evaluation, time."""
    from ray_vdr.data.sources import count_rejects

    print(f"trained {what}: {result.model_uri}")
    if result.metrics.get("resumed_from_step"):
        print(f"resumed run {run_name!r} from its checkpoint at step {result.metrics['resumed_from_step']}")
    print(f"metrics: {json.dumps({k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))})}")
    print(f"training rows: {result.rows_trained} trained, {result.rows_dropped} dropped at epoch ends "
          f"(row ids and reasons under {result.model_uri.rsplit('/', 1)[0]})")
    for split in ("train", "eval"):
        rejects = count_rejects(f"{result.rejects_uri}/{split}")
        print(f"rejected {split} rows: {rejects or 'none'} ({result.rejects_uri}/{split})")
    if result.eval_table:
        print(f"{eval_label} (base → finetuned):\n{result.eval_table}")
    print(f"training took {result.seconds:.1f}s")


def cmd_train(cfg: VDRConfig) -> int:
    from ray_vdr.train.run import run

    _report_training(run(cfg), cfg.run.name, "model", "retrieval on the eval split")
    return 0


def cmd_mine(cfg: VDRConfig) -> int:
    from ray_vdr.eval.mine import run

    result = run(cfg)
    s = result.summary
    print(f"mined triplets: {result.output} ({cfg.mine.num_negatives} negatives per query from ranks "
          f"{cfg.mine.rank_min}..{cfg.mine.rank_max})")
    print(f"this run: {s.rows_mined} rows mined, {s.rows_rejected} rejected (too few negatives; reasons in "
          f"{result.output}/rejects), {s.input_rejects} input rows invalid ({result.output}/input-rejects), "
          f"{s.rows_done_before} done by earlier runs; candidates dropped: {s.dropped_positive} "
          f"positive, {s.dropped_near_duplicate} near-duplicates, {s.dropped_within_margin} within the margin; "
          f"{s.rows_per_second} rows/s")
    return 0


def cmd_make_training_data(cfg: VDRConfig) -> int:
    from ray_vdr.queries.run import run

    r = run(cfg)
    s = r.summary
    p, sp = s["pages"], s["splits"]
    print(f"training data: {r.output} (train {sp['train']} rows, eval {sp['eval']} rows; card {r.card})")
    for warning in s["split"]["warnings"]:
        print(f"WARNING: {warning}")
    print(f"pages: {p['in']} in = {p['kept']} with a kept query + {p['rejected']} rejected "
          f"({', '.join(f'{k}: {n}' for k, n in sorted(p['rejected_by_reason'].items())) or 'none'}; "
          f"{r.output}/rejected-pages.parquet)")
    q = s["queries"]
    print(f"queries: {q['generated']} generated, rejected: "
          f"{', '.join(f'{k}: {n}' for k, n in sorted(q['rejected_by_reason'].items())) or 'none'} "
          f"({r.output}/generated, {r.output}/rejects); "
          + ("consistency filter off" if s["consistency"] == "off"
             else f"consistency kept {s['consistency_kept']} of {s['consistency_checked']}"))
    print(f"generation: {s['rates']['pages_per_second']} pages/s, {s['rates']['queries_per_second']} queries/s; "
          f"took {s['seconds']['total']:.0f}s")
    return 0


def cmd_train_reranker(cfg: VDRConfig) -> int:
    from ray_vdr.train.reranker import run

    result = run(cfg)
    _report_training(result, cfg.reranker_run().name, "reranker",
                     "reranking each eval query's positive among its hard negatives")
    return 0


def cmd_benchmark(cfg: VDRConfig) -> int:
    from ray_vdr.eval.benchmark import run

    report = run(cfg)
    print(report["table"])
    print(f"reports: {report['output']}/benchmark.md, benchmark.json, benchmark.png")
    return 0


def cmd_evaluate(cfg: VDRConfig) -> int:
    from ray_vdr.eval.two_stage import run

    report = run(cfg)
    print(f"two-stage evaluation: {report.eval_queries} queries, {report.eval_corpus} pages, dim {report.dim}, "
          f"embedder {report.embedder}, reranker {report.reranker or '(none: embed only)'}")
    print(report.table)
    print(f"reports: {report.output}/eval.md, eval.json, eval.png")
    return 0


def cmd_promote(cfg: VDRConfig) -> int:
    from ray_vdr.promote import run

    r = run(cfg)
    if r.metrics:
        print("| embedder | model | dim | ndcg@10 | mrr@10 | recall@10 |\n|---|---|---|---|---|---|")
        for name, gen in (("live", r.before), ("candidate", r.candidate)):
            m = r.metrics[name]
            print(f"| {name} | {gen.model} | {gen.dim} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} "
                  f"| {m['recall@10']:.4f} |")
    print(f"{'promoted' if r.promoted else 'not promoted'}: {r.reason}")
    print(f"live: {r.live.id} (model {r.live.model}, index {r.live.index}); manifest {r.manifest}")
    if r.switched is None and r.promoted:
        print("no endpoint answered: one started with this serve.live serves the new generation")
    return 0


def _sample_query(cfg: VDRConfig) -> dict[str, str] | None:
    """The first query of the eval split, with where its page is: the file name of its image (the synthetic
    corpus names pages by file), or the document and page a made training set records."""
    src = cfg.data.eval
    if src is None or "://" in src.uri:
        return None
    jsonl = Path(src.uri).with_suffix(".jsonl")
    if jsonl.is_file():
        first = json.loads(jsonl.read_text().splitlines()[0])
        return {"query": first[cfg.data.query_column], "page": Path(first[cfg.data.positive_column]).name}
    parts = sorted(Path(src.uri).glob("*.parquet"))
    if not parts:
        return None
    import pyarrow.parquet as pq

    names = pq.read_schema(parts[0]).names
    first = pq.read_table(parts[0], columns=[c for c in ("query", "doc_id", "page") if c in names]).slice(0, 1)
    row = first.to_pylist()[0] if first.num_rows else None
    if row is None:
        return None
    return {"query": row["query"], "page": f"{row.get('doc_id', '?')} page {row.get('page', '?')}"}


def cmd_serve(cfg: VDRConfig) -> int:
    """Start the two-stage endpoint on Ray, print its URL and a sample query's results, keep it up until Ctrl-C."""
    from ray import serve

    from ray_vdr.client import EndpointClient, EndpointError
    from ray_vdr.endpoint import deploy
    from ray_vdr.models.load import trained_reranker

    if cfg.serve.index is None:
        cfg.serve.index = cfg.index.output
    if cfg.serve.reranker is None and (trained := trained_reranker(cfg)):
        cfg.serve.reranker = trained
        print(f"reranker: {trained} (this config's reranker run)")
    url = deploy(cfg.serve)
    print(f"endpoint: {url}  (search page {url} · POST {url}search · health {url}healthz · API docs {url}docs)")
    sample = _sample_query(cfg)
    if sample is not None:
        try:
            answer = EndpointClient(url).search(sample["query"], top_k=5)
        except EndpointError as e:
            print(f"sample query: {sample['query']!r} (its page: {sample['page']}) → {e}")
            if e.status in (401, 403):
                print("  the endpoint needs an API key with the search scope: set RAY_VDR_API_KEY for the sample query")
        else:
            print(f"sample query: {sample['query']!r} (its page: {sample['page']}) → HTTP 200")
            print("| rank | doc_id | page | first-stage score (rank) | rerank score (rank) |")
            print("|---|---|---|---|---|")
            for r in answer.hits:
                rerank = "-" if r.rerank_score is None else f"{r.rerank_score:.4f} ({r.rerank_rank})"
                print(f"| {r.rank} | {r.doc_id} | {r.page} | {r.score:.4f} ({r.first_stage_rank}) | {rerank} |")
            t = answer.timings
            print(f"timings: embed {t.embed_ms:.1f} ms, search {t.search_ms:.1f} ms, "
                  f"rerank {t.rerank_ms:.1f} ms, total {t.total_ms:.1f} ms")
    if cfg.serve.keep_running:
        print(f"serving at {url} until Ctrl-C")
        # a Ray Train run earlier in this process (the demo) leaves its own SIGINT handler, which only aborts
        # training runs: restore Python's, so that Ctrl-C ends the wait below
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("shutting the endpoint down")
            serve.shutdown()
    return 0


def cmd_demo(config: str | None, overrides: list[str], *, print_plan: bool = False, serve: bool = True) -> int:
    """The README's main command: the demo plan (ray_vdr/demo.py) stage by stage in this process, on local Ray (or
    the cluster in RAY_ADDRESS). Each stage loads the config as its job would and prints its results."""
    from ray_vdr import demo

    cfg = load_config(config, overrides)
    name = demo.run_name(cfg, overrides)
    stages = demo.plan(cfg, name, serve=serve)
    if print_plan:
        print(f"# the demo as Ray jobs, from the repo root (run {name!r}); set RAY_ADDRESS to the cluster's dashboard")
        for stage in stages:
            print(f"# {stage.title}\n{demo.submit_command(stage, config or '', overrides)}")
        return 0
    start, timings = time.time(), []
    for i, stage in enumerate(stages, 1):
        where = f" ({stage.job})" if stage.job else ""
        print(f"\n== {i}/{len(stages)} {stage.title}{where}", flush=True)
        began = time.time()
        code = COMMANDS[stage.command][0](load_config(config, demo.stage_overrides(stage, overrides)))
        timings.append((stage, time.time() - began))
        print(f"== {i}/{len(stages)} done in {timings[-1][1]:.0f}s", flush=True)
        if code:
            print(f"== stage {i} ({stage.command}) failed with exit code {code}", file=sys.stderr)
            return code
        for artifact in stage.artifacts:
            print(f"-> {artifact}")
    print(f"\n== demo finished in {time.time() - start:.0f}s (run {name!r})")
    for stage, seconds in timings:
        print(f"  {seconds:7.1f}s  {stage.title}" + (f"  → {', '.join(stage.artifacts)}" if stage.artifacts else ""))
    return 0


COMMANDS: dict[str, tuple[Callable[[VDRConfig], int], str]] = {
    "config": (cmd_config, "validate a config and print it resolved"),
    "make-data": (cmd_make_data, "write the synthetic VDR dataset described by the synthetic section"),
    "build-model": (cmd_build_model, "build a random-weight model when model.builder asks for one"),
    "make-training-data": (cmd_make_training_data, "make training triplets from unlabeled documents (PDFs, images): "
                                                   "generated queries, filters, mined negatives, a card"),
    "train": (cmd_train, "finetune the embedder on Ray Train"),
    "embed": (cmd_embed, "sync a page corpus (images, PDFs, Parquet) into its index: embed new and changed files, "
                         "remove the pages of changed and deleted ones, publish a new version"),
    "compact": (cmd_compact, "drop removed pages from the index and its shards for good (a new version)"),
    "mine": (cmd_mine, "mine hard negatives for the training queries from the corpus index"),
    "train-reranker": (cmd_train_reranker, "finetune the multimodal reranker on mined triplets (Ray Train)"),
    "evaluate": (cmd_evaluate, "two-stage evaluation: embed only vs embed + rerank at several depths"),
    "benchmark": (cmd_benchmark, "score models on public benchmarks (ViDoRe / MTEB layouts) as their leaderboards "
                                 "do, per Matryoshka dim and rerank depth"),
    "serve": (cmd_serve, "start the two-stage retrieval endpoint (Ray Serve) over index.output"),
    "promote": (cmd_promote, "re-embed the corpus with a candidate embedder and switch the endpoint to it if it is "
                             "not worse on the eval split"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray-vdr", description="Visual Document Retrieval on Ray")
    parser.add_argument("--log-level", default=os.environ.get("RAY_VDR_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        add_command(sub, name, help_text)
    sub.choices["config"].add_argument(
        "--show", nargs="?", const="", metavar="SECTION",
        help="describe the config schema instead: the sections, or SECTION's fields (e.g. serve, serve.auth) with "
             "their types, defaults and descriptions")
    demo = add_command(sub, "demo", "synthetic pages → embedder → index → mined negatives → reranker → two-stage "
                                    "evaluation → endpoint, on a local Ray cluster (the README's main command)")
    demo.add_argument("--plan", action="store_true", help="print the stages as `ray job submit` commands and exit")
    demo.add_argument("--no-serve", dest="serve", action="store_false", help="stop after the evaluation")
    delete = add_command(sub, "delete", "remove documents from the index (a new version the endpoint switches to)")
    delete.add_argument("--doc-id", action="append", default=[], help="a document id (repeat for more)")
    delete.add_argument("--source", action="append", default=[], help="a source file or folder (repeat for more)")
    delete.add_argument("--filter", dest="filter_json", help='a metadata filter, e.g. \'{"collection": "old"}\'')
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from ray_vdr.corpus.store import IndexMismatch
    from ray_vdr.data.triplets import DataError

    try:
        if getattr(args, "show", None) is not None:
            if args.config or args.overrides:
                raise ConfigError("config --show describes the schema and its defaults: it reads no --config or "
                                  "overrides (`ray-vdr config -c FILE` prints a resolved config)")
            sys.stdout.write(show(args.show))
            return 0
        if args.command == "demo":
            return cmd_demo(args.config, args.overrides, print_plan=args.plan, serve=args.serve)
        if args.command == "delete":
            return cmd_delete(config_from_args(args), args.doc_id, args.source, args.filter_json)
        return COMMANDS[args.command][0](config_from_args(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IndexMismatch, DataError) as e:  # a missing input or model, a foreign index: say which
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
