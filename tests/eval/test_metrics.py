"""The one metrics module (NDCG@k, MRR@k, Recall@k, the rerank order), held to Sentence Transformers' own evaluators
on the same rankings: InformationRetrievalEvaluator for retrieval (training's Matryoshka evaluation and two-stage
evaluation) and CrossEncoderRerankingEvaluator for the reranker's evaluation during its training (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_vdr.config import DataConfig
from ray_vdr.data.triplets import TripletSpec, validate_batch
from ray_vdr.eval.matryoshka import MatryoshkaRetrievalEvaluator, eval_set_from_table
from ray_vdr.eval.metrics import first_relevant_rank, ranking_metrics, rerank_order


@pytest.fixture(scope="module")
def eval_rows(synthetic):
    cfg, _ = synthetic
    accepted, _ = validate_batch(pq.read_table(Path(cfg.output_dir) / "eval"),
                                 TripletSpec.from_config(DataConfig(), split="eval"))
    return accepted


@pytest.fixture(scope="module")
def embedder(tiny_qwen):
    from sentence_transformers import SentenceTransformer

    from ray_vdr.models.processor import install_image_only_processor

    install_image_only_processor()
    return SentenceTransformer(str(tiny_qwen), device="cpu")


def test_ranking_metrics_and_rerank_order():
    m = ranking_metrics(["a", "b", "c"], {"b"})
    assert m == pytest.approx({"ndcg@10": 1 / np.log2(3), "mrr@10": 0.5, "recall@10": 1.0})
    assert ranking_metrics(["x"] * 10 + ["b"], {"b"}) == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@10": 0.0}
    two = ranking_metrics(["a", "b", "c", "d"], {"a", "d"}, ks=(1, 3))
    assert two["recall@1"] == 0.5 and two["recall@3"] == 0.5 and two["mrr@3"] == 1.0
    assert two["ndcg@3"] == pytest.approx(1 / (1 + 1 / np.log2(3)))
    # the reranker reorders only the first `depth` candidates; ties keep the first-stage order
    assert rerank_order(["a", "b", "c", "d"], np.array([0.1, 0.9, 0.9]), 3) == ["b", "c", "a", "d"]
    assert rerank_order(["a", "b"], [], 0) == ["a", "b"]
    # the first relevant item's position in the whole ranking (past the end when none is ranked)
    assert first_relevant_rank(["a", "b", "c", "d"], {"d", "c"}) == 3 and first_relevant_rank(["a", "b"], {"z"}) == 3


@pytest.mark.parametrize("graded", [True, False])
def test_metrics_equal_pytrec_eval_on_graded_and_binary_qrels_with_ties(graded):
    """NDCG@k, Recall@k, MAP@k and MRR as pytrec_eval (trec_eval, which MTEB scores with) computes them, on runs
    ranked by trec_order: 40 queries over 60 documents, gains 0-3 (or 0/1), scores rounded so that ties abound,
    judged documents missing from the run, and a query without relevant documents."""
    import pytrec_eval

    from ray_vdr.eval.metrics import mean_metrics, trec_order

    rng = np.random.default_rng(5)
    docs = [f"d{i:02d}" for i in range(60)]
    qrels, run = {}, {}
    for q in range(40):
        judged = rng.choice(60, 12, replace=False)
        gains = rng.integers(0, 4 if graded else 2, 12)
        qrels[f"q{q}"] = {docs[j]: int(g) for j, g in zip(judged, gains, strict=True)}
        retrieved = rng.choice(60, 30, replace=False)  # some judged documents are never retrieved
        run[f"q{q}"] = {docs[j]: float(np.round(rng.random(), 1)) for j in retrieved}
    qrels["q0"] = dict.fromkeys(qrels["q0"], 0)  # judged, none relevant
    measures = {"ndcg_cut_5", "ndcg_cut_10", "recall_10", "map_cut_10", "recip_rank"}
    want = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    rows = []
    for q in qrels:
        ranked = trec_order(run[q])
        got = ranking_metrics(ranked, qrels[q], ks=(5, 10), measures=("ndcg", "recall", "map"))
        assert got["ndcg@5"] == pytest.approx(want[q]["ndcg_cut_5"], abs=1e-9), q
        assert got["ndcg@10"] == pytest.approx(want[q]["ndcg_cut_10"], abs=1e-9), q
        assert got["recall@10"] == pytest.approx(want[q]["recall_10"], abs=1e-9), q
        assert got["map@10"] == pytest.approx(want[q]["map_cut_10"], abs=1e-9), q
        assert ranking_metrics(ranked, qrels[q], ks=(len(ranked),), measures=("mrr",))[f"mrr@{len(ranked)}"] == \
            pytest.approx(want[q]["recip_rank"], abs=1e-9), q
        rows.append(got)
    assert mean_metrics(rows)["ndcg@10"] == pytest.approx(np.mean([want[q]["ndcg_cut_10"] for q in qrels]), abs=1e-9)
    if graded:  # the gains matter: scoring the same runs as binary gives other NDCGs
        binary = [ranking_metrics(trec_order(run[q]), {d for d, g in qrels[q].items() if g > 0}, ks=(10,))["ndcg@10"]
                  for q in qrels]
        assert not np.allclose(binary, [want[q]["ndcg_cut_10"] for q in qrels])


def test_retrieval_metrics_equal_the_information_retrieval_evaluator(eval_rows, embedder, tiny_qwen):
    """Training's Matryoshka evaluation (one encoding pass, every dim) and two-stage evaluation's embed-only ranking
    give what InformationRetrievalEvaluator computes on the same model and eval split, dim by dim."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from ray_vdr.config import ModelConfig
    from ray_vdr.eval.two_stage import EMBED_ONLY, two_stage_metrics
    from ray_vdr.models.encoder import IndexEncoder
    from ray_vdr.models.load import embedder_binding

    eval_set = eval_set_from_table(eval_rows)
    encoder = IndexEncoder(embedder_binding(ModelConfig(), str(tiny_qwen)))  # two-stage evaluation encodes so
    ours = MatryoshkaRetrievalEvaluator(eval_set, [64, 16])(embedder)
    for dim in (64, 32, 16):
        theirs = InformationRetrievalEvaluator(eval_set.queries, eval_set.corpus, eval_set.relevant, truncate_dim=dim,
                                               name="p", write_csv=False, accuracy_at_k=[1, 5, 10],
                                               precision_recall_at_k=[1, 5, 10])(embedder)
        got = dict(ours[dim]) if dim in ours else two_stage_metrics(encoder, None, eval_set, dim=dim,
                                                                    depths=[])[EMBED_ONLY]
        if dim in ours:  # the mean rank of each query's page among all pages, from the embeddings themselves
            q = embedder.encode_query(list(eval_set.queries.values()), truncate_dim=dim, normalize_embeddings=True)
            c = embedder.encode_document(list(eval_set.corpus.values()), truncate_dim=dim, normalize_embeddings=True)
            scores, cids = q @ c.T, list(eval_set.corpus)
            own = [cids.index(next(iter(eval_set.relevant[qid]))) for qid in eval_set.queries]
            ranks = (scores > scores[np.arange(len(own)), own][:, None]).sum(axis=1) + 1
            assert got.pop("mean_rank") == pytest.approx(ranks.mean()), dim
        for metric in got:
            assert got[metric] == pytest.approx(theirs[f"p_cosine_{metric}"], abs=1e-6), (dim, metric)


def test_multi_vector_two_stage_metrics_equal_the_multi_vector_evaluator(eval_rows, tiny_colqwen):
    """Two-stage evaluation of a multi-vector embedder (MaxSim over token vectors, as its index scores) gives what
    Sentence Transformers' MultiVectorInformationRetrievalEvaluator computes on the same model and eval split."""
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder
    from sentence_transformers.multi_vector_encoder.evaluation import MultiVectorInformationRetrievalEvaluator

    from ray_vdr.config import ModelConfig
    from ray_vdr.eval.two_stage import EMBED_ONLY, two_stage_metrics
    from ray_vdr.models.encoder import IndexEncoder
    from ray_vdr.models.load import embedder_binding

    eval_set = eval_set_from_table(eval_rows)
    encoder = IndexEncoder(embedder_binding(ModelConfig(), str(tiny_colqwen)))
    assert encoder.multi_vector
    got = two_stage_metrics(encoder, None, eval_set, dim=32, depths=[])[EMBED_ONLY]
    theirs = MultiVectorInformationRetrievalEvaluator(
        eval_set.queries, eval_set.corpus, eval_set.relevant, name="p", write_csv=False, accuracy_at_k=[1, 5, 10],
        precision_recall_at_k=[1, 5, 10])(MultiVectorEncoder(str(tiny_colqwen), device="cpu"))
    for metric in got:
        assert got[metric] == pytest.approx(theirs[f"p_maxsim_{metric}"], abs=1e-6), metric


def test_rerank_metrics_equal_the_cross_encoder_reranking_evaluator(eval_rows, tiny_reranker):
    """The reranker's evaluation during training ranks each eval query's positive among its hard negatives as
    CrossEncoderRerankingEvaluator does."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    from ray_vdr.train.recipes import rerank_metrics, rerank_samples

    samples = rerank_samples(eval_rows)
    model = CrossEncoder(str(tiny_reranker), device="cpu")
    ours = rerank_metrics(model, samples)
    theirs = CrossEncoderRerankingEvaluator(samples, at_k=10, name="r", write_csv=False)(model)
    assert ours == pytest.approx({"ndcg@10": theirs["r_ndcg@10"], "mrr@10": theirs["r_mrr@10"]}, abs=1e-6)
