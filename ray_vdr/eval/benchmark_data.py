"""Public retrieval benchmarks in their published layouts, and the named suites (no Ray).

Two layouts, as the ViDoRe datasets on the Hugging Face hub publish them:

- **BEIR** (ViDoRe V2 and V3, MTEB's ViDoRe tasks): three configs, each Parquet files of one split,
  ``corpus`` (``corpus-id``, ``image``), ``queries`` (``query-id``, ``query``, and ``language`` where the dataset is
  multilingual) and ``qrels`` (``query-id``, ``corpus-id``, an integer or float ``score``: graded relevance);
- **single table** (ViDoRe V1): one row per query with its page (``query``, ``image``); the corpus is every distinct
  page image of the split, and a query's page is relevant to it (rows without a query are corpus pages only).

A task is found by path (a folder or object-store URI holding the layout), or by hub id (``vidore/…``), read from
``benchmark.data_dir/<hub id>`` where it was downloaded ahead of time (else from this machine's Hugging Face cache);
nothing here downloads. A suite name expands
to its tasks. The files are located here; the queries and qrels (text and numbers) are read by the scoring task,
and the corpus is embedded by the corpus job (:mod:`ray_vdr.corpus.embed`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_vdr.storage import fs_path

__all__ = ["SUITES", "BenchmarkTask", "MissingDataset", "QuerySet", "read_columns", "read_queries", "resolve_tasks"]

Layout = Literal["beir", "single"]


@dataclass(frozen=True)
class SuiteTask:
    name: str
    hub_id: str
    layout: Layout


@dataclass(frozen=True)
class Suite:
    """A leaderboard's task list and the metric it ranks by."""

    name: str
    main_metric: str
    tasks: tuple[SuiteTask, ...]
    source: str


def _suite(name: str, metric: str, layout: Layout, source: str, ids: list[str]) -> Suite:
    return Suite(name, metric, tuple(SuiteTask(i.split("/", 1)[1], i, layout) for i in ids), source)


# Task lists and main metrics as MTEB defines the leaderboards (mteb/tasks/retrieval/eng/vidore_bench_retrieval.py,
# .../multilingual/vidore2_bench_retrieval.py, vidore3_bench_retrieval.py): V1 through its BEIR copies (MTEB's
# ``mteb/<name>_beir`` forks hold the same data), V2 and V3 as published (V3's raw datasets spell
# ``query_id``/``corpus_id``).
_V1 = ["arxivqa_test_subsampled", "docvqa_test_subsampled", "infovqa_test_subsampled", "tabfquad_test_subsampled",
       "tatdqa_test", "shiftproject_test", "syntheticDocQA_artificial_intelligence_test",
       "syntheticDocQA_energy_test", "syntheticDocQA_government_reports_test",
       "syntheticDocQA_healthcare_industry_test"]
SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("vidore-v1", "ndcg@5", tuple(SuiteTask(n, f"vidore/{n}_beir", "beir") for n in _V1),
          "ViDoRe V1 (arXiv:2407.01449) as MTEB scores it (its BEIR copies)"),
    _suite("vidore-v2", "ndcg@5", "beir", "ViDoRe V2 (arXiv:2505.17166), MTEB's Vidore2 tasks", [
        "vidore/esg_reports_v2", "vidore/biomedical_lectures_v2", "vidore/economics_reports_v2",
        "vidore/esg_reports_human_labeled_v2"]),
    _suite("vidore-v3", "ndcg@10", "beir", "ViDoRe V3, its 8 public tasks as MTEB defines them", [
        "vidore/vidore_v3_computer_science", "vidore/vidore_v3_energy", "vidore/vidore_v3_finance_en",
        "vidore/vidore_v3_finance_fr", "vidore/vidore_v3_hr", "vidore/vidore_v3_industrial",
        "vidore/vidore_v3_pharmaceuticals", "vidore/vidore_v3_physics"]),
)}
# column names as the datasets spell them (V1/V2: hyphens; V3's raw datasets: underscores; MTEB's format: id/text)
ID_COLUMNS = {"corpus": ("corpus-id", "corpus_id", "id"), "queries": ("query-id", "query_id", "id"),
              "text": ("query", "text")}


class MissingDataset(FileNotFoundError):
    """A benchmark dataset that is not where the config says: the message names it and how to fetch it."""


def _fetch_hint(hub_id: str, data_dir: str | None) -> str:
    target = f"{data_dir or '<data_dir>'}/{hub_id}"
    return (f"fetch it ahead of time on a machine with hub access: `hf download {hub_id} --repo-type dataset "
            f"--local-dir {target}` (on a cluster, to storage every node reads, or copy it to a bucket), then set "
            f"benchmark.data_dir{'' if data_dir else ' to the folder above it'}")


@dataclass(frozen=True)
class BenchmarkTask:
    """One dataset to score: where its files are, its layout and the metric its leaderboard ranks by."""

    name: str
    root: str
    layout: Layout
    main_metric: str = "ndcg@10"
    suite: str | None = None
    hub_id: str | None = None
    files: dict[str, list[str]] = field(default_factory=dict, compare=False)
    columns: dict[str, str | None] = field(default_factory=dict, compare=False)

    @property
    def corpus_files(self) -> list[str]:
        return self.files["corpus" if self.layout == "beir" else "data"]

    @property
    def id_column(self) -> str | None:
        """The corpus' page id column (BEIR: corpus-id; single table: image_filename, else none: content keys)."""
        return self.columns.get("corpus")


def _schema(files: list[str]) -> list[str]:
    fs, path = fs_path(files[0])
    with fs.open_input_file(path) as fh:
        return pq.ParquetFile(fh).schema_arrow.names


def _columns(layout: Layout, files: dict[str, list[str]], where: str) -> dict[str, str | None]:
    """Which column holds what, by the names the datasets use (each config's schema read once); a missing one raises
    MissingDataset."""
    names = {config: _schema(paths) for config, paths in files.items()}

    def pick(config: str, options: tuple[str, ...]) -> str:
        found = next((c for c in options if c in names[config]), None)
        if found is None:
            raise MissingDataset(f"{where}: the {config} files have none of the columns {list(options)} "
                                 f"(has {names[config]})")
        return found

    if layout == "single":
        pick("data", ("query",))
        pick("data", ("image",))
        return {"corpus": "image_filename" if "image_filename" in names["data"] else None}
    pick("corpus", ("image",))
    return {"corpus": pick("corpus", ID_COLUMNS["corpus"]), "query_id": pick("queries", ID_COLUMNS["queries"]),
            "query": pick("queries", ID_COLUMNS["text"]), "qrels_query": pick("qrels", ID_COLUMNS["queries"][:2]),
            "qrels_corpus": pick("qrels", ID_COLUMNS["corpus"][:2]), "score": pick("qrels", ("score",)),
            "language": "language" if "language" in names["queries"] else None}


def _split_files(fs: pafs.FileSystem, root: str, prefix: str, config: str, split: str) -> list[str]:
    """Parquet files of one config and split, in the layouts the hub writes (``<config>/<split>-*.parquet``,
    ``<config>/<split>/*.parquet``, ``data/<config>-*`` ...)."""
    for folder, stem in ((f"{root}/{config}", f"{split}-"), (f"{root}/{config}/{split}", ""),
                         (f"{root}/data", f"{config}-{split}-" if config != "data" else f"{split}-"),
                         (f"{root}/data", f"{config}-")):
        try:
            infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        except (FileNotFoundError, NotADirectoryError, OSError):
            continue
        files = sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File
                       and posixpath.basename(i.path).startswith(stem) and i.path.endswith(".parquet"))
        if files:
            return files
    return []


def locate(uri: str, name: str, split: str, *, main_metric: str = "ndcg@10", suite: str | None = None,
           hub_id: str | None = None, layout: Layout | None = None) -> BenchmarkTask:
    """The task stored at ``uri`` (a folder or URI): its layout found from the files there."""
    fs, root = fs_path(uri)
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise MissingDataset(f"benchmark dataset {hub_id or name!r}: {uri} is not a folder"
                             + (f"; {_fetch_hint(hub_id, None)}" if hub_id else ""))
    beir = {c: _split_files(fs, root, prefix, c, split) for c in ("corpus", "queries", "qrels")}
    single = _split_files(fs, root, prefix, "data", split)
    found: Layout | None = "beir" if all(beir.values()) else "single" if single and not any(beir.values()) else None
    if found is None or (layout and found != layout):
        have = {k: len(v) for k, v in beir.items()} | {"data": len(single)}
        raise MissingDataset(
            f"benchmark dataset {hub_id or name!r} at {uri}: expected the {layout or 'BEIR or single-table'} layout "
            f"for split {split!r} (BEIR: corpus/, queries/ and qrels/ Parquet files; single table: data/{split}-*."
            f"parquet with query and image columns); found Parquet files per config: {have}")
    files = beir if found == "beir" else {"data": single}
    return BenchmarkTask(name, uri, found, main_metric, suite, hub_id, files,
                         _columns(found, files, f"benchmark dataset {hub_id or name!r} at {uri}"))


def resolve_tasks(names: list[str], data_dir: str | None, split: str = "test") -> list[BenchmarkTask]:
    """Suites, hub ids and paths → tasks, in order, each once. A hub id is read from ``data_dir/<hub id>``; a missing
    dataset raises :class:`MissingDataset` naming it and the command that fetches it."""
    out: dict[str, BenchmarkTask] = {}
    missing: list[str] = []

    def add(name: str, make) -> None:
        if name not in out:
            try:
                out[name] = make()
            except MissingDataset as e:
                missing.append(str(e))

    for entry in names:
        if entry in SUITES:
            suite = SUITES[entry]
            for t in suite.tasks:
                add(t.name, lambda t=t, suite=suite: _hub_task(t.hub_id, t.name, data_dir, split, suite.main_metric,
                                                               suite.name, t.layout))
            continue
        known = next(((s, t) for s in SUITES.values() for t in s.tasks if t.hub_id == entry), None)
        if ("://" in entry or entry.startswith((".", "/", "~")) or _exists(entry)) and not known:
            name = posixpath.basename(entry.rstrip("/")) or entry
            add(name, lambda entry=entry, name=name: locate(entry, name, split))
        else:
            s, t = known if known else (None, None)
            name = t.name if t else entry.split("/")[-1]
            add(name, lambda entry=entry, name=name, s=s, t=t: _hub_task(
                entry, name, data_dir, split, s.main_metric if s else "ndcg@10", s.name if s else None,
                t.layout if t else None))
    if len(missing) == 1:
        raise MissingDataset(missing[0])
    if missing:
        raise MissingDataset(f"{len(missing)} benchmark datasets are missing or malformed:\n  - "
                             + "\n  - ".join(missing))
    if not out:
        raise MissingDataset("benchmark.tasks is empty: name a suite (" + ", ".join(SUITES) + "), hub dataset ids or "
                             "folders in the BEIR layout")
    return list(out.values())


def _exists(path: str) -> bool:
    fs, p = fs_path(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def _hf_cache(hub_id: str) -> str | None:
    """The dataset's snapshot in this machine's Hugging Face cache (``hf download`` without ``--local-dir``), if
    there is one; nothing is downloaded."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hub_id, repo_type="dataset", local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or no huggingface_hub
        return None


def _hub_task(hub_id: str, name: str, data_dir: str | None, split: str, metric: str, suite: str | None,
              layout: Layout | None) -> BenchmarkTask:
    """A hub dataset from ``data_dir/<hub id>``, else from the local Hugging Face cache (a single machine's run: other
    nodes do not see it)."""
    uri = f"{data_dir.rstrip('/')}/{hub_id}" if data_dir else None
    if uri is None or fs_path(uri)[0].get_file_info(fs_path(uri)[1]).type != pafs.FileType.Directory:
        uri = _hf_cache(hub_id) or uri
    if uri is None:
        raise MissingDataset(f"benchmark dataset {hub_id!r}: benchmark.data_dir is not set and the Hugging Face cache "
                             f"has no copy; {_fetch_hint(hub_id, None)}")
    fs, path = fs_path(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise MissingDataset(f"benchmark dataset {hub_id!r} is not in {uri}; {_fetch_hint(hub_id, data_dir)}")
    return locate(uri, name, split, main_metric=metric, suite=suite, hub_id=hub_id, layout=layout)


# ---------------------------------------------------------------------------------------------------------------------
# queries and qrels


@dataclass
class QuerySet:
    """A task's queries ({query id: text}), their languages where the dataset has them, and graded qrels
    ({query id: {corpus id: gain}}). For the single-table layout the corpus ids are the pages' content keys."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, float]]
    languages: dict[str, str] = field(default_factory=dict)


def read_columns(files: list[str], columns: list[str]) -> pa.Table:
    """These columns of a config's Parquet files, as one table (queries, qrels, ids: small)."""
    tables = []
    for f in files:
        fs, path = fs_path(f)
        with fs.open_input_file(path) as fh:
            tables.append(pq.ParquetFile(fh).read(columns=columns))
    return pa.concat_tables(tables, promote_options="default")


def read_queries(task: BenchmarkTask, max_queries: int | None = None) -> QuerySet:
    """The task's queries with relevance judgements, in file order, at most ``max_queries``. Queries no qrel judges
    relevant are dropped (trec_eval and MTEB score only judged queries); ids are strings. Single table: a query's
    page is relevant to it (by ``image_filename``, else the image's content key), and a query text asked of
    several pages is one query with all of them relevant."""
    from ray_vdr.corpus.pages import page_key
    from ray_vdr.data.images import ImageRejected, image_bytes

    qrels: dict[str, dict[str, float]] = {}
    languages: dict[str, str] = {}
    c = task.columns
    if task.layout == "beir":
        want = [c["query_id"], c["query"]] + ([c["language"]] if c.get("language") else [])
        q = read_columns(task.files["queries"], want)
        r = read_columns(task.files["qrels"], [c["qrels_query"], c["qrels_corpus"], c["score"]])
        for qid, cid, score in zip(*(r.column(i).to_pylist() for i in range(3)), strict=True):
            qrels.setdefault(str(qid), {})[str(cid)] = float(score)
        ids = [str(i) for i in q.column(c["query_id"]).to_pylist()]
        texts = dict(zip(ids, q.column(c["query"]).to_pylist(), strict=True))
        if c.get("language"):
            languages = dict(zip(ids, q.column(c["language"]).to_pylist(), strict=True))
    else:
        texts, first = {}, {}
        cols = ["query", "image"] + ([c["corpus"]] if c.get("corpus") else [])
        t = read_columns(task.files["data"], cols)
        images = t.column("image").to_pylist()
        names = t.column(c["corpus"]).to_pylist() if c.get("corpus") else [None] * len(images)
        for row, (query, image, name) in enumerate(zip(t.column("query").to_pylist(), images, names, strict=True)):
            if not query:
                continue
            try:
                page = str(name) if name is not None else page_key(image_bytes(image))
            except ImageRejected:
                continue  # the corpus job rejects that page too; the report counts rejects
            qid = first.setdefault(query, str(row))
            texts[qid] = query
            qrels.setdefault(qid, {})[page] = 1.0
    judged = [qid for qid in texts if texts[qid] and any(g > 0 for g in qrels.get(qid, {}).values())]
    judged = judged[:max_queries] if max_queries else judged
    return QuerySet({q: texts[q] for q in judged}, {q: qrels[q] for q in judged},
                    {q: str(languages[q]) for q in judged if languages.get(q) is not None})
