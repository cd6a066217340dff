"""Exact nearest neighbours of intensity embeddings.

Every D-dimension block of an intensity embedding is one-hot, so for two responses a, b
    code . code' = number of dimensions with equal level (e),   cosine = e / D,
    Hamming(code, code') = 2 * (D - e).
Three exact indexes follow, all reporting e as an integer, so the threshold test
`cosine > t` is decided in integers, never by float rounding:
- `flat_ip`: FAISS IndexFlatIP, float inner product over the one-hot codes (the reference);
- `binary`: FAISS IndexBinaryFlat, Hamming distance over the codes packed to bits;
- `fastscan`: FAISS IndexPQFastScan (4-bit product quantization scanned with SIMD lookup
  tables) with codebooks that make it exact. Each sub-quantizer covers two dimensions; its
  9 used centroids are the 9 level pairs as concatenated one-hots, so a response's code *is*
  its levels and the lookup table of a query holds [number of the two dimensions equal] in
  {0, 1, 2}. Fast-scan quantizes those tables to uint8 with one scale a = 255 / 2 = 127.5
  (round(1 * a) = 128, round(2 * a) = 255) and adds them in uint16, so the score it ranks by
  is e + n1 / 255, where n1 <= D / 2 counts sub-quantizers with exactly one equal dimension:
  for D <= 254 that orders by e first and rounds back to e.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from alignx_ray.common.space import L, intensity_embedding

IndexKind = Literal["fastscan", "binary", "flat_ip"]
DIMS_PER_CODE = 2  # 3 x 3 level pairs fit a 4-bit code (16 centroids)


def min_equal_dims(threshold: float, n_dims: int) -> int:
    """Smallest number of equal dimensions e with e / n_dims > threshold."""
    return math.floor(round(threshold * n_dims, 9)) + 1


def packed_codes(levels: np.ndarray, n_levels: int = L) -> np.ndarray:
    """(N, D) levels -> (N, ceil(D * L / 8)) uint8 bit-packed one-hot codes (zero padded)."""
    levels = np.asarray(levels)
    one_hot = np.eye(n_levels, dtype=bool)[levels.astype(np.int64) - 1].reshape(len(levels), levels.shape[1] * n_levels)
    return np.packbits(one_hot, axis=1)


class LevelIndex:
    """An exact index over level vectors; `search` returns equal-dimension counts."""

    def __init__(self, levels: np.ndarray, kind: IndexKind = "fastscan"):
        import faiss

        levels = np.asarray(levels, dtype=np.uint8)
        self.kind = kind
        self.n_dims = levels.shape[1]
        if kind == "fastscan":
            self.index = fastscan_index(levels)
        elif kind == "binary":
            codes = packed_codes(levels)
            self.index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
            self.index.add(codes)
        elif kind == "flat_ip":
            self.index = faiss.IndexFlatIP(self.n_dims * L)
            self.index.add(intensity_embedding(levels))
        else:
            raise ValueError(f"unknown index kind {kind!r}: use 'fastscan', 'binary' or 'flat_ip'")

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, levels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(equal dims (Q, k) int32, row ids (Q, k) int64), most similar first; k is at most
        the rows held (none for an empty index: a shard of a small pool may hold no row)."""
        levels = np.asarray(levels, dtype=np.uint8)
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(levels), 0), np.int32), np.zeros((len(levels), 0), np.int64)
        if self.kind == "binary":
            hamming, ids = self.index.search(packed_codes(levels), k)
            return (self.n_dims - hamming // 2).astype(np.int32), ids
        queries = intensity_embedding(levels)
        if self.kind == "fastscan":  # the padding dimension of an odd D matches nothing
            queries = np.pad(queries, ((0, 0), (0, fastscan_dims(self.n_dims) * L - queries.shape[1])))
        scores, ids = self.index.search(queries, k)
        return np.rint(scores).astype(np.int32), ids


def fastscan_dims(n_dims: int) -> int:
    """D rounded up to whole sub-quantizers."""
    return -(-n_dims // DIMS_PER_CODE) * DIMS_PER_CODE


def fastscan_index(levels: np.ndarray):
    """IndexPQFastScan over (N, D) levels with the exact codebooks of the module docstring."""
    import faiss

    n, n_dims = levels.shape
    if L != 3 or n_dims > 254:
        raise ValueError("the fastscan index is exact for three levels and at most 254 dimensions")
    padded = fastscan_dims(n_dims)
    m = padded // DIMS_PER_CODE
    pq_index = faiss.IndexPQ(padded * L, m, 4, faiss.METRIC_INNER_PRODUCT)
    centroids = np.zeros((m, 16, DIMS_PER_CODE * L), np.float32)
    for code, (first, second) in enumerate(np.ndindex(L, L)):
        centroids[:, code, first] = centroids[:, code, L + second] = 1
    faiss.copy_array_to_vector(centroids.ravel(), pq_index.pq.centroids)
    pq_index.is_trained = True
    pairs = np.pad(levels.astype(np.uint8) - 1, ((0, 0), (0, padded - n_dims))).reshape(n, m, DIMS_PER_CODE)
    codes = np.pad(pairs[..., 0] * L + pairs[..., 1], ((0, 0), (0, m % 2)))  # 4-bit codes, low nibble first
    faiss.copy_array_to_vector((codes[:, 0::2] | codes[:, 1::2] << 4).astype(np.uint8).ravel(), pq_index.codes)
    pq_index.ntotal = n
    return faiss.IndexPQFastScan(pq_index)


def same_neighbours(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Two exact k-NN answers agree: equal scores per rank, and equal id sets above each
    query's k-th score (ids tied at the k-th score may legitimately differ)."""
    (score_a, ids_a), (score_b, ids_b) = a, b
    if not np.array_equal(score_a, score_b):
        return False
    kth = score_a[:, -1:]
    return all(
        set(ia[sa > k]) == set(ib[sb > k]) for ia, sa, ib, sb, k in zip(ids_a, score_a, ids_b, score_b, kth[:, 0])
    )
