"""Behavioural personas (paper §4.2, Algorithm 1 lines 12–25): P_UGC and P_PAIR.

For a pair (x, y_w, y_l) with direction P:
- P_UGC items are responses y' of other threads (x' != x) with cosine(y', y_w) > t, at most
  one per thread (its most similar response, Algorithm 1 line 15). An item's own direction
  is its level against the median (§4.2).
- P_PAIR items are pairs (x', y'_w, y'_l) of other threads with cosine(y'_w, y_w) > t and
  cosine(y'_l, y_l) > t; an item's direction is that pair's direction.
- Candidates come from an exact FAISS search over all annotated responses (or all pairs'
  chosen responses), the `candidates` nearest first; H items are sampled, seeded by the pair
  id, among those that satisfy the consistency criterion (`consistent`).
- The persona's overall direction is the majority vote of its items (`vote`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from alignx_ray.build.annotate import labelled_responses
from alignx_ray.common.config import PoolConfig, Section
from alignx_ray.common.raydata import map_resumable
from alignx_ray.common.schema import PERSONAS_SCHEMA
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import NEUTRAL, level_to_direction
from alignx_ray.engines.retrieval import IndexKind, LevelIndex, min_equal_dims


class PersonaConfig(Section):
    """How personas are retrieved.

    threshold: t, cosine similarity of intensity embeddings an item must exceed (paper: 0.6).
    items: H, items kept per persona (paper: 16).
    candidates: nearest neighbours fetched per query before the filters; enough that H
        consistent items from other threads survive them.
    index: `fastscan` (FAISS 4-bit PQ fast-scan with exact codebooks), `binary` (FAISS Hamming
        over bit-packed codes) or `flat_ip` (FAISS float inner product); all exact (retrieval.py).
    seed: mixed with each pair id into that pair's random stream.
    """

    threshold: float = 0.6
    items: int = 16
    candidates: int = 512
    index: IndexKind = "fastscan"
    seed: int = 0
    pool: PoolConfig = PoolConfig(batch_size=4096, concurrency=(1, 8), num_cpus=2)


def consistent(items: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The preference-consistency criterion of one persona item (paper §A.2 (2)).

    An item with direction p' is consistent with the pair's direction P when it does not
    contradict P (no dimension where both are non-neutral and opposite) and matches P on at
    least one dimension where P is non-neutral. items: (n, D); direction: (D,) -> (n,) bool.
    """
    items = np.atleast_2d(items)
    decided = direction != NEUTRAL
    both = decided & (items != NEUTRAL)
    contradicts = (both & (items != direction)).any(axis=1)
    matches = (both & (items == direction)).any(axis=1)
    return matches & ~contradicts


def vote(items: np.ndarray) -> np.ndarray:
    """Majority vote per dimension over items' directions (n, D) -> (D,).

    A neutral item abstains on a dimension; positive wins with more positive than negative
    votes, negative with more negative, and a tie (including no votes) is neutral.
    """
    items = np.atleast_2d(items)
    pos, neg = (items == 1.0).sum(axis=0), (items == 0.0).sum(axis=0)
    return np.where(pos > neg, 1.0, np.where(neg > pos, 0.0, NEUTRAL))


def example_consistent(direction: np.ndarray, personas: list[np.ndarray]) -> bool:
    """Keep an example only if some dimension is non-neutral in P and every present persona's
    voted direction equals P there (one common dimension for all of them)."""
    agree = direction != NEUTRAL
    for persona in personas:
        agree &= persona == direction
    return bool(agree.any())


@dataclass(frozen=True)
class Pool:
    """What personas are drawn from: responses (for UGC) or pairs (for PAIR), sorted by id,
    with the arrays the search and the filters need."""

    table: pa.Table
    thread_ids: np.ndarray  # (N,) str
    levels: np.ndarray  # (N, D) uint8: response levels, or the pairs' chosen levels
    directions: np.ndarray  # (N, D) float: each item's own direction
    rejected_levels: np.ndarray | None = None  # (N, D) uint8, pairs only

    @classmethod
    def of_responses(cls, responses: pa.Table) -> Pool:
        table = responses.select(["response_id", "thread_id", "post", "response", "levels"]).sort_by("response_id")
        levels = np.array(table["levels"].to_pylist(), dtype=np.uint8)
        return cls(table, np.array(table["thread_id"].to_pylist()), levels, level_to_direction(levels))

    @classmethod
    def of_pairs(cls, pairs: pa.Table) -> Pool:
        table = pairs.select(
            ["pair_id", "thread_id", "prompt", "chosen", "rejected", "chosen_levels", "rejected_levels", "direction"]
        ).sort_by("pair_id")
        return cls(
            table,
            np.array(table["thread_id"].to_pylist()),
            np.array(table["chosen_levels"].to_pylist(), dtype=np.uint8),
            np.array(table["direction"].to_pylist(), dtype=np.float64),
            np.array(table["rejected_levels"].to_pylist(), dtype=np.uint8),
        )

    def index(self, kind: IndexKind) -> LevelIndex:
        return LevelIndex(self.levels, kind)


def select_items(pairs: pa.Table, pool: Pool, index: LevelIndex, config: PersonaConfig) -> list[np.ndarray]:
    """Pool rows of each pair's persona, in sampled order: UGC items for a pool of responses,
    PAIR items for a pool of pairs."""
    is_pairs = pool.rejected_levels is not None
    need = min_equal_dims(config.threshold, pool.levels.shape[1])
    chosen = np.array(pairs["chosen_levels"].to_pylist(), dtype=np.uint8)
    rejected = np.array(pairs["rejected_levels"].to_pylist(), dtype=np.uint8)
    equal, rows = index.search(chosen, config.candidates)
    # When the index holds more than `candidates` rows, the tie at the last score may be cut
    # anywhere, and each index orders ties its own way: only scores above it are kept.
    cut = equal[:, -1:] if len(index) > config.candidates else np.full((len(rows), 1), -1)
    out = []
    for i, (pair_id, thread_id, direction) in enumerate(
        zip(pairs["pair_id"].to_pylist(), pairs["thread_id"].to_pylist(), pairs["direction"].to_pylist())
    ):
        keep = (rows[i] >= 0) & (equal[i] >= need) & (equal[i] > cut[i])
        keep[keep] = pool.thread_ids[rows[i][keep]] != thread_id
        cand, score = rows[i][keep], equal[i][keep]
        if is_pairs:
            cand = cand[(pool.rejected_levels[cand] == rejected[i]).sum(axis=1) >= need]
        else:  # the most similar response of each thread; ties to the smaller row
            order = np.lexsort((cand, -score))
            _, first = np.unique(pool.thread_ids[cand[order]], return_index=True)
            cand = cand[order][first]
        cand = np.sort(cand)  # sampling must not depend on FAISS's order among ties
        cand = cand[consistent(pool.directions[cand], np.asarray(direction))]
        rng = seeded_rng("pair" if is_pairs else "ugc", config.seed, pair_id)
        out.append(cand[rng.permutation(len(cand))[: config.items]])
    return out


def persona_rows(
    pairs: pa.Table, responses: Pool, pair_pool: Pool, indexes: tuple[LevelIndex, LevelIndex], config: PersonaConfig
) -> pa.Table:
    """P_UGC and P_PAIR of every pair in `pairs`; an empty persona has a null voted direction."""
    ugc_rows = select_items(pairs, responses, indexes[0], config)
    pair_rows = select_items(pairs, pair_pool, indexes[1], config)
    out = []
    for pair_id, ugc, fb in zip(pairs["pair_id"].to_pylist(), ugc_rows, pair_rows):
        r, p = responses.table.take(ugc), pair_pool.table.take(fb)
        ugc_dirs, pair_dirs = responses.directions[ugc], pair_pool.directions[fb]
        out.append(
            {
                "pair_id": pair_id,
                "ugc": [
                    {"response_id": i, "prompt": x, "comment": y, "direction": d.tolist()}
                    for i, x, y, d in zip(
                        r["response_id"].to_pylist(), r["post"].to_pylist(), r["response"].to_pylist(), ugc_dirs
                    )
                ],
                "pair_feedback": [
                    {"pair_id": i, "prompt": x, "chosen": w, "rejected": lo, "direction": d.tolist()}
                    for i, x, w, lo, d in zip(
                        p["pair_id"].to_pylist(),
                        p["prompt"].to_pylist(),
                        p["chosen"].to_pylist(),
                        p["rejected"].to_pylist(),
                        pair_dirs,
                    )
                ],
                "ugc_direction": vote(ugc_dirs).tolist() if len(ugc) else None,
                "pair_direction": vote(pair_dirs).tolist() if len(fb) else None,
            }
        )
    return pa.Table.from_pylist(out, PERSONAS_SCHEMA)


class PersonaUDF:
    """Ray Data actor holding both pools and their FAISS indexes, built once per actor."""

    def __init__(self, responses_ref: list, pairs_ref: list, config: PersonaConfig):
        self.config = config
        self.responses = Pool.of_responses(ray.get(responses_ref[0]))
        self.pairs = Pool.of_pairs(ray.get(pairs_ref[0]))
        self.indexes = (self.responses.index(config.index), self.pairs.index(config.index))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return persona_rows(batch, self.responses, self.pairs, self.indexes, self.config)


def run_personas(config: PersonaConfig, annotate_dir: Path, pairs_dir: Path, out_dir: Path) -> dict:
    """P_UGC and P_PAIR for every pair; resumable by `pair_id`."""
    started = time.time()
    responses = ray.put(labelled_responses(annotate_dir))
    pairs = ray.put(pq.read_table(pairs_dir / "data"))
    map_resumable(
        pairs_dir / "data",
        out_dir / "data",
        "pair_id",
        PersonaUDF,
        dict(responses_ref=[responses], pairs_ref=[pairs], config=config),
        config.pool,
    )
    table = pq.read_table(out_dir / "data", columns=["ugc", "pair_feedback"])
    ugc, fb = pc.list_value_length(table["ugc"]), pc.list_value_length(table["pair_feedback"])
    return {
        "pairs": table.num_rows,
        "seconds": round(time.time() - started, 2),
        "ugc_items_mean": round(pc.mean(ugc).as_py() or 0, 2),
        "pair_items_mean": round(pc.mean(fb).as_py() or 0, 2),
        "without_ugc": pc.sum(pc.equal(ugc, 0)).as_py() or 0,
        "without_pair": pc.sum(pc.equal(fb, 0)).as_py() or 0,
    }
