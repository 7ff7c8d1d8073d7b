"""Quantized indexes (``index.quantization: int8 | binary``): codes in memory, candidates rescored (no Ray).

A :class:`QuantizedIndex` keeps two things per vector:

- its *code*, searched in memory: 8-bit scalar codes (``int8``: FAISS ``IndexScalarQuantizer`` or ``IndexHNSWSQ``,
  4x smaller than float32; an IVF index's own codes for the IVF types) or one bit per dimension (``binary``: FAISS
  ``IndexBinaryFlat`` or ``IndexBinaryHNSW``, 32x smaller; a dimension's bit is whether it is above its median on the
  training sample: page embeddings share a common direction, so the sign alone carries little);
- its full-precision float32 vector, in a file beside the codes (``<codes>.vectors.f32``, row i = position i) that is
  memory-mapped, not loaded: only the candidates' rows are read.

A search takes ``rescore`` x k candidates from the codes and returns the top k of them by the exact inner product with
the float vectors (:func:`ray_vdr.corpus.faiss_index.search`). While an index is built or extended, new vectors are
appended to a local spill file (the process holds codes, not vectors).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

__all__ = ["QUANTIZATIONS", "THRESHOLDS_SUFFIX", "VECTORS_SUFFIX", "QuantizedIndex", "sidecars"]

QUANTIZATIONS = ("int8", "binary")
VECTORS_SUFFIX = ".vectors.f32"
THRESHOLDS_SUFFIX = ".thresholds.npy"


def sidecars(kind: str) -> list[str]:
    """The files beside a quantized index's codes file (suffixes)."""
    return [VECTORS_SUFFIX, THRESHOLDS_SUFFIX] if kind == "binary" else [VECTORS_SUFFIX]


class QuantizedIndex:
    """Codes (a FAISS index) searched in memory plus float32 vectors read from a memory-mapped file for rescoring."""

    def __init__(self, codes, kind: str, dim: int, rescore: int, thresholds: np.ndarray | None = None,
                 vectors: str | Path | None = None):
        if kind not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {kind!r}")
        self.codes, self.kind, self.d, self.rescore = codes, kind, dim, int(rescore)
        self.thresholds = thresholds
        self._file = Path(vectors) if vectors is not None else None  # the vectors file, read-only
        self._spill: Path | None = None  # a local copy new vectors are appended to (building, extending)
        self._map: np.memmap | None = None
        self._mapped_rows = -1

    # FAISS's interface, as far as the build and search code use it
    @property
    def ntotal(self) -> int:
        return int(self.codes.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.codes.is_trained) and (self.kind != "binary" or self.thresholds is not None)

    def train(self, sample: np.ndarray) -> None:
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if self.kind == "binary":
            self.thresholds = np.median(sample, axis=0).astype(np.float32)
        if not self.codes.is_trained:
            self.codes.train(sample)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """What the codes index takes for float vectors ``x``: themselves (int8), or their bits (binary)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.kind == "binary":
            if self.thresholds is None:
                raise RuntimeError("a binary index must be trained (its per-dimension thresholds) before use")
            return np.packbits(x > self.thresholds, axis=1)
        return x

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not len(x):
            return
        spill = self._spilling()
        with open(spill, "ab") as fh:
            fh.write(x.tobytes())
        self.codes.add(self.encode(x))

    def _spilling(self) -> Path:
        """The local spill file (made on the first add: a copy of the vectors file when extending)."""
        if self._spill is None:
            folder = tempfile.mkdtemp(prefix="ray-vdr-vectors-")
            weakref.finalize(self, shutil.rmtree, folder, True)
            self._spill = Path(folder) / f"vectors{VECTORS_SUFFIX}"
            if self._file is not None and self.ntotal:
                shutil.copyfile(self._file, self._spill)
            else:
                self._spill.touch()
            self._map = None
        return self._spill

    def vectors(self) -> np.ndarray:
        """The float32 vectors (ntotal x d), memory-mapped read-only."""
        path = self._spill or self._file
        if path is None or not self.ntotal:
            return np.zeros((0, self.d), np.float32)
        if self._map is None or self._mapped_rows != self.ntotal:
            self._map = np.memmap(path, np.float32, "r", shape=(self.ntotal, self.d))
            self._mapped_rows = self.ntotal
        return self._map

    def rescored(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the top ``k`` of each query's ``candidates`` (positions; -1 = none) by the exact
        inner product with the float vectors; -1 pads rows with fewer than ``k`` candidates."""
        vectors = self.vectors()
        scores = np.zeros((len(queries), k), np.float32)
        positions = np.full((len(queries), k), -1, np.int64)
        for i, (q, cand) in enumerate(zip(queries, candidates, strict=True)):
            cand = np.unique(cand[cand >= 0])  # sorted: the rows are read in file order
            if not len(cand):
                continue
            s = vectors[cand] @ q
            top = np.argsort(-s, kind="stable")[:k]
            scores[i, :len(top)], positions[i, :len(top)] = s[top], cand[top]
        return scores, positions

    def write(self, path: str | Path) -> list[Path]:
        """Write the codes to ``path`` and the sidecars beside it; returns every file written."""
        import faiss

        path = Path(path)
        (faiss.write_index_binary if self.kind == "binary" else faiss.write_index)(self.codes, str(path))
        vectors = Path(f"{path}{VECTORS_SUFFIX}")
        source = self._spill or self._file
        if source is not None and self.ntotal:
            shutil.copyfile(source, vectors)
        else:
            vectors.touch()
        written = [path, vectors]
        if self.kind == "binary":
            np.save(Path(f"{path}{THRESHOLDS_SUFFIX}"), self.thresholds)
            written.append(Path(f"{path}{THRESHOLDS_SUFFIX}"))
        return written

    @classmethod
    def read(cls, path: str | Path, kind: str, rescore: int, vectors: str | Path | None = None) -> QuantizedIndex:
        """The index written at ``path`` (its vectors file beside it, or at ``vectors``: a local copy)."""
        import faiss

        codes = (faiss.read_index_binary if kind == "binary" else faiss.read_index)(str(path))
        thresholds = np.load(f"{path}{THRESHOLDS_SUFFIX}") if kind == "binary" else None
        dim = int(codes.d)  # binary indexes count bits: one per dimension
        index = cls(codes, kind, dim, rescore, thresholds, vectors or f"{path}{VECTORS_SUFFIX}")
        expected = index.ntotal * dim * 4
        size = os.path.getsize(index._file)
        if size != expected:
            raise ValueError(f"{index._file} holds {size:,} bytes, not the {expected:,} of {index.ntotal:,} "
                             f"{dim}-d float32 vectors its codes index holds: a partial copy; remove it and reload")
        return index
