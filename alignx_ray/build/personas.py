"""Behavioural personas (paper §4.2, Algorithm 1 lines 12–25): P_UGC and P_PAIR.

For a pair (x, y_w, y_l) with direction P:
- P_UGC items are responses y' of other threads (x' != x) with cosine(y', y_w) > t, at most
  one per thread (its most similar response, Algorithm 1 line 15). An item's own direction
  is its level against the median (§4.2).
- P_PAIR items are pairs (x', y'_w, y'_l) of other threads with cosine(y'_w, y_w) > t and
  cosine(y'_l, y_l) > t; an item's direction is that pair's direction.
- Candidates come from an exact FAISS search over all annotated responses (or all pairs'
  chosen responses), the `candidates` nearest first; H items are sampled, seeded by the pair
  id, among those that satisfy the consistency criterion (`consistent`). A pool too large
  for one actor is searched shard by shard, with the same result (`Candidates`).
- The persona's overall direction is the majority vote of its items (`vote`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.aggregate import Count, Mean, Sum

from alignx_ray.build.persona_pool import PAIR_COLUMNS, Pool, PoolKind, shard_pools
from alignx_ray.common.config import PoolConfig, Section
from alignx_ray.common.raydata import map_resumable
from alignx_ray.common.schema import PERSONAS_SCHEMA, REJECT_COLUMN, list_matrix, only_labelled
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import NEUTRAL, byte_directions
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
    shard_rows: the most rows of a pool one actor holds: the larger pool, of N rows, is split
        into S = ceil(N / shard_rows) shards, and so is the other, each shard a range of ids;
        the pairs pass through one actor stage per shard, with the same personas for any S.
        An actor holds 7.8M responses per GiB (`Pool`); with a pair per 5.5 responses, as in
        `benchmarks/build_scale.py`, the default holds about 0.9 GiB.
    """

    threshold: float = 0.6
    items: int = 16
    candidates: int = 512
    index: IndexKind = "fastscan"
    seed: int = 0
    shard_rows: int = 5_000_000
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


@dataclass(frozen=True)
class Candidates:
    """Each query's candidate items among the pool rows searched so far (one shard, or several
    merged), with what selection needs, so that it runs without the pool. Flat arrays, ordered
    by query.

    Exact over shards: each shard reports its own top k scores (k = `candidates`), and the top k
    of the whole pool are the top k of their union, so the cut (the k-th score, when the pool
    holds more than k rows) is found from `top` alone; every row scoring above it is in its
    shard's top k. Scores at or below the cut of the rows searched so far are at or below the
    final one, so such candidates are dropped as shards merge (a shard's own and every merge's
    are `above_cut`), and fewer than k remain. The per-thread best response is taken after the
    last merge, on what is above the cut: a score threshold keeps or drops a thread's best
    response with the thread, so the order commutes."""

    searched: np.ndarray  # (Q,) int64: pool rows searched
    top: np.ndarray  # (Q, k) int32: their k highest scores, highest first, -1 where fewer rows
    query: np.ndarray  # (n,) int64: the query of each candidate, ascending
    rows: np.ndarray  # (n,) int64: the candidate's row in the whole pool (row order = id order)
    ids: pa.Array  # (n,) string
    threads: np.ndarray  # (n,) int32 thread codes
    scores: np.ndarray  # (n,) int32: dimensions of equal level with the query
    directions: np.ndarray  # (n, D) uint8 `direction_bytes`

    def above_cut(self) -> Candidates:
        """The candidates scoring above their query's cut (all when at most k rows were searched)."""
        cut = np.where(self.searched > self.top.shape[1], self.top[:, -1], -1)
        keep = self.scores > cut[self.query]
        return Candidates(
            self.searched,
            self.top,
            self.query[keep],
            self.rows[keep],
            self.ids.filter(pa.array(keep)),
            self.threads[keep],
            self.scores[keep],
            self.directions[keep],
        )

    def columns(self, kind: PoolKind) -> dict[str, pa.Array]:
        """As Arrow columns, one row per query, for the next shard's stage."""
        q, k = self.top.shape
        offsets = np.searchsorted(self.query, np.arange(q + 1)).astype(np.int32)
        items = pa.StructArray.from_arrays(
            [
                pa.array(self.rows),
                self.ids,
                pa.array(self.threads),
                pa.array(self.scores),
                pa.FixedSizeListArray.from_arrays(self.directions.ravel(), self.directions.shape[1]),
            ],
            names=["row", "id", "thread", "score", "direction"],
        )
        return {
            f"{kind}_searched": pa.array(self.searched),
            f"{kind}_top": pa.FixedSizeListArray.from_arrays(self.top.ravel(), k),
            f"{kind}_candidates": pa.ListArray.from_arrays(pa.array(offsets), items),
        }

    @classmethod
    def of_columns(cls, batch: pa.Table, kind: PoolKind) -> Candidates:
        listed = batch[f"{kind}_candidates"].combine_chunks()
        rows, ids, threads, scores, directions = pc.list_flatten(listed).flatten()
        return cls(
            batch[f"{kind}_searched"].to_numpy(),
            list_matrix(batch[f"{kind}_top"], np.int32),
            pc.list_parent_indices(listed).to_numpy().astype(np.int64),
            rows.to_numpy(),
            ids,
            threads.to_numpy(),
            scores.to_numpy(),
            list_matrix(directions, np.uint8),
        )


def shard_candidates(pairs: pa.Table, pool: Pool, index: LevelIndex, config: PersonaConfig) -> Candidates:
    """Each pair's candidates in one shard: of its top `candidates` rows by equal dimensions,
    those above the shard's cut with score >= need from another thread, and for a pool of pairs
    with as many equal dimensions of the rejected responses."""
    k, n_dims = config.candidates, pool.levels.shape[1]
    need = min_equal_dims(config.threshold, n_dims)
    equal, rows = index.search(list_matrix(pairs["chosen_levels"], np.uint8).reshape(-1, n_dims), k)
    top = np.pad(equal, ((0, 0), (0, k - equal.shape[1])), constant_values=-1)
    searched = np.full(len(top), len(pool), np.int64)
    query, rank = np.nonzero((rows >= 0) & (equal >= need))
    rows, scores = rows[query, rank], equal[query, rank]
    keep = pool.threads[rows] != pool.thread_codes(pairs["thread_id"].combine_chunks())[query]
    if pool.kind == "pair":
        rejected = list_matrix(pairs["rejected_levels"], np.uint8).reshape(-1, n_dims)
        keep[keep] = (pool.rejected_levels[rows[keep]] == rejected[query[keep]]).sum(axis=1) >= need
    query, rows, scores = query[keep], rows[keep], scores[keep]
    found = Candidates(
        searched,
        top,
        query,
        rows + pool.first_row,
        pool.ids.take(rows),
        pool.threads[rows],
        scores,
        pool.direction_bytes(rows),
    )
    return found.above_cut()


def merge_candidates(earlier: Candidates, shard: Candidates) -> Candidates:
    """The candidates of the rows searched so far and of one more shard's, for the same queries."""
    k = earlier.top.shape[1]
    top = -np.sort(-np.concatenate([earlier.top, shard.top], axis=1), axis=1)[:, :k]
    query = np.concatenate([earlier.query, shard.query])
    order = np.argsort(query, kind="stable")
    merged = Candidates(
        earlier.searched + shard.searched,
        top,
        query[order],
        np.concatenate([earlier.rows, shard.rows])[order],
        pa.concat_arrays([earlier.ids, shard.ids]).take(order),
        np.concatenate([earlier.threads, shard.threads])[order],
        np.concatenate([earlier.scores, shard.scores])[order],
        np.concatenate([earlier.directions, shard.directions])[order],
    )
    return merged.above_cut()


def select_from_candidates(
    pairs: pa.Table, found: Candidates, kind: PoolKind, config: PersonaConfig
) -> list[np.ndarray]:
    """Each pair's items, as positions in `found`, in sampled order: for UGC the most similar
    response of each thread (ties to the smaller row), then the consistent ones in row order
    (so that sampling does not depend on FAISS's order among ties), H of them drawn seeded by
    the pair id. The loop is per query, over its candidates only."""
    directions = list_matrix(pairs["direction"], np.float64)
    bounds = np.searchsorted(found.query, np.arange(pairs.num_rows + 1))
    out = []
    for i, pair_id in enumerate(pairs["pair_id"].to_pylist()):
        cand = np.arange(bounds[i], bounds[i + 1])
        if kind == "ugc":
            order = cand[np.lexsort((found.rows[cand], -found.scores[cand]))]
            _, first = np.unique(found.threads[order], return_index=True)
            cand = order[first]
        cand = cand[np.argsort(found.rows[cand])]
        cand = cand[consistent(byte_directions(found.directions[cand]), directions[i])]
        rng = seeded_rng(kind, config.seed, pair_id)
        out.append(cand[rng.permutation(len(cand))[: config.items]])
    return out


def item_lists(
    ids: pa.Array, directions: np.ndarray, lengths: list[int], id_name: str, item_type: pa.DataType
) -> pa.Array:
    """Lists of {id, direction} items, built column-wise: the first lengths[0] of the (n,)
    ids and (n, D) directions for the first row, and so on."""
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    vectors = pa.FixedSizeListArray.from_arrays(directions.ravel(), directions.shape[1]).cast(pa.list_(pa.float64()))
    structs = pa.StructArray.from_arrays([ids, vectors], names=[id_name, "direction"])
    return pa.ListArray.from_arrays(pa.array(offsets), structs).cast(item_type)


def persona_column(found: Candidates, items: list[np.ndarray], id_name: str, item_type: pa.DataType) -> pa.Array:
    """Each pair's items as a list of {id, direction}."""
    chosen = np.concatenate(items) if items else np.zeros(0, np.int64)
    directions = byte_directions(found.directions[chosen])
    return item_lists(found.ids.take(chosen), directions, [len(x) for x in items], id_name, item_type)


def voted_column(found: Candidates, items: list[np.ndarray]) -> pa.Array:
    """Each persona's voted direction; null for an empty persona."""
    votes = [vote(byte_directions(found.directions[x])).tolist() if len(x) else None for x in items]
    return pa.array(votes, pa.list_(pa.float64()))


def persona_stage(
    batch: pa.Table,
    pools: tuple[Pool, Pool],
    indexes: tuple[LevelIndex, LevelIndex],
    config: PersonaConfig,
    carried: bool,
    last: bool,
) -> pa.Table:
    """One shard's step for a batch of pairs: its candidates from both pools (responses, pairs),
    merged into those the batch carries from earlier shards when `carried`; after the last
    shard, P_UGC and P_PAIR of every pair (item ids and directions; an empty persona has a null
    voted direction), else the pairs with the candidates so far."""
    found = {pool.kind: shard_candidates(batch, pool, index, config) for pool, index in zip(pools, indexes)}
    if carried:
        found = {kind: merge_candidates(Candidates.of_columns(batch, kind), shard) for kind, shard in found.items()}
    if not last:
        carry = {name: column for kind, shard in found.items() for name, column in shard.columns(kind).items()}
        return pa.table({**{name: batch[name] for name in PAIR_COLUMNS}, **carry})
    ugc = select_from_candidates(batch, found["ugc"], "ugc", config)
    feedback = select_from_candidates(batch, found["pair"], "pair", config)
    columns = {
        "pair_id": batch["pair_id"].combine_chunks(),
        "ugc": persona_column(found["ugc"], ugc, "response_id", PERSONAS_SCHEMA.field("ugc").type),
        "pair_feedback": persona_column(
            found["pair"], feedback, "pair_id", PERSONAS_SCHEMA.field("pair_feedback").type
        ),
        "ugc_direction": voted_column(found["ugc"], ugc),
        "pair_direction": voted_column(found["pair"], feedback),
    }
    return pa.table(columns, schema=PERSONAS_SCHEMA)


def persona_rows(
    pairs: pa.Table, responses: Pool, pair_pool: Pool, indexes: tuple[LevelIndex, LevelIndex], config: PersonaConfig
) -> pa.Table:
    """P_UGC and P_PAIR of every pair in `pairs` from whole pools: one shard's stage."""
    return persona_stage(pairs, (responses, pair_pool), indexes, config, carried=False, last=True)


@ray.remote(num_returns="streaming")
def compact_shards(annotate_dir: Path, pairs_dir: Path, shard_rows: int) -> Iterator[tuple[Pool, Pool]]:
    """Both pools, built in a task (not the driver) from the id, thread and level columns
    only, and put in the object store once, shard by shard: every actor of a shard's stage on a
    node maps the same arrays."""
    responses = only_labelled(
        pq.read_table(annotate_dir / "data", columns=["response_id", "thread_id", "levels", REJECT_COLUMN])
    )
    pairs = pq.read_table(pairs_dir / "data", columns=PAIR_COLUMNS)
    for shard in shard_pools(Pool.of_responses(responses), Pool.of_pairs(pairs), shard_rows):  # noqa: UP028
        yield shard  # not `yield from`: Ray resumes the generator with send()


class PersonaUDF:
    """Ray Data actor holding one shard of both pools and their FAISS indexes, built once per
    actor (`persona_stage`)."""

    def __init__(self, shard_ref: list, config: PersonaConfig, carried: bool, last: bool):
        self.config, self.carried, self.last = config, carried, last
        self.pools = ray.get(shard_ref[0])
        self.indexes = tuple(pool.index(config.index) for pool in self.pools)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return persona_stage(batch, self.pools, self.indexes, self.config, self.carried, self.last)


def run_personas(config: PersonaConfig, annotate_dir: Path, pairs_dir: Path, out_dir: Path) -> dict:
    """P_UGC and P_PAIR for every pair; resumable by `pair_id`. The pairs pass through one
    actor stage per shard of the pools, each adding its shard's candidates; the last selects."""
    started = time.time()
    shards = list(compact_shards.remote(annotate_dir.resolve(), pairs_dir.resolve(), config.shard_rows))
    stages = [
        (PersonaUDF, dict(shard_ref=[shard], config=config, carried=s > 0, last=s == len(shards) - 1))
        for s, shard in enumerate(shards)
    ]
    faults = map_resumable(
        pairs_dir / "data",
        out_dir / "data",
        "pair_id",
        *stages[0],
        config.pool,
        columns=PAIR_COLUMNS,
        then=stages[1:],
    )
    sizes = (
        ray.data.read_parquet(str((out_dir / "data").resolve()))
        .select_columns(["ugc", "pair_feedback"])
        .map_batches(_persona_sizes, batch_format="pyarrow")
        .aggregate(
            Count(alias_name="pairs"),
            Mean("ugc", alias_name="ugc_items_mean"),
            Mean("pair", alias_name="pair_items_mean"),
            Sum("without_ugc", alias_name="without_ugc"),
            Sum("without_pair", alias_name="without_pair"),
        )
    )
    return {
        "pairs": sizes["pairs"],
        "seconds": round(time.time() - started, 2),
        "ugc_items_mean": round(sizes["ugc_items_mean"] or 0, 2),
        "pair_items_mean": round(sizes["pair_items_mean"] or 0, 2),
        "without_ugc": sizes["without_ugc"] or 0,
        "without_pair": sizes["without_pair"] or 0,
        **faults,
    }


def _persona_sizes(batch: pa.Table) -> pa.Table:
    ugc, pair = pc.list_value_length(batch["ugc"]), pc.list_value_length(batch["pair_feedback"])
    return pa.table(
        {
            "ugc": ugc,
            "pair": pair,
            "without_ugc": pc.cast(pc.equal(ugc, 0), pa.int64()),
            "without_pair": pc.cast(pc.equal(pair, 0), pa.int64()),
        }
    )
