"""Exact nearest neighbours of intensity embeddings.

Every D-dimension block of an intensity embedding is one-hot, so for two responses a, b
    code . code' = number of dimensions with equal level (e),   cosine = e / D,
    Hamming(code, code') = 2 * (D - e).
Three exact indexes follow, all reporting e as an integer, so the threshold test
`cosine > t` is decided in integers, never by float rounding:
- `flat_ip`: FAISS IndexFlatIP, float inner product over the one-hot codes (the reference);
- `binary`: FAISS IndexBinaryFlat, Hamming distance over the codes packed to bits;
- `support`: the structure of annotations, where most levels are the median ("cannot
  reflect"). With |A| the number of non-median dimensions of a, and same / opposite the
  dimensions where both are non-median and equal / opposite,
      e = D - |A| - |B| + 2 * same + opposite,
  so a query costs one pass per non-median dimension it has (adding that dimension's
  precomputed row of 2 * [equal] + [opposite] over all responses) instead of a D x L inner
  product per response, and the top k of small integer scores are found by counting.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from alignx_ray.pairs import intensity_embedding
from alignx_ray.space import L, LEVEL_HIGH, LEVEL_LOW, LEVEL_MEDIAN

IndexKind = Literal["support", "binary", "flat_ip"]


def min_equal_dims(threshold: float, n_dims: int) -> int:
    """Smallest number of equal dimensions e with e / n_dims > threshold."""
    return math.floor(round(threshold * n_dims, 9)) + 1


def packed_codes(levels: np.ndarray, n_levels: int = L) -> np.ndarray:
    """(N, D) levels -> (N, ceil(D * L / 8)) uint8 bit-packed one-hot codes (zero padded)."""
    levels = np.asarray(levels)
    one_hot = np.eye(n_levels, dtype=bool)[levels.astype(np.int64) - 1].reshape(len(levels), -1)
    return np.packbits(one_hot, axis=1)


class LevelIndex:
    """An exact index over level vectors; `search` returns equal-dimension counts."""

    def __init__(self, levels: np.ndarray, kind: IndexKind = "support"):
        levels = np.asarray(levels, dtype=np.uint8)
        self.kind = kind
        self.n_dims = levels.shape[1]
        if kind == "support":
            self.index = SupportIndex(levels)
        elif kind in ("binary", "flat_ip"):
            import faiss

            binary = kind == "binary"
            codes = packed_codes(levels) if binary else intensity_embedding(levels)
            self.index = faiss.IndexBinaryFlat(codes.shape[1] * 8) if binary else faiss.IndexFlatIP(codes.shape[1])
            self.index.add(codes)
        else:
            raise ValueError(f"unknown index kind {kind!r}: use 'support', 'binary' or 'flat_ip'")

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, levels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(equal dims (Q, k) int32, row ids (Q, k) int64), most similar first."""
        levels = np.asarray(levels, dtype=np.uint8)
        k = min(k, len(self))
        if self.kind == "support":
            return self.index.search(levels, k)
        if self.kind == "binary":
            hamming, ids = self.index.search(packed_codes(levels), k)
            return (self.n_dims - hamming // 2).astype(np.int32), ids
        scores, ids = self.index.search(intensity_embedding(levels), k)
        return np.rint(scores).astype(np.int32), ids


class SupportIndex:
    """Exact top-k equal dimensions for three-level annotations (see the module docstring).

    Holds, per dimension d and query level l in {low, high}, the uint8 row over all
    responses of 2 * [b_d == l] + [b_d == opposite of l], and D - |B| per response; a
    query's running sum D - |B| + 2 * same + opposite <= D + |B| <= 2D fits in uint8 for
    D <= 127. Queries run on `threads` threads (NumPy releases the GIL in its loops). Ties
    at the k-th score go to the smaller row id.
    """

    def __init__(self, levels: np.ndarray, threads: int | None = None):
        if L != 3 or levels.shape[1] > 127:
            raise ValueError("the support index needs three levels around a median and at most 127 dimensions")
        self.ntotal = len(levels)
        self.threads = threads or os.cpu_count() or 1
        high, low = (levels == LEVEL_HIGH).T, (levels == LEVEL_LOW).T
        self.rows = {LEVEL_HIGH: np.ascontiguousarray(2 * high + low, dtype=np.uint8),
                     LEVEL_LOW: np.ascontiguousarray(2 * low + high, dtype=np.uint8)}
        self.base = (levels.shape[1] - (levels != LEVEL_MEDIAN).sum(axis=1)).astype(np.uint8)

    def top_k(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        acc = self.base.copy()
        support = np.flatnonzero(query != LEVEL_MEDIAN)
        for d in support:
            acc += self.rows[int(query[d])][d]
        cut = int(acc.max()) - 4
        top = np.flatnonzero(acc >= cut)
        while len(top) < k:  # widen the window below the best score until it holds k
            cut -= 8
            top = np.flatnonzero(acc >= cut)
        values = acc[top]
        kth = np.partition(values, len(values) - k)[len(values) - k]
        above, tied = top[values > kth], top[values == kth][: k - int((values > kth).sum())]  # ids ascending
        top = np.concatenate([above, tied])
        top = top[np.lexsort((top, -acc[top].astype(np.int16)))]
        return acc[top].astype(np.int32) - len(support), top

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.empty((len(queries), k), np.int32)
        ids = np.empty((len(queries), k), np.int64)

        def run(rows: range) -> None:
            for i in rows:
                scores[i], ids[i] = self.top_k(queries[i], k)

        chunks = [range(start, min(start + 64, len(queries))) for start in range(0, len(queries), 64)]
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(run, chunks))
        return scores, ids


def same_neighbours(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Two exact k-NN answers agree: equal scores per rank, and equal id sets above each
    query's k-th score (ids tied at the k-th score may legitimately differ)."""
    (score_a, ids_a), (score_b, ids_b) = a, b
    if not np.array_equal(score_a, score_b):
        return False
    kth = score_a[:, -1:]
    return all(set(ia[sa > k]) == set(ib[sb > k])
               for ia, sa, ib, sb, k in zip(ids_a, score_a, ids_b, score_b, kth[:, 0]))
