"""FAISS indexes over normalised page embeddings: choosing, building, extending, searching, storing (no Ray).

Vectors are L2-normalised, so inner product is cosine similarity. The index type follows the corpus size unless
set: exact search (``IndexFlatIP``) for small corpora, HNSW for large ones, IVF with 8-bit scalar quantisation
(IVF-SQ8) for very large ones. ``index.quantization`` (int8, binary) keeps codes in memory and rescores the
candidates with full-precision vectors read from a memory-mapped file (:mod:`ray_vdr.corpus.quantized`). IVF-PQ is
an override for corpora that must fit in the least memory: its recall@10 is far below 0.95 on page-like vectors
(bench/ann_recall.py). Building runs on GPU when FAISS sees GPUs (flat and IVF types; HNSW is CPU-only in FAISS) and
the index is always stored as a CPU index. The index folder around it (shards, ids, manifest) is
:mod:`ray_vdr.corpus.store`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_vdr.corpus.manifest import INDEX_FILE
from ray_vdr.corpus.quantized import QuantizedIndex

logger = logging.getLogger(__name__)

__all__ = ["INDEX_FILE", "IndexSpec", "add_to", "build_index", "choose_spec", "factory", "filter_path", "read_index",
           "same_codes", "search", "set_search_params", "trained_empty", "write_index"]

# Above this share of allowed pages, a filtered search uses the index with a selector rather than exact scoring of
# the allowed vectors (bench/filter_search.py, 200k x 128-d: on flat the full scan wins from ~5% on, 2.05 ms against
# 3.78 at 10%; on HNSW exact scoring keeps recall at 1.0 where the selector drops to 0.85 on a topical 10%)
EXACT_MAX_SHARE = {"flat": 0.05, "hnsw": 0.25}
# candidates per result rescored with the float vectors, by quantization (recall@10 on page-like vectors against
# exact float search: int8 1.0 at 2x already; binary at 1024-d 0.92 at 10x, 0.97 at 20x; bench/quantization.py)
DEFAULT_RESCORE = {"int8": 4, "binary": 20}
BINARY_MIN_DIM = 512  # below it, binary codes lose recall that rescoring at the default depth does not win back


@dataclass(frozen=True)
class IndexSpec:
    type: str  # flat | hnsw | ivf_sq8 | ivf_pq
    params: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "params": self.params}


def choose_spec(n: int, dim: int, cfg) -> IndexSpec:
    """The index for ``n`` vectors of ``dim`` from an IndexConfig (``index_type: auto`` picks by size)."""
    kind = cfg.index_type
    quant = getattr(cfg, "quantization", "none")
    if kind == "auto":  # binary codes have no IVF form here: HNSW over them instead
        kind = "flat" if n <= cfg.flat_max else "hnsw" if n <= cfg.hnsw_max or quant == "binary" else "ivf_sq8"
    extra = {} if quant == "none" else {"quantization": quant, "rescore": cfg.rescore or DEFAULT_RESCORE[quant]}
    if quant == "binary" and dim < BINARY_MIN_DIM:
        logger.warning("binary codes of %d-d vectors keep few of the exact top 10 (recall@10 0.73 at 128-d with "
                       "rescore 20 on page-like vectors, 0.95 at 1024-d: docs/benchmarks.md); int8 or a larger "
                       "index.rescore keeps more", dim)
    if kind == "flat":
        return IndexSpec("flat", extra)
    if kind == "hnsw":
        return IndexSpec("hnsw", {"m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction,
                                  "ef_search": cfg.hnsw_ef_search, **extra})
    if quant == "binary":
        raise ValueError(f"index.quantization 'binary' works with the flat and hnsw index types, not {kind!r}")
    # IVF needs ~39 training points per list (FAISS warns below that)
    nlist = cfg.ivf_nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    params: dict[str, Any] = {"nlist": nlist, "nprobe": min(cfg.ivf_nprobe, nlist)}
    if kind == "ivf_pq":
        m = cfg.pq_bytes or max(1, dim // 8)
        while dim % m:  # PQ sub-vectors must split the dimension evenly
            m -= 1
        params["pq_m"] = m
        params["pq_bits"] = 8
    return IndexSpec(kind, {**params, **extra})


def same_codes(current: dict[str, Any], spec: IndexSpec) -> bool:
    """Whether an index of ``current``'s spec (a manifest's) can be extended for ``spec``: the same type and
    quantization (a change of either rebuilds)."""
    return current["type"] == spec.type and current["params"].get("quantization") == spec.params.get("quantization")


def factory(spec: IndexSpec, dim: int):
    """An empty index of ``spec`` for ``dim``-d vectors (IVF types and quantized ones still to train); build_index
    fills it."""
    import faiss

    p = spec.params
    quant = p.get("quantization")
    if quant is not None:
        return QuantizedIndex(_codes(spec, dim, quant), quant, dim, p["rescore"])
    if spec.type == "flat":
        return faiss.IndexFlatIP(dim)
    if spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
        return index
    key = f"IVF{p['nlist']},SQ8" if spec.type == "ivf_sq8" else f"IVF{p['nlist']},PQ{p['pq_m']}x{p['pq_bits']}"
    return faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)


def _codes(spec: IndexSpec, dim: int, quant: str):
    """The in-memory codes index of a quantized index."""
    import faiss

    p = spec.params
    if quant == "binary":
        if dim % 8:
            raise ValueError(f"binary codes need a dimension that is a multiple of 8, not {dim}")
        index = faiss.IndexBinaryFlat(dim) if spec.type == "flat" else faiss.IndexBinaryHNSW(dim, p["m"])
    elif spec.type == "flat":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    elif spec.type == "hnsw":
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, p["m"], faiss.METRIC_INNER_PRODUCT)
    else:  # the IVF types: their own codes
        return factory(IndexSpec(spec.type, {k: v for k, v in p.items() if k not in ("quantization", "rescore")}),
                       dim)
    if spec.type == "hnsw":
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
    return index


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(vectors: np.ndarray, spec: IndexSpec, *, use_gpu: bool | None = None, train_size: int = 262_144,
                seed: int = 0):
    """A trained, filled CPU index over ``vectors`` (float32, normalised)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    index = factory(spec, dim)
    gpus = gpu_count() if use_gpu is None else (gpu_count() if use_gpu else 0)
    on_gpu = gpus > 0 and spec.type != "hnsw" and not isinstance(index, QuantizedIndex)
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    _no_polysemous(index, spec)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if n <= train_size else vectors[np.sort(rng.choice(n, train_size, replace=False))]
        index.train(sample)
    add_to(index, vectors)
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    set_search_params(index, spec)
    return index


def trained_empty(spec: IndexSpec, sample: np.ndarray, *, use_gpu: bool | None = None):
    """An empty CPU index of ``spec`` trained on ``sample`` (IVF types: their coarse quantiser and codes, on GPU when
    FAISS sees one; flat and HNSW need no training). Indexes filled from copies of it share the quantiser: a sharded
    IVF index's scores and ``nprobe`` mean the same in every shard."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index = factory(spec, sample.shape[1])
    _no_polysemous(index, spec)
    if not index.is_trained:
        if not isinstance(index, QuantizedIndex) and (gpu_count() if use_gpu is None else use_gpu and gpu_count()):
            gpu = faiss.index_cpu_to_all_gpus(index)
            gpu.train(sample)
            index = faiss.index_gpu_to_cpu(gpu)
        else:
            index.train(sample)
    set_search_params(index, spec)
    return index


def _no_polysemous(index, spec: IndexSpec) -> None:
    """IVF-PQ: FAISS's default polysemous training serves a search mode not used here (17x slower)."""
    import faiss

    if spec.type == "ivf_pq":
        codes = index.codes if isinstance(index, QuantizedIndex) else index
        faiss.downcast_index(faiss.extract_index_ivf(codes)).do_polysemous_training = False


def add_to(index, vectors: np.ndarray, chunk: int = 65_536) -> None:
    for start in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32))


def set_search_params(index, spec: IndexSpec) -> None:
    """Set the search depth ``spec`` asks for (HNSW efSearch, IVF nprobe) on a built or read index."""
    import faiss

    if isinstance(index, QuantizedIndex):
        index.rescore = spec.params.get("rescore", index.rescore)
        index = index.codes
    if spec.type.startswith("ivf"):
        faiss.extract_index_ivf(index).nprobe = spec.params["nprobe"]
    elif spec.type == "hnsw":
        index.hnsw.efSearch = spec.params["ef_search"]


def search(index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
           exact_max: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the top ``k`` per query; positions are -1 where fewer than k qualify.

    ``allowed`` (a bool per vector position: not removed, and matching the request's filter) is applied *inside* the
    search, so top-k stays full under selective filters: up to ``exact_max`` allowed vectors (and at most
    EXACT_MAX_SHARE of the index: 5% on flat, 25% on HNSW) are scored exactly from the index's own storage (flat
    and HNSW keep the vectors, a quantized index its float vectors file); otherwise FAISS searches with an
    ``IDSelectorBitmap`` and a search depth (HNSW efSearch, IVF nprobe) widened by the inverse of the allowed share.
    A quantized index rescores ``rescore`` x k candidates from its codes with the float vectors.
    """
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    quantized = isinstance(index, QuantizedIndex)
    if allowed is None:
        return _rescored(index, q, k) if quantized else index.search(q, min(k, max(1, index.ntotal)))
    n = int(np.count_nonzero(allowed))
    if n == 0:
        return np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64)
    k, share = min(k, n), n / index.ntotal
    # exact over the allowed subset while it is small; not when most pages are allowed (a few tombstones): there
    # the index's own search with a selector is as exact (flat) or far faster (HNSW), measured in bench/filter_search
    if _exact(index, n, exact_max):
        ids = np.flatnonzero(allowed)
        stored = index.vectors()[ids] if quantized else index.reconstruct_batch(ids.astype(np.int64))
        scores = q @ stored.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, axis=1), ids[top]
    if quantized:
        return _rescored(index, q, k, _selector_params(index.codes, allowed, share, k * index.rescore))
    return index.search(q, k, params=_selector_params(index, allowed, share, k))


def _rescored(index: QuantizedIndex, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """A quantized index's search: ``rescore`` x k candidates from the codes (``params``: the filter's selector),
    their top k by the exact inner product with the float vectors."""
    if not index.ntotal:
        return np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64)
    _, candidates = index.codes.search(index.encode(q), min(index.ntotal, k * index.rescore), params=params)
    return index.rescored(q, candidates, min(k, index.ntotal))


def filter_path(index, n_allowed: int, exact_max: int = 65_536, k: int = 10) -> tuple[str, str]:
    """How :func:`search` applies a mask allowing ``n_allowed`` positions: ("exact", how many scored) or
    ("selector", the search depth it uses)."""
    import faiss

    if _exact(index, n_allowed, exact_max):
        return "exact", f"{n_allowed:,} scored"
    if isinstance(index, QuantizedIndex):
        how = filter_path(index.codes, n_allowed, 0, k * index.rescore)
        return how[0], f"{how[1]} over {index.kind} codes, {k * index.rescore} rescored"
    params = _selector_params(index, np.ones(index.ntotal, bool), n_allowed / max(index.ntotal, 1), k)
    if hasattr(index, "hnsw"):
        return "selector", f"efSearch {params.efSearch}"
    if isinstance(params, faiss.SearchParametersIVF):
        return "selector", f"nprobe {params.nprobe} of {faiss.extract_index_ivf(index).nlist}"
    return "selector", "full scan"


def _exact(index, n_allowed: int, exact_max: int) -> bool:
    """Whether a mask allowing ``n_allowed`` positions is scored exactly over the allowed vectors."""

    kind = "hnsw" if hasattr(index, "hnsw") else "flat"
    return (n_allowed <= exact_max and n_allowed / max(index.ntotal, 1) <= EXACT_MAX_SHARE[kind]
            and _stores_vectors(index))


def _stores_vectors(index) -> bool:
    import faiss

    return isinstance(index, faiss.IndexFlat | faiss.IndexHNSWFlat | QuantizedIndex)


def _selector_params(index, allowed: np.ndarray, share: float, k: int):
    import faiss

    sel = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
    widen = 1.0 / max(share, 1e-6)
    if hasattr(index, "hnsw"):  # IndexHNSW*, IndexBinaryHNSW
        ef = int(min(max(index.hnsw.efSearch, k) * widen, max(index.ntotal, 1)))
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(ef, index.hnsw.efSearch, k))
    else:
        try:
            ivf = faiss.extract_index_ivf(index)
        except (RuntimeError, TypeError):  # not IVF (binary indexes are another FAISS type)
            ivf = None
        if ivf is not None:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(min(ivf.nlist, max(1, ivf.nprobe * widen))))
        else:
            params = faiss.SearchParameters(sel=sel)
    params._selector = sel  # keep the selector alive as long as the parameters
    return params


def write_index(index, path: str | Path) -> list[Path]:
    """Write ``index`` at ``path`` (a quantized one: its codes there and its sidecar files beside it); returns every
    file written."""
    import faiss

    if isinstance(index, QuantizedIndex):
        return index.write(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)
    return [Path(path)]


def read_index(path: str | Path, spec: dict[str, Any] | None = None, vectors: str | Path | None = None):
    """The index at ``path`` with ``spec``'s search depth (a quantized one needs ``spec``; ``vectors``: a local copy
    of its vectors file, else the one beside it)."""
    import faiss

    quant = (spec or {}).get("params", {}).get("quantization")
    if quant is not None:
        p = spec["params"]
        index = QuantizedIndex.read(path, quant, p["rescore"], vectors)
    else:
        index = faiss.read_index(str(path))
    if spec is not None:
        set_search_params(index, IndexSpec(spec["type"], spec["params"]))
    return index
