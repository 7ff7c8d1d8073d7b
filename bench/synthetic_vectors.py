"""Synthetic page-embedding-like vectors and their neighbour profile, for measuring and testing the FAISS defaults.

Uniform random vectors are the worst case for any approximate index and say little about a real corpus. No real
page embedder runs on this project's machines, so the index defaults are measured on a generative model with the
structure of a document corpus, whose neighbour profile (:func:`neighbour_profile`) is matched to page and query
embeddings a trained model made (bench/ann_recall.py, docs/bench/notes/ann.md):

- a common direction shared by every vector (embedders are anisotropic: two unrelated pages still score well above 0);
- topics (subject and layout families) with Zipf-distributed sizes, ``topics_per_sqrt_n`` x sqrt(n) of them;
- each topic varies in its own random ``local_dim``-dimensional subspace: documents spread in it, and a document's
  pages (``pages_per_doc`` on average) sit close together in it, plus a small full-dimensional noise;
- queries are not pages: a query targets one document, lands off it inside its topic's subspace, carries a larger
  full-dimensional noise and a shift shared by all queries (the text/image modality gap), so it sits farther from
  its neighbours than pages sit from theirs — which is what makes approximate search hard.

Everything is a pure function of (n, profile, seed); pages are generated topic by topic into a float32 array at
random positions, without a float64 copy of the whole set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PageVectors", "VectorProfile", "neighbour_profile"]


@dataclass(frozen=True)
class VectorProfile:
    """The generator's knobs; norms are before the final L2 normalisation (a topic centre has norm ``topic_norm``)."""

    mean_norm: float = 1.16
    topic_norm: float = 1.0
    topics_per_sqrt_n: float = 1.4
    topic_zipf: float = 1.0
    pages_per_doc: float = 10.0
    local_dim: int = 10
    doc_spread: float = 0.27
    page_spread: float = 0.1
    page_noise: float = 0.013
    query_spread: float = 0.29
    query_noise: float = 0.26
    query_shift: float = 0.66

    def as_dict(self) -> dict:
        return asdict(self)


class PageVectors:
    """``n`` page vectors of ``dim`` (:meth:`pages`) and queries about them (:meth:`queries`), from one seed."""

    def __init__(self, n: int, dim: int = 1024, profile: VectorProfile | None = None, seed: int = 0):
        if n < 1 or dim < 2:
            raise ValueError(f"need n >= 1 and dim >= 2, got n={n}, dim={dim}")
        self.n, self.dim, self.p, self.seed = n, dim, profile or VectorProfile(), seed
        if not 1 <= self.p.local_dim <= dim:
            raise ValueError(f"local_dim must be in [1, dim={dim}], got {self.p.local_dim}")
        rng = np.random.default_rng([seed, 0])
        self.mean = _unit(rng.standard_normal(dim)).astype(np.float32)
        self.shift = _unit(rng.standard_normal(dim)).astype(np.float32)  # the queries' modality gap
        topics = max(1, min(n, round(self.p.topics_per_sqrt_n * np.sqrt(n))))
        self.centres = rng.standard_normal((topics, dim)).astype(np.float32) / np.float32(np.sqrt(dim))
        weights = 1.0 / np.arange(1, topics + 1) ** self.p.topic_zipf
        docs = max(1, round(n / self.p.pages_per_doc))
        self.doc_topic = rng.choice(topics, docs, p=weights / weights.sum())
        self.doc_latent = self._latent(rng, docs)
        self.page_doc = np.sort(rng.integers(0, docs, n))  # grouped by document, hence by topic once ordered
        self.page_doc = self.page_doc[np.argsort(self.doc_topic[self.page_doc], kind="stable")]
        self.position = rng.permutation(n)  # where each generated page lands in the output

    def _latent(self, rng, rows: int) -> np.ndarray:
        return (rng.standard_normal((rows, self.p.local_dim)) / np.sqrt(self.p.local_dim)).astype(np.float32)

    def _basis(self, topic: int) -> np.ndarray:
        """The topic's own orthonormal subspace (dim x local_dim), regenerated from its seed when needed."""
        g = np.random.default_rng([self.seed, 1, topic]).standard_normal((self.dim, self.p.local_dim))
        return np.linalg.qr(g)[0].astype(np.float32)

    def _vectors(self, topic: int, latent: np.ndarray, noise: float, rng) -> np.ndarray:
        """Unnormalised vectors of one topic from their latent coordinates in its subspace."""
        p = self.p
        x = latent @ self._basis(topic).T
        x += np.float32(p.topic_norm) * self.centres[topic] + np.float32(p.mean_norm) * self.mean
        x += np.float32(noise / np.sqrt(self.dim)) * rng.standard_normal(x.shape, dtype=np.float32)
        return x

    def pages(self) -> np.ndarray:
        """(n, dim) float32, L2-normalised, in random order (position i is page i)."""
        p, rng = self.p, np.random.default_rng([self.seed, 2])
        out = np.empty((self.n, self.dim), np.float32)
        topic_of = self.doc_topic[self.page_doc]
        bounds = np.flatnonzero(np.diff(topic_of)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, self.n], strict=True):
            docs = self.page_doc[lo:hi]
            latent = p.doc_spread * self.doc_latent[docs] + p.page_spread * self._latent(rng, hi - lo)
            out[self.position[lo:hi]] = _normalise(self._vectors(int(topic_of[lo]), latent, p.page_noise, rng))
        return out

    def queries(self, count: int, seed: int = 1) -> np.ndarray:
        """(count, dim) float32 queries, each about a page's document (pages drawn uniformly), L2-normalised."""
        p, rng = self.p, np.random.default_rng([self.seed, 3, seed])
        docs = self.page_doc[rng.integers(0, self.n, count)]
        out = np.empty((count, self.dim), np.float32)
        for topic in np.unique(self.doc_topic[docs]):
            rows = np.flatnonzero(self.doc_topic[docs] == topic)
            latent = p.doc_spread * self.doc_latent[docs[rows]] + p.query_spread * self._latent(rng, len(rows))
            x = self._vectors(int(topic), latent, p.query_noise, rng) + np.float32(p.query_shift) * self.shift
            out[rows] = _normalise(x)
        return out


def neighbour_profile(data: np.ndarray, queries: np.ndarray, k: int = 10, lid_k: int = 20, sample: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """How ``queries`` (and a sample of ``data`` itself, self excluded) see their nearest neighbours in ``data``.

    Medians over the queries: cosine of the 1st and ``k``-th neighbour and of a random vector; relative contrast
    (mean distance ÷ distance of the ``k``-th neighbour: near 1 = every vector is about as near, the hard case); and
    local intrinsic dimensionality (the MLE over the ``lid_k`` nearest distances: how fast neighbours multiply with
    distance; higher = harder for approximate search). Exact, by numpy, in blocks.
    """
    data = np.asarray(data, np.float32)
    if len(data) <= lid_k:
        raise ValueError(f"need more than lid_k={lid_k} vectors, got {len(data)}")
    rng = np.random.default_rng(seed)
    own = rng.choice(len(data), min(sample, len(data)), replace=False)
    q = np.asarray(queries, np.float32)[:sample]
    out = {}
    for name, x, self_pos in (("query", q, None), ("page", data[own], own)):
        top, mean_d, median_cos = [], [], []
        for i in range(0, len(x), 256):
            s = x[i:i + 256] @ data.T
            if self_pos is not None:
                s[np.arange(len(s)), self_pos[i:i + 256]] = -np.inf
            part = -np.sort(-np.partition(s, -lid_k, axis=1)[:, -lid_k:], axis=1)
            top.append(part)
            finite = np.where(np.isfinite(s), s, np.nan)
            mean_d.append(np.nanmean(np.sqrt(np.maximum(2 - 2 * finite, 0)), axis=1))
            median_cos.append(np.nanmedian(finite, axis=1))
        top_s = np.concatenate(top)
        dist = np.sqrt(np.maximum(2 - 2 * top_s, 1e-12))
        lid = -1.0 / np.mean(np.log(dist[:, :-1] / dist[:, -1:]), axis=1)
        out |= {f"{name}_top1_cos": float(np.median(top_s[:, 0])),
                f"{name}_top{k}_cos": float(np.median(top_s[:, k - 1])),
                f"{name}_median_cos": float(np.median(np.concatenate(median_cos))),
                f"{name}_relative_contrast": float(np.median(np.concatenate(mean_d) / dist[:, k - 1])),
                f"{name}_lid": float(np.median(lid))}
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)
