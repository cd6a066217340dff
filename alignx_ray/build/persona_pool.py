"""What personas are drawn from (paper §4.2): every annotated response (for P_UGC) or pair
(for P_PAIR), in compact codes and without text, whole or in shards of contiguous rows, so that
a pool too large for one actor is searched shard by shard (`personas.Candidates`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignx_ray.common.schema import list_matrix
from alignx_ray.common.space import direction_bytes, level_direction_bytes
from alignx_ray.engines.retrieval import IndexKind, LevelIndex

PoolKind = Literal["ugc", "pair"]  # a pool of responses (for P_UGC) or of pairs (for P_PAIR)
PAIR_COLUMNS = ["pair_id", "thread_id", "chosen_levels", "rejected_levels", "direction"]  # what personas read


@dataclass(frozen=True)
class Pool:
    """What personas are drawn from, in compact codes: responses (for UGC) or pairs (for PAIR),
    sorted by id, or one shard of them (a contiguous range of those rows). No text: an item is
    named by its id, and assembly joins its text once.

    Per response, a pool holds its id, a thread code and D uint8 levels, and the FAISS
    fast-scan index D/2 4-bit codes: at D = 90 and ids of 15 characters, 115 + 23 = 138 bytes,
    7.8M responses per GiB. Per pair, its id, a thread code, D uint8 levels of each response
    and its direction in D bytes: 323 + 23 = 346 bytes, 3.1M pairs per GiB."""

    ids: pa.Array  # (N,) string
    threads: np.ndarray  # (N,) int32: the row's thread code, the same in every shard of a pool
    thread_names: pa.Array  # the distinct thread ids of these rows
    thread_name_codes: np.ndarray  # (T,) int32: each one's code, ascending
    levels: np.ndarray  # (N, D) uint8: response levels, or the pairs' chosen levels
    pair_direction_bytes: np.ndarray | None = None  # (N, D) uint8 (`direction_bytes`), pairs only
    rejected_levels: np.ndarray | None = None  # (N, D) uint8, pairs only
    first_row: int = 0  # the row of the first id among all the pool's rows (row order = id order)

    @classmethod
    def of_responses(cls, responses: pa.Table) -> Pool:
        table = responses.select(["response_id", "thread_id", "levels"]).sort_by("response_id")
        return cls(table["response_id"].combine_chunks(), *thread_coding(table), list_matrix(table["levels"], np.uint8))

    @classmethod
    def of_pairs(cls, pairs: pa.Table) -> Pool:
        table = pairs.select(PAIR_COLUMNS).sort_by("pair_id")
        return cls(
            table["pair_id"].combine_chunks(),
            *thread_coding(table),
            list_matrix(table["chosen_levels"], np.uint8),
            direction_bytes(list_matrix(table["direction"], np.float32)),
            list_matrix(table["rejected_levels"], np.uint8),
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def kind(self) -> PoolKind:
        return "pair" if self.rejected_levels is not None else "ugc"

    def direction_bytes(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) `direction_bytes` of the given rows: a pair's own, a response's level against
        the median."""
        if self.kind == "pair":
            return self.pair_direction_bytes[rows]
        return level_direction_bytes(self.levels[rows])

    def thread_codes(self, thread_ids: pa.Array) -> np.ndarray:
        """Each thread id's code (-1 for a thread none of these rows belongs to)."""
        found = pc.fill_null(pc.index_in(thread_ids, value_set=self.thread_names), -1).to_numpy()
        return np.where(found >= 0, self.thread_name_codes[found], -1).astype(np.int32)

    def index(self, kind: IndexKind) -> LevelIndex:
        return LevelIndex(self.levels, kind)

    def shards(self, count: int) -> list[Pool]:
        """The pool in `count` contiguous ranges of rows of near-equal size."""
        bounds = np.arange(count + 1) * len(self) // count
        return [self.rows_between(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]

    def rows_between(self, start: int, stop: int) -> Pool:
        held = np.unique(self.threads[start:stop])
        names_at = np.searchsorted(self.thread_name_codes, held)
        return Pool(
            pa.concat_arrays([self.ids.slice(start, stop - start)]),  # a copy: a slice pickles all buffers
            self.threads[start:stop],
            self.thread_names.take(names_at),
            held.astype(np.int32),
            self.levels[start:stop],
            None if self.pair_direction_bytes is None else self.pair_direction_bytes[start:stop],
            None if self.rejected_levels is None else self.rejected_levels[start:stop],
            self.first_row + int(start),
        )


def thread_coding(table: pa.Table) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """(each row's thread code, the distinct thread ids, their codes) of a table's `thread_id`."""
    threads = table["thread_id"].combine_chunks().dictionary_encode()
    names = threads.dictionary
    return threads.indices.to_numpy().astype(np.int32), names, np.arange(len(names), dtype=np.int32)


def shard_pools(responses: Pool, pairs: Pool, shard_rows: int) -> list[tuple[Pool, Pool]]:
    """Both pools in S = ceil(rows of the larger / shard_rows) shards, shard s of each together."""
    count = max(1, -(-max(len(responses), len(pairs)) // shard_rows))
    return list(zip(responses.shards(count), pairs.shards(count)))
