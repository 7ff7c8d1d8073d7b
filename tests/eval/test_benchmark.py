"""Benchmark evaluation: the published layouts found and read (no Ray), and ``ray-vdr benchmark`` on a real local
Ray cluster held to pytrec_eval on the same embeddings and to mteb's own evaluation of the same model and task, with
rejects counted, two models side by side, the reranker, per-language scores and a rerun that redoes nothing."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ray_vdr.eval.benchmark_data import MissingDataset, read_queries, resolve_tasks
from ray_vdr.eval.benchmark_fixture import write_fixture

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tasks(synthetic, tmp_path_factory):
    syn, _ = synthetic
    root = tmp_path_factory.mktemp("bench-data")
    counts = {layout: write_fixture(f"{syn.output_dir}/eval", root / f"tiny-{layout}", layout,
                                    bad_images=1 if layout == "v3" else 0) for layout in ("beir", "v3", "single")}
    return root, counts


def test_layouts_columns_and_qrels(tasks):
    root, counts = tasks
    beir, v3, single = resolve_tasks([str(root / f"tiny-{x}") for x in ("beir", "v3", "single")], None)
    assert (beir.layout, v3.layout, single.layout) == ("beir", "beir", "single")
    assert beir.id_column == "corpus-id" and v3.id_column == "corpus_id" and single.id_column == "image_filename"
    q = read_queries(v3)
    assert len(q.queries) == counts["v3"]["queries"] and set(q.languages.values()) == {"english", "french"}
    assert sorted({g for rel in q.qrels.values() for g in rel.values()}) == [1.0, 2.0], "graded qrels kept"
    s = read_queries(single, max_queries=3)
    assert len(s.queries) == 3 and all(len(rel) == 1 and next(iter(rel)).startswith("page_")
                                       for rel in s.qrels.values())


def test_missing_and_malformed_datasets_say_what_to_do(tmp_path, capsys):
    with pytest.raises(MissingDataset, match=r"hf download vidore/vidore_v3_hr --repo-type dataset "
                                             r"--local-dir .*/vidore/vidore_v3_hr"):
        resolve_tasks(["vidore-v3"], str(tmp_path))
    from ray_vdr.cli import main

    assert main(["benchmark", "-c", str(ROOT / "configs/demo.yaml"), "benchmark.tasks=[vidore-v3]",
                 f"benchmark.data_dir={tmp_path}"]) == 2, "a missing dataset is a missing input: exit 2, no Ray"
    err = capsys.readouterr().err
    assert "8 benchmark datasets are missing" in err and err.count("hf download vidore/vidore_v3_") == 8, err
    with pytest.raises(MissingDataset, match="benchmark.data_dir is not set"):
        resolve_tasks(["vidore/esg_reports_v2"], None)
    (tmp_path / "half" / "corpus").mkdir(parents=True)
    with pytest.raises(MissingDataset, match="expected the BEIR or single-table layout"):
        resolve_tasks([str(tmp_path / "half")], None)
    with pytest.raises(MissingDataset, match="tasks is empty"):
        resolve_tasks([], None)


def _pytrec(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, float]], measures: set[str]):
    import pytrec_eval

    ev = pytrec_eval.RelevanceEvaluator({q: {c: int(g) for c, g in rel.items()} for q, rel in qrels.items()},
                                        measures)
    per_query = ev.evaluate(run)
    return {m: float(np.mean([r[m] for r in per_query.values()])) for m in next(iter(per_query.values()))}


@pytest.mark.slow
def test_benchmark_matches_pytrec_eval_and_reruns_nothing(ray_local, tasks, tiny_qwen, tiny_reranker, tmp_path):
    """Two models (one with the reranker) on a graded, bilingual BEIR task with an unreadable page and on a
    single-table task; every embed-only score equals pytrec_eval's on vectors encoded here, in process."""
    from PIL import Image

    from ray_vdr.config import load_config
    from ray_vdr.eval.benchmark import run
    from ray_vdr.eval.benchmark_data import read_columns
    from ray_vdr.models.encoder import IndexEncoder

    root, counts = tasks
    out, cache = tmp_path / "bench", tmp_path / "cache"
    overrides = ["synthetic=null", f"benchmark.output={out}", f"benchmark.cache={cache}",
                 f"benchmark.tasks=[{root / 'tiny-v3'}, {root / 'tiny-single'}, {root / 'tiny-beir'}]",
                 "benchmark.dims=[64, 32, 16]",
                 "benchmark.rerank_depths=[5]", "index.batch_size=8",
                 f"benchmark.models=[{{name: base, embedder: {tiny_qwen}}}, "
                 f"{{name: reranked, embedder: {tiny_qwen}, reranker: {tiny_reranker}}}]"]
    cfg = load_config(ROOT / "configs/demo.yaml", overrides)
    report = run(cfg)
    runs = {(r["model"]["name"], r["task"]["name"]): r for r in report["results"]}
    assert set(runs) == {(m, t) for m in ("base", "reranked") for t in ("tiny-v3", "tiny-single", "tiny-beir")}

    # MTEB's own evaluation of the same model on the same task (mteb run offline on a task defined locally)
    from ray_vdr.models.load import embedder_binding, load_embedder
    from tests.eval.mteb_local import mteb_scores

    # the model as the config sets it up (the demo config's pixel bounds), handed to mteb as a loaded model
    configured = load_embedder(embedder_binding(cfg.model, str(tiny_qwen)))
    theirs = mteb_scores(root / "tiny-beir", tiny_qwen, model=configured)
    ours = runs[("base", "tiny-beir")]["scores"]["dim 64"]  # the tiny model's full dimension, as MTEB encodes
    print("tiny-beir, ray-vdr vs mteb:", {k: (ours[k], theirs[k.replace("@", "_at_")]) for k in ("ndcg@5", "ndcg@10")})
    for mine, mtebs in (("ndcg@5", "ndcg_at_5"), ("ndcg@10", "ndcg_at_10"), ("recall@10", "recall_at_10"),
                        ("map@10", "map_at_10")):
        assert ours[mine] == pytest.approx(theirs[mtebs], abs=1e-4), mine  # mteb rounds to 5 decimals

    v3 = runs[("base", "tiny-v3")]
    assert v3["rejects"] == 1 and v3["corpus"] == counts["v3"]["corpus"] - 1, "the unreadable page rejected, counted"
    assert v3["reject_examples"][0]["doc_id"] == str(counts["v3"]["corpus"] - 1)
    assert set(runs[("reranked", "tiny-v3")]["scores"]) == {f"dim {d}{r}" for d in (64, 32, 16)
                                                             for r in ("", " + rerank@5")}
    assert runs[("reranked", "tiny-v3")]["rerank_pairs"] > 0
    assert runs[("base", "tiny-v3")]["scores"]["dim 32"] == runs[("reranked", "tiny-v3")]["scores"]["dim 32"], \
        "the same embedder scores the same, whichever second stage follows"

    # the independent reference: pytrec_eval on vectors of the same model, encoded in this process
    task = resolve_tasks([str(root / "tiny-v3")], None)[0]
    queries = read_queries(task)
    corpus = read_columns(task.files["corpus"], ["corpus_id", "image"]).to_pylist()[:-1]  # the last: the bad image
    encoder = IndexEncoder(embedder_binding(cfg.model, str(tiny_qwen)))
    pages = encoder.encode_pages([Image.open(io.BytesIO(c["image"]["bytes"])).convert("RGB") for c in corpus], 32)
    q = encoder.encode_queries(list(queries.queries.values()), 32)
    for dim in (32, 16):
        qd, pd = (x[:, :dim] / np.linalg.norm(x[:, :dim], axis=1, keepdims=True) for x in (q, pages))
        scores = qd @ pd.T
        trec_run = {qid: {str(c["corpus_id"]): float(s) for c, s in zip(corpus, row, strict=True)}
                    for qid, row in zip(queries.queries, scores, strict=True)}
        by_lang = {}
        for lang in ("english", "french"):
            keep = {qid for qid, lg in queries.languages.items() if lg == lang}
            by_lang[lang] = _pytrec({k: v for k, v in trec_run.items() if k in keep},
                                    {k: v for k, v in queries.qrels.items() if k in keep},
                                    {"ndcg_cut.5,10", "recall.10"})
        ours = v3["scores"][f"dim {dim}"]
        for ours_m, trec_m in (("ndcg@5", "ndcg_cut_5"), ("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10")):
            expected = np.mean([by_lang[lg][trec_m] for lg in by_lang])  # MTEB: the mean of the language subsets
            assert ours[ours_m] == pytest.approx(expected, abs=1e-4), (dim, ours_m)
            for lang in by_lang:
                assert v3["by_language"][f"dim {dim}"][lang][ours_m] == pytest.approx(by_lang[lang][trec_m],
                                                                                       abs=1e-4)

    table = (out / "benchmark.md").read_text()
    assert "tiny-v3" in table and "By query language" in table and "| reranked | dim 32 + rerank@5 |" in table
    assert (out / "benchmark.png").stat().st_size > 0
    assert json.loads((out / "benchmark.json").read_text())["runs"][0]["rejects"] == 1
    card = (Path(tiny_qwen) / "README.md").read_text()
    assert card.count("## Benchmark (ray-vdr)") == 1 and "| reranked | dim 16 + rerank@5 |" in card

    # a rerun scores nothing again; one task's results lost (a run killed before it) is scored again, alone
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")}
    lost = out / "results" / "reranked" / "tiny-single.json"
    os.remove(lost)
    again = run(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps if p != lost} == {p: s for p, s in stamps.items() if p != lost}
    assert lost.is_file()
    redone = next(r for r in again["results"] if r["model"]["name"] == "reranked" and r["task"]["name"] ==
                  "tiny-single")
    assert redone["scores"] == runs[("reranked", "tiny-single")]["scores"]
    assert runs[("reranked", "tiny-single")]["pages_embedded"] == 0, "the corpus cached by the first model's run"
    assert redone["pages_embedded"] == 0
    assert (Path(tiny_qwen) / "README.md").read_text().count("## Benchmark (ray-vdr)") == 1, "replaced, not added"


@pytest.mark.slow
def test_benchmark_scores_a_multi_vector_embedder_by_maxsim(ray_local, tasks, tiny_colqwen, tmp_path):
    """A multi-vector embedder's corpus becomes a multi-vector index (pooled int8 token vectors here), and each dim's
    scores equal pytrec_eval's on MaxSim of the queries' token vectors, encoded here, against the stored ones."""
    import pyarrow.parquet as pq

    from ray_vdr.config import load_config
    from ray_vdr.corpus.late import maxsim, unpack_tokens
    from ray_vdr.eval.benchmark import corpus_rows, run
    from ray_vdr.models.encoder import IndexEncoder
    from ray_vdr.models.load import embedder_binding

    root, counts = tasks
    cfg = load_config(ROOT / "configs/demo.yaml", [
        "synthetic=null", f"benchmark.output={tmp_path / 'bench'}", f"benchmark.cache={tmp_path / 'cache'}",
        f"benchmark.tasks=[{root / 'tiny-v3'}]", "benchmark.dims=[32, 16]", "index.batch_size=8",
        "index.late.pooling=2", "index.late.storage=int8",
        f"benchmark.models=[{{name: late, embedder: {tiny_colqwen}}}]"])
    result = run(cfg)["results"][0]
    assert result["corpus"] == counts["v3"]["corpus"] - 1 and result["rejects"] == 1
    index = next((tmp_path / "cache").rglob("manifest.json")).parent
    task = resolve_tasks([str(root / "tiny-v3")], None)[0]
    stored = pq.read_table(index / "pages", columns=["key", "doc_id", "content", "tokens"])
    ids, rows, _ = corpus_rows(task, stored)  # corpus id -> its stored page (the benchmark's own mapping)
    blobs = stored.column("tokens").to_pylist()
    pages = [unpack_tokens(blobs[r], 32, "int8") for r in rows]
    assert len(ids) == counts["v3"]["corpus"] - 1 and all(0 < len(t) <= 25 for t in pages), "pooled: ~half of 48"

    queries = read_queries(task)
    q = IndexEncoder(embedder_binding(cfg.model, str(tiny_colqwen))).encode_queries(list(queries.queries.values()))
    for dim in (32, 16):
        cut = [x[:, :dim] / np.linalg.norm(x[:, :dim], axis=1, keepdims=True) for x in pages]
        trec_run = {qid: dict(zip(ids, maxsim(qt[:, :dim] / np.linalg.norm(qt[:, :dim], axis=1, keepdims=True),
                                               cut).tolist(), strict=True))
                    for qid, qt in zip(queries.queries, q, strict=True)}
        by_lang = {}
        for lang in ("english", "french"):
            keep = {qid for qid, lg in queries.languages.items() if lg == lang}
            by_lang[lang] = _pytrec({k: v for k, v in trec_run.items() if k in keep},
                                    {k: v for k, v in queries.qrels.items() if k in keep}, {"ndcg_cut.10"})
        expected = np.mean([by_lang[lg]["ndcg_cut_10"] for lg in by_lang])
        assert result["scores"][f"dim {dim}"]["ndcg@10"] == pytest.approx(expected, abs=1e-4), dim
