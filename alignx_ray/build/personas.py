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
from ray.data.aggregate import Count, Mean, Sum

from alignx_ray.common.config import PoolConfig, Section
from alignx_ray.common.raydata import map_resumable
from alignx_ray.common.schema import PERSONAS_SCHEMA, REJECT_COLUMN, list_matrix, only_labelled
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


@dataclass(frozen=True)
class Pool:
    """What personas are drawn from, in compact codes: responses (for UGC) or pairs (for PAIR),
    sorted by id. No text: an item is named by its id, and assembly joins its text once.

    Per response, a pool holds its id, a thread code and D uint8 levels (the FAISS fast-scan
    index adds D/2 bytes): about 4M responses per GiB at D = 90."""

    ids: pa.Array  # (N,) string
    threads: np.ndarray  # (N,) int32: index of the row's thread in `thread_names`
    thread_names: pa.Array  # distinct thread ids
    levels: np.ndarray  # (N, D) uint8: response levels, or the pairs' chosen levels
    pair_directions: np.ndarray | None = None  # (N, D) float32, pairs only
    rejected_levels: np.ndarray | None = None  # (N, D) uint8, pairs only

    @classmethod
    def of_responses(cls, responses: pa.Table) -> Pool:
        table = responses.select(["response_id", "thread_id", "levels"]).sort_by("response_id")
        threads = table["thread_id"].combine_chunks().dictionary_encode()
        return cls(
            table["response_id"].combine_chunks(),
            threads.indices.to_numpy().astype(np.int32),
            threads.dictionary,
            list_matrix(table["levels"], np.uint8),
        )

    @classmethod
    def of_pairs(cls, pairs: pa.Table) -> Pool:
        table = pairs.select(["pair_id", "thread_id", "chosen_levels", "rejected_levels", "direction"])
        table = table.sort_by("pair_id")
        threads = table["thread_id"].combine_chunks().dictionary_encode()
        return cls(
            table["pair_id"].combine_chunks(),
            threads.indices.to_numpy().astype(np.int32),
            threads.dictionary,
            list_matrix(table["chosen_levels"], np.uint8),
            list_matrix(table["direction"], np.float32),
            list_matrix(table["rejected_levels"], np.uint8),
        )

    @property
    def is_pairs(self) -> bool:
        return self.rejected_levels is not None

    def directions(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) float64 directions of the given rows: a pair's own, a response's level against
        the median."""
        if self.is_pairs:
            return self.pair_directions[rows].astype(np.float64)
        return level_to_direction(self.levels[rows])

    def thread_codes(self, thread_ids: pa.Array) -> np.ndarray:
        """Each thread id's code in this pool (-1 for a thread the pool does not hold)."""
        codes = pc.index_in(thread_ids, value_set=self.thread_names)
        return pc.fill_null(codes, -1).to_numpy().astype(np.int32)

    def index(self, kind: IndexKind) -> LevelIndex:
        return LevelIndex(self.levels, kind)


def select_items(pairs: pa.Table, pool: Pool, index: LevelIndex, config: PersonaConfig) -> list[np.ndarray]:
    """Pool rows of each pair's persona, in sampled order: UGC items for a pool of responses,
    PAIR items for a pool of pairs. The loop is per query (each pair's seeded draw), over its
    `candidates` neighbours only."""
    need = min_equal_dims(config.threshold, pool.levels.shape[1])
    chosen = list_matrix(pairs["chosen_levels"], np.uint8)
    rejected = list_matrix(pairs["rejected_levels"], np.uint8)
    directions = list_matrix(pairs["direction"], np.float64)
    own_threads = pool.thread_codes(pairs["thread_id"].combine_chunks())
    equal, rows = index.search(chosen, config.candidates)
    # When the index holds more than `candidates` rows, the tie at the last score may be cut
    # anywhere, and each index orders ties its own way: only scores above it are kept.
    cut = equal[:, -1:] if len(index) > config.candidates else np.full((len(rows), 1), -1)
    out = []
    for i, pair_id in enumerate(pairs["pair_id"].to_pylist()):
        keep = (rows[i] >= 0) & (equal[i] >= need) & (equal[i] > cut[i])
        keep[keep] = pool.threads[rows[i][keep]] != own_threads[i]
        cand, score = rows[i][keep], equal[i][keep]
        if pool.is_pairs:
            cand = cand[(pool.rejected_levels[cand] == rejected[i]).sum(axis=1) >= need]
        else:  # the most similar response of each thread; ties to the smaller row
            order = np.lexsort((cand, -score))
            _, first = np.unique(pool.threads[cand[order]], return_index=True)
            cand = cand[order][first]
        cand = np.sort(cand)  # sampling must not depend on FAISS's order among ties
        cand = cand[consistent(pool.directions(cand), directions[i])]
        rng = seeded_rng("pair" if pool.is_pairs else "ugc", config.seed, pair_id)
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


def persona_column(pool: Pool, items: list[np.ndarray], id_name: str, item_type: pa.DataType) -> pa.Array:
    """Each pair's items as a list of {id, direction}."""
    rows = np.concatenate(items) if items else np.zeros(0, np.int64)
    return item_lists(pool.ids.take(rows), pool.directions(rows), [len(x) for x in items], id_name, item_type)


def voted_column(pool: Pool, items: list[np.ndarray]) -> pa.Array:
    """Each persona's voted direction; null for an empty persona."""
    return pa.array([vote(pool.directions(x)).tolist() if len(x) else None for x in items], pa.list_(pa.float64()))


def persona_rows(
    pairs: pa.Table, responses: Pool, pair_pool: Pool, indexes: tuple[LevelIndex, LevelIndex], config: PersonaConfig
) -> pa.Table:
    """P_UGC and P_PAIR of every pair in `pairs` (item ids and directions); an empty persona
    has a null voted direction."""
    ugc = select_items(pairs, responses, indexes[0], config)
    feedback = select_items(pairs, pair_pool, indexes[1], config)
    columns = {
        "pair_id": pairs["pair_id"].combine_chunks(),
        "ugc": persona_column(responses, ugc, "response_id", PERSONAS_SCHEMA.field("ugc").type),
        "pair_feedback": persona_column(pair_pool, feedback, "pair_id", PERSONAS_SCHEMA.field("pair_feedback").type),
        "ugc_direction": voted_column(responses, ugc),
        "pair_direction": voted_column(pair_pool, feedback),
    }
    return pa.table(columns, schema=PERSONAS_SCHEMA)


@ray.remote
def compact_pools(annotate_dir: Path, pairs_dir: Path) -> tuple[Pool, Pool]:
    """Both pools, built in a task (not the driver) from the id, thread and level columns
    only, and put in the object store once: every actor on a node maps the same arrays."""
    responses = only_labelled(
        pq.read_table(annotate_dir / "data", columns=["response_id", "thread_id", "levels", REJECT_COLUMN])
    )
    pairs = pq.read_table(
        pairs_dir / "data", columns=["pair_id", "thread_id", "chosen_levels", "rejected_levels", "direction"]
    )
    return Pool.of_responses(responses), Pool.of_pairs(pairs)


class PersonaUDF:
    """Ray Data actor holding both pools' FAISS indexes, built once per actor."""

    def __init__(self, pools_ref: list, config: PersonaConfig):
        self.config = config
        self.responses, self.pairs = ray.get(pools_ref[0])
        self.indexes = (self.responses.index(config.index), self.pairs.index(config.index))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return persona_rows(batch, self.responses, self.pairs, self.indexes, self.config)


def run_personas(config: PersonaConfig, annotate_dir: Path, pairs_dir: Path, out_dir: Path) -> dict:
    """P_UGC and P_PAIR for every pair; resumable by `pair_id`."""
    started = time.time()
    pools = compact_pools.remote(annotate_dir.resolve(), pairs_dir.resolve())
    faults = map_resumable(
        pairs_dir / "data",
        out_dir / "data",
        "pair_id",
        PersonaUDF,
        dict(pools_ref=[pools], config=config),
        config.pool,
        columns=["pair_id", "thread_id", "chosen_levels", "rejected_levels", "direction"],
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
