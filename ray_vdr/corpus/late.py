"""Late interaction (multi-vector, MaxSim) in an index: what the embedding job stores per page and how a search
finds and scores pages. Numpy only (FAISS does the first stage through the index's usual machinery; no Ray).

A multi-vector page is T token vectors; a query's score for it is MaxSim: the sum over the query's tokens of their
best dot product with the page's tokens. Scoring every page's tokens for every query does not scale, so the index
is two stages:

1. **First stage**: each page's MUVERA fixed dimensional encoding (:class:`FDE`, arXiv:2405.19504) is the page's
   vector in the index's FAISS index, and a query's FDE is searched there like a single-vector query: the same
   positions, ids, shards, versions, deletes, filters and key scopes as a single-vector index, unchanged. The default
   (k_sim 5, d_proj 16, 20 repetitions, 200 candidates) was chosen by ``python -m bench.multivector_first_stage``
   (docs/bench/notes/multivector.md: recall@10 0.955 of exhaustive MaxSim at 23 ms first-stage p50 on 6,000 pages,
   against 418 ms for exhaustive MaxSim).
2. **Rescoring**: exact MaxSim of the query's tokens against each candidate's stored tokens (:func:`maxsim`).

Token vectors are stored per page (the ``tokens`` column of the page shards) in fp16, int8 (a scale per token) or
binary (signs; scored as +-1/sqrt(d) against the float query, asymmetric), optionally after Sentence Transformers'
hierarchical token pooling at index time (``index.late.pooling``: keep about 1/factor of a page's tokens).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ray_vdr.corpus.manifest import LateIndexSpec

__all__ = ["FDE", "TokenStore", "fde_of", "maxsim", "pack_tokens", "read_tokens", "rescored", "token_bytes",
           "unpack_tokens"]

class FDE:
    """MUVERA fixed dimensional encodings: ``reps`` SimHash partitionings of 2^``k_sim`` parts, ``d_proj`` per part
    (+-1 projection; the identity at d_proj = dim), and an optional final count-sketch projection to ``final``.
    A query sums its tokens per partition, a page averages them (an empty partition takes the page token nearest to
    it in Hamming distance); the inner product of a query's FDE and a page's approximates their MaxSim."""

    def __init__(self, dim: int, k_sim: int, d_proj: int, reps: int, final: int = 0, seed: int = 0):
        if d_proj > dim:
            raise ValueError(f"d_proj {d_proj} > dim {dim}")
        rng = np.random.default_rng([seed, 1])
        self.k_sim, self.d_proj, self.reps, self.parts = k_sim, d_proj, reps, 2 ** k_sim
        self.hyper = rng.standard_normal((dim, reps * k_sim)).astype(np.float32)
        self.proj = (np.tile(np.eye(dim, dtype=np.float32), reps) if d_proj == dim else
                     (rng.choice([-1, 1], (dim, reps * d_proj)) / np.sqrt(d_proj)).astype(np.float32))
        self.popcount = np.array([bin(i).count("1") for i in range(self.parts)], np.int8)
        self.dim = final or reps * self.parts * d_proj
        if final:
            bucket = rng.integers(0, final, reps * self.parts * d_proj)
            self.order = np.argsort(bucket, kind="stable")
            self.buckets, self.starts = np.unique(bucket[self.order], return_index=True)
            self.sign = rng.choice([-1, 1], len(bucket)).astype(np.float32)[self.order]
        self.final = final

    @property
    def name(self) -> str:
        return f"fde k{self.k_sim} p{self.d_proj} r{self.reps}" + (f" f{self.final}" if self.final else "")

    def encode(self, x: np.ndarray, doc: bool) -> np.ndarray:
        """FDEs of pages (``doc``: average per part, empty parts filled) or queries (sum per part) of equal token
        counts, (n, tokens, dim): (n, self.dim)."""
        n, t, d = x.shape
        r, b, dp = self.reps, self.parts, self.d_proj
        flat = x.reshape(-1, d)
        cid = (((flat @ self.hyper) > 0).reshape(-1, r, self.k_sim) @ (1 << np.arange(self.k_sim))).astype(np.int64)
        p = (flat @ self.proj).reshape(-1, r, dp)
        key = ((np.arange(n).repeat(t)[:, None] * r + np.arange(r)) * b + cid).ravel()
        order = np.argsort(key, kind="stable")
        keys, starts, counts = np.unique(key[order], return_index=True, return_counts=True)
        out = np.zeros((n * r * b, dp), np.float32)
        out[keys] = np.add.reduceat(p.reshape(-1, dp)[order], starts, axis=0)
        if doc:
            out[keys] /= counts[:, None]
            out = out.reshape(n, r, b, dp)
            empty = np.ones(n * r * b, bool)
            empty[keys] = False
            empty = empty.reshape(n, r, b)
            cid, p = cid.reshape(n, t, r), p.reshape(n, t, r, dp)
            for rep in np.flatnonzero(empty.any((0, 2))):
                nearest = self.popcount[cid[:, :, rep, None] ^ np.arange(b)].argmin(1)  # (n, b): the token nearest
                fill = p[np.arange(n)[:, None], nearest, rep]  # in Hamming distance to each part
                out[:, rep][empty[:, rep]] = fill[empty[:, rep]]
        out = out.reshape(n, -1)
        if self.final:
            final = np.zeros((n, self.final), np.float32)
            final[:, self.buckets] = np.add.reduceat(out[:, self.order] * self.sign, self.starts, axis=1)
            out = final
        return out

    def encode_pages(self, x: np.ndarray, chunk: int = 128) -> np.ndarray:
        return np.concatenate([self.encode(x[lo:lo + chunk], doc=True) for lo in range(0, len(x), chunk)])

    def encode_each(self, items: list[np.ndarray], doc: bool) -> np.ndarray:
        """FDEs of token matrices of any lengths (pages or queries), one row each; an item without tokens is zero."""
        out = np.zeros((len(items), self.dim), np.float32)
        for i, x in enumerate(items):
            if len(x):
                out[i] = self.encode(np.asarray(x, np.float32)[None], doc)[0]
        return out


def pack_tokens(x: np.ndarray, storage: str) -> bytes:
    """A page's token vectors (T, d), unit rows, as stored: fp16; int8 with a float32 scale per token ahead of the
    codes; binary: the signs, d/8 bytes per token (d a multiple of 8)."""
    x = np.asarray(x, dtype=np.float32)
    if storage == "fp16":
        return x.astype(np.float16).tobytes()
    if storage == "int8":
        scale = np.maximum(np.abs(x).max(axis=1), 1e-12) / 127
        return scale.astype(np.float32).tobytes() + np.round(x / scale[:, None]).astype(np.int8).tobytes()
    if storage == "binary":
        if x.shape[1] % 8:
            raise ValueError(f"binary token storage needs a token dimension divisible by 8, not {x.shape[1]}")
        return np.packbits(x > 0, axis=1).tobytes()
    raise ValueError(f"unknown token storage {storage!r}: fp16, int8 or binary")


def token_bytes(dim: int, storage: str) -> int:
    """Stored bytes per token vector."""
    return {"fp16": 2 * dim, "int8": dim + 4, "binary": dim // 8}[storage]


def unpack_tokens(blob: bytes, dim: int, storage: str) -> np.ndarray:
    """The float32 token vectors (T, d) a stored page scores with (binary: +-1/sqrt(d))."""
    t = len(blob) // token_bytes(dim, storage)
    if storage == "fp16":
        return np.frombuffer(blob, np.float16).reshape(t, dim).astype(np.float32)
    if storage == "int8":
        scale = np.frombuffer(blob, np.float32, t)
        return np.frombuffer(blob, np.int8, offset=4 * t).reshape(t, dim).astype(np.float32) * scale[:, None]
    bits = np.unpackbits(np.frombuffer(blob, np.uint8).reshape(t, dim // 8), axis=1)
    return (bits.astype(np.float32) * 2 - 1) / np.float32(np.sqrt(dim))


def maxsim(query: np.ndarray, pages: list[np.ndarray]) -> np.ndarray:
    """MaxSim of one query's tokens (Q, d) against each page's (T_i, d): (len(pages),), one matrix product."""
    out = np.zeros(len(pages), np.float32)
    full = [i for i, p in enumerate(pages) if len(p)]  # a page without tokens scores 0
    if not full or not len(query):
        return out
    lengths = np.array([len(pages[i]) for i in full])
    sims = query @ np.concatenate([pages[i] for i in full]).T  # (Q, sum T)
    out[full] = np.maximum.reduceat(sims, np.r_[0, np.cumsum(lengths)[:-1]], axis=1).sum(axis=0)
    return out


def fde_of(spec: LateIndexSpec) -> FDE:
    """The first stage's page and query encoder of a multi-vector index."""
    return FDE(spec.token_dim, spec.k_sim, min(spec.d_proj, spec.token_dim), spec.reps, seed=spec.seed)


class TokenStore:
    """The stored token vectors of an index's positions (row i = position offset + i), resident as the packed bytes
    (fp16 / int8 / binary) and unpacked per candidate."""

    def __init__(self, blobs: pa.Array, spec: LateIndexSpec):
        self.blobs, self.spec = blobs, spec

    @property
    def nbytes(self) -> int:
        return self.blobs.nbytes

    def get(self, rows: np.ndarray) -> list[np.ndarray]:
        dim, storage = self.spec.token_dim, self.spec.storage
        blobs = self.blobs.take(pa.array(np.asarray(rows, np.int64))).to_pylist()  # one gather for the candidates
        return [unpack_tokens(b or b"", dim, storage) for b in blobs]


def read_tokens(output: str, ids: pa.Table) -> pa.Array:
    """The packed token vectors of each row of an index's ``ids`` (from the page shards its rows point at), in row
    order; null where a page's shard is gone (a removed page a compaction will drop)."""
    from ray_vdr.storage import read_table

    n = ids.num_rows
    if n == 0:
        return pa.array([], pa.large_binary())
    shard = np.asarray(ids.column("shard").to_pylist(), dtype=object)
    rows = ids.column("row").to_numpy()
    parts, order = [], []
    for name in dict.fromkeys(shard.tolist()):
        sel = np.flatnonzero(shard == name)
        try:
            col = read_table(f"{output}/pages/{name}", ["tokens"]).column("tokens").take(pa.array(rows[sel]))
            parts.append(col.combine_chunks().cast(pa.large_binary()))
        except (FileNotFoundError, KeyError):
            parts.append(pa.nulls(len(sel), pa.large_binary()))
        order.append(sel)
    inverse = np.empty(n, np.int64)
    inverse[np.concatenate(order)] = np.arange(n)
    return pa.concat_arrays(parts).take(pa.array(inverse))


def rescored(queries: list[np.ndarray], positions: np.ndarray, tokens: TokenStore, k: int
             ) -> list[list[tuple[float, int]]]:
    """Each query's top ``k`` (MaxSim score, position) among its first-stage ``positions`` (-1: none), best first."""
    out = []
    for q, row in zip(queries, positions, strict=True):
        cand = row[row >= 0]
        scores = maxsim(np.asarray(q, np.float32), tokens.get(cand))
        best = np.argsort(-scores, kind="stable")[:k]
        out.append([(float(scores[i]), int(cand[i])) for i in best])
    return out
