"""FAISS indexes over normalised page embeddings, and the manifest that binds an index to what made it (no Ray).

Vectors are L2-normalised, so inner product is cosine similarity. The index type follows the corpus size unless
set: exact search (``IndexFlatIP``) for small corpora, HNSW for large ones, IVF-PQ for very large ones; IVF with
8-bit scalar quantisation is available as an override. Building runs on GPU when FAISS sees GPUs (flat and IVF
types; HNSW is CPU-only in FAISS) and the index is always stored as a CPU index.

The manifest (``manifest.json``) records the model path and fingerprint, dimension, normalisation, prompt,
processor pixel bounds, counts, index type and parameters and creation time. :func:`check_manifest` refuses to pair
an index with a different model or dimension, which would return confident nonsense rather than fail.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["IndexMismatch", "check_manifest", "choose_spec", "build_index", "model_fingerprint", "search"]

MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"


class IndexMismatch(ValueError):
    """An index used with a model or dimension other than the one it was built with."""


@dataclass(frozen=True)
class IndexSpec:
    type: str  # flat | hnsw | ivf_sq8 | ivf_pq
    params: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "params": self.params}


def choose_spec(n: int, dim: int, cfg) -> IndexSpec:
    """The index for ``n`` vectors of ``dim`` from an IndexConfig (``index_type: auto`` picks by size)."""
    kind = cfg.index_type
    if kind == "auto":
        kind = "flat" if n <= cfg.flat_max else "hnsw" if n <= cfg.hnsw_max else "ivf_pq"
    if kind == "flat":
        return IndexSpec("flat", {})
    if kind == "hnsw":
        return IndexSpec("hnsw", {"m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction,
                                  "ef_search": cfg.hnsw_ef_search})
    # IVF needs ~39 training points per list (FAISS warns below that)
    nlist = cfg.ivf_nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    params: dict[str, Any] = {"nlist": nlist, "nprobe": min(cfg.ivf_nprobe, nlist)}
    if kind == "ivf_pq":
        m = cfg.pq_bytes or max(1, dim // 8)
        while dim % m:  # PQ sub-vectors must split the dimension evenly
            m -= 1
        params["pq_m"] = m
        params["pq_bits"] = 8
    return IndexSpec(kind, params)


def _factory(spec: IndexSpec, dim: int):
    import faiss

    p = spec.params
    if spec.type == "flat":
        return faiss.IndexFlatIP(dim)
    if spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
        return index
    key = f"IVF{p['nlist']},SQ8" if spec.type == "ivf_sq8" else f"IVF{p['nlist']},PQ{p['pq_m']}x{p['pq_bits']}"
    return faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(vectors: np.ndarray, spec: IndexSpec, *, use_gpu: bool | None = None, train_size: int = 262_144,
                seed: int = 0):
    """A trained, filled CPU index over ``vectors`` (float32, normalised)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    index = _factory(spec, dim)
    gpus = gpu_count() if use_gpu is None else (gpu_count() if use_gpu else 0)
    on_gpu = gpus > 0 and spec.type != "hnsw"
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if n <= train_size else vectors[np.sort(rng.choice(n, train_size, replace=False))]
        index.train(sample)
    add_to(index, vectors)
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    _set_search_params(index, spec)
    return index


def add_to(index, vectors: np.ndarray, chunk: int = 65_536) -> None:
    for start in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32))


def _set_search_params(index, spec: IndexSpec) -> None:
    import faiss

    if spec.type.startswith("ivf"):
        faiss.extract_index_ivf(index).nprobe = spec.params["nprobe"]
    elif spec.type == "hnsw":
        index.hnsw.efSearch = spec.params["ef_search"]


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the top ``k`` per query; positions are -1 where the index has fewer than k."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    return index.search(q, min(k, max(1, index.ntotal)))


def write_index(index, path: str | Path) -> None:
    import faiss

    tmp = f"{path}.tmp-{os.getpid()}"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def read_index(path: str | Path, spec: dict[str, Any] | None = None):
    import faiss

    index = faiss.read_index(str(path))
    if spec is not None:
        _set_search_params(index, IndexSpec(spec["type"], spec["params"]))
    return index


def model_fingerprint(path: str | Path) -> str:
    """sha256 over every file of a model folder (relative names and contents): equal iff the folders are equal.

    Reads the whole model (a 2B model in ~5 s); cheaper proxies (sizes, headers) cannot tell two fine-tunes apart.
    """
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.name in ("README.md",):  # the model card carries dates and metrics, not weights
            continue
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def check_manifest(manifest: dict[str, Any], *, fingerprint: str | None = None, dim: int | None = None,
                   where: str = "the index") -> None:
    """Refuse an index built by another model or at another dimension, saying what differs and what to do."""
    if dim is not None and manifest["dim"] != dim:
        raise IndexMismatch(f"{where} holds {manifest['dim']}-d embeddings but {dim}-d vectors were asked for: "
                            f"use the dimension it was built with (index.dim / output.truncate_dim) or rebuild it")
    if fingerprint is not None and manifest["model"]["fingerprint"] != fingerprint:
        raise IndexMismatch(f"{where} was built with the model at {manifest['model']['path']} (fingerprint "
                            f"{manifest['model']['fingerprint'][:12]}…), not with this model (fingerprint "
                            f"{fingerprint[:12]}…): embed the corpus again with this model into a new index.output")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
