"""FAISS index choice, build and recall (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.synthetic_vectors import PageVectors, VectorProfile, neighbour_profile
from ray_vdr.config import IndexConfig
from ray_vdr.corpus.faiss_index import build_index, choose_spec, search


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Normalised vectors around 64 centres (embeddings of real pages cluster by layout and topic)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim))
    x = centres[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_auto_choice_follows_corpus_size():
    cfg = IndexConfig(flat_max=1000, hnsw_max=10_000)
    assert choose_spec(1000, 64, cfg).type == "flat"
    assert choose_spec(1001, 64, cfg).type == "hnsw"
    ivf = choose_spec(10_001, 1024, cfg)
    assert ivf.type == "ivf_sq8" and ivf.params["nlist"] <= 10_001 // 39  # PQ's recall is far below the goal
    pq = choose_spec(10_001, 1024, IndexConfig(index_type="ivf_pq"))
    assert 1024 % pq.params["pq_m"] == 0 and pq.params["nlist"] <= 10_001 // 39
    assert choose_spec(50, 64, IndexConfig(index_type="ivf_sq8")).params["nlist"] == 1  # never more lists than data


@pytest.mark.parametrize("kind,min_recall", [("flat", 1.0), ("hnsw", 0.95), ("ivf_sq8", 0.9), ("ivf_pq", 0.4)])
def test_index_recall_against_exact_search(kind, min_recall):
    data, queries = _clustered(6000, 64), _clustered(100, 64, seed=1)
    exact = build_index(data, choose_spec(len(data), 64, IndexConfig(index_type="flat")))
    index = build_index(data, choose_spec(len(data), 64, IndexConfig(index_type=kind, ivf_nprobe=16)))
    _, truth = search(exact, queries, 10)
    scores, got = search(index, queries, 10)
    recall = np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got, strict=True)])
    assert recall >= min_recall, (kind, recall)
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
    assert index.ntotal == len(data)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_sq8", "ivf_pq"])
@pytest.mark.parametrize("exact_max", [65_536, 0])  # the exact subset path, and FAISS's IDSelector path
def test_filter_inside_the_search_keeps_top_k_full(kind, exact_max):
    """A collection holding 1% of the pages: every result is in it, top-k is full, and the planted page (the
    query's own vector, inside the collection) comes first; a removed page is never returned."""
    data = _clustered(6000, 64)
    rng = np.random.default_rng(2)
    allowed = np.zeros(len(data), bool)
    allowed[rng.choice(len(data), 60, replace=False)] = True
    planted = np.flatnonzero(allowed)[:5]
    index = build_index(data, choose_spec(len(data), 64, IndexConfig(index_type=kind, ivf_nprobe=8)))
    scores, got = search(index, data[planted], 10, allowed, exact_max=exact_max)
    assert (got >= 0).all(), "top-k stays full under a 1% filter"
    assert allowed[got].all(), "every result matches the filter"
    if kind in ("flat", "hnsw"):  # exact vectors: the page itself is its own best match
        assert (got[:, 0] == planted).all()
    removed = allowed.copy()
    removed[planted] = False
    _, again = search(index, data[planted], 10, removed, exact_max=exact_max)
    assert not np.isin(again, planted).any(), "a removed position never comes back"


def _recall(index, queries: np.ndarray, data: np.ndarray) -> float:
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    got = search(index, queries, 10)[1]
    return float(np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got, strict=True)]))


@pytest.mark.parametrize("tier", ["flat", "hnsw", "ivf_sq8"])
def test_auto_defaults_reach_the_recall_goal_on_page_like_vectors(tier):
    """Each type ``auto`` picks, at the default search depth, finds ≥ 95% of the exact top 10 on page-like vectors
    (the tiers' sizes shrunk to fit a test; bench/ann_recall.py measures 100k and 1M)."""
    n, dim = 8000, 256
    bounds = {"flat": (n, n), "hnsw": (n // 4, n), "ivf_sq8": (n // 8, n // 4)}[tier]
    spec = choose_spec(n, dim, IndexConfig(flat_max=bounds[0], hnsw_max=bounds[1]))
    assert spec.type == tier
    gen = PageVectors(n, dim, seed=3)
    data, queries = gen.pages(), gen.queries(200)
    index = build_index(data, spec)
    assert _recall(index, queries, data) >= 0.95, spec
    if tier == "ivf_sq8":  # the vectors are not trivially easy: one list per query misses the goal
        import faiss

        faiss.extract_index_ivf(index).nprobe = 1
        assert _recall(index, queries, data) < 0.9


def test_page_like_vectors_are_deterministic_and_queries_sit_off_the_pages():
    gen = PageVectors(3000, 128, seed=5)
    data, queries = gen.pages(), gen.queries(100)
    assert data.shape == (3000, 128) and data.dtype == np.float32
    assert np.allclose(np.linalg.norm(data, axis=1), 1, atol=1e-5)
    assert np.array_equal(data, PageVectors(3000, 128, seed=5).pages())
    assert not np.array_equal(queries, gen.queries(100, seed=2))
    p = neighbour_profile(data, queries, sample=300)
    # the calibrated shape: pages of a document nearly coincide, queries see a flat neighbourhood (high LID, low
    # relative contrast), and unrelated vectors still score well above 0 (anisotropy)
    assert p["page_top1_cos"] > p["query_top1_cos"] and p["query_lid"] > 3 * p["page_lid"]
    assert p["query_relative_contrast"] < p["page_relative_contrast"]
    assert 0.3 < p["page_median_cos"] < 0.8
    with pytest.raises(ValueError, match="local_dim"):
        PageVectors(10, 8, VectorProfile(local_dim=9))
