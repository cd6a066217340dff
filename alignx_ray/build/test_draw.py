"""The AlignX_test draw (paper Appendix C.1): which joined pairs become test examples.

Balanced over dimension x direction: for each dimension d, n_d examples with direction 1 and
n_d with 0 on d, where the pair and every persona show that direction on d and both
behavioural personas have at least `test_items` items, n_d = min(per_cell, eligible
positive, eligible negative). Only forum pairs are drawn: universal-value pairs lack the
personas (Appendix C.1 follows §4.2).

Pure core over Arrow: `persona_agreement` (also the assembly's consistency filter),
`cell_candidates`, `draw_test`. Ray layer, `draw_test_split`: candidates per block, each
cell's first `candidates_per_cell` in draw order kept by a groupby (enough to make the draw
exact), so the driver draws from a bounded table and reads no text.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from alignx_ray.build.public_pairs import FORUM, sources_of
from alignx_ray.common.config import Section
from alignx_ray.common.raydata import shuffle_partitions
from alignx_ray.common.schema import list_matrix
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import NEUTRAL

CELL_DIRECTIONS = (1.0, 0.0)


class DrawConfig(Section):
    """The AlignX_test draw.

    test_per_cell: AlignX_test examples per (dimension, direction) cell at most.
    test_max: no further dimension is added to AlignX_test once it holds this many examples
        (dimensions in index order; None: every dimension that has examples). A small corpus
        sets it, or the test split's held-out threads leave little to train on.
    test_items: items kept in each behavioural persona of a test example (paper: 4).
    seed: mixed with pair ids for the test draw and the item sampling.
    """

    test_per_cell: int = 4
    test_max: int | None = None
    test_items: int = 4
    seed: int = 0


# The personas' voted directions a joined pair may carry (P_DEMO only where it was built).
PERSONA_VOTES = ("ugc_direction", "pair_direction", "demo_direction")
# One row per (cell, eligible pair): what the draw orders and picks from.
CANDIDATES_SCHEMA = pa.schema(
    [
        ("dimension", pa.int64()),
        ("direction", pa.float64()),
        ("key", pa.float64()),
        ("pair_id", pa.string()),
        ("thread_id", pa.string()),
    ]
)
# Draw order: the seeded key, ties broken by pair id.
DRAW_ORDER = [("key", "ascending"), ("pair_id", "ascending")]
# What the draw reads of a joined pair: no text.
DRAW_COLUMNS = ["pair_id", "thread_id", "direction", *PERSONA_VOTES, "ugc_items", "pair_items"]


def persona_agreement(batch: pa.Table) -> np.ndarray:
    """(N, D) bool over joined pairs: where the pair's direction is not neutral and every
    persona it has votes the same. A pair is consistent where any is True (the paper's filter),
    and the True dimensions are the AlignX_test cells it can stand in."""
    direction = list_matrix(batch["direction"], np.float64)
    agree = direction != NEUTRAL
    for name in PERSONA_VOTES:
        votes = batch[name].combine_chunks()
        present = np.flatnonzero(votes.is_valid().to_numpy(zero_copy_only=False))
        if len(present):
            agree[present] &= list_matrix(votes.take(present), np.float64) == direction[present]
    return agree


def cell_candidates(batch: pa.Table, config: DrawConfig) -> pa.Table:
    """CANDIDATES_SCHEMA: (dimension, direction, draw key, pair_id, thread_id) for each cell an
    eligible pair can stand in: a forum pair with `test_items` items in both behavioural
    personas, whose pair and every persona show that direction on that dimension. Reads no
    text; the draw key (a seeded stream per pair id) is computed for eligible pairs only."""
    if batch.num_rows == 0:
        return CANDIDATES_SCHEMA.empty_table()
    agree = persona_agreement(batch)
    forum = pc.equal(sources_of(batch["pair_id"]), FORUM).to_numpy(zero_copy_only=False)
    items = np.minimum(batch["ugc_items"].to_numpy(), batch["pair_items"].to_numpy())
    agree &= (forum & (items >= config.test_items))[:, None]
    rows, dims = np.nonzero(agree)
    eligible = np.flatnonzero(agree.any(axis=1))
    keys = np.array([seeded_rng("test", config.seed, p).random() for p in batch["pair_id"].take(eligible).to_pylist()])
    direction = list_matrix(batch["direction"], np.float64)
    return pa.table(
        {
            "dimension": dims.astype(np.int64),
            "direction": direction[rows, dims],
            "key": keys[np.searchsorted(eligible, rows)],
            "pair_id": batch["pair_id"].take(rows),
            "thread_id": batch["thread_id"].take(rows),
        },
        schema=CANDIDATES_SCHEMA,
    )


def candidates_per_cell(config: DrawConfig, n_dims: int) -> int:
    """How many candidates of a cell, first in draw order, decide its draw: its own examples,
    plus every test example that earlier cells may already have taken (at most two cells of
    `test_per_cell` per dimension). Keeping only these makes the draw exact in bounded memory."""
    return config.test_per_cell * (1 + 2 * n_dims)


def draw_test(candidates: pa.Table, config: DrawConfig, n_dims: int) -> dict[str, tuple[int, float]]:
    """pair_id -> (dimension, direction) of the AlignX_test examples (see module docstring):
    per dimension in index order, the first `test_per_cell` not yet drawn of each direction,
    in draw order (the seeded key, then the pair id), as many of each as the fuller has.
    `candidates` is bounded (`candidates_per_cell` per cell), so this runs in the driver."""
    ordered = candidates.sort_by(DRAW_ORDER)
    shows: dict[tuple[int, float], list[str]] = {}
    for d, v, pair_id in zip(*(ordered[c].to_pylist() for c in ("dimension", "direction", "pair_id"))):
        shows.setdefault((d, v), []).append(pair_id)
    test: dict[str, tuple[int, float]] = {}
    for d in range(n_dims):
        if config.test_max is not None and len(test) >= config.test_max:
            break
        cells = [[p for p in shows.get((d, v), []) if p not in test] for v in CELL_DIRECTIONS]
        n = min(config.test_per_cell, *map(len, cells))
        for v, cell in zip(CELL_DIRECTIONS, cells):
            test.update({p: (d, v) for p in cell[:n]})
    return test


def select_test(batch: pa.Table, config: DrawConfig) -> dict[str, tuple[int, float]]:
    """pair_id -> (dimension, direction) of the AlignX_test examples of these joined pairs."""
    n_dims = len(batch["direction"][0]) if batch.num_rows else 0
    return draw_test(cell_candidates(batch, config), config, n_dims)


def draw_test_split(
    joined: ray.data.Dataset, config: DrawConfig, n_dims: int
) -> tuple[dict[str, tuple[int, float]], set[str]]:
    """(pair_id -> (dimension, direction) of the AlignX_test examples, their thread ids) over
    the joined pairs; the driver holds at most `candidates_per_cell` rows per cell."""
    candidates = joined.select_columns(DRAW_COLUMNS).map_batches(
        cell_candidates, fn_args=(config,), batch_format="pyarrow"
    )
    kept = candidates.groupby(["dimension", "direction"], num_partitions=shuffle_partitions()).map_groups(
        _first_in_draw_order, fn_args=(candidates_per_cell(config, n_dims),), batch_format="pyarrow"
    )
    tables = [t.cast(CANDIDATES_SCHEMA) for t in kept.iter_batches(batch_format="pyarrow", batch_size=None)]
    cells = pa.concat_tables(tables) if tables else CANDIDATES_SCHEMA.empty_table()
    test = draw_test(cells, config, n_dims)
    drawn = pc.is_in(cells["pair_id"], pa.array(list(test), pa.string()))
    return test, set(pc.filter(cells["thread_id"], drawn).to_pylist())


def _first_in_draw_order(cell: pa.Table, keep: int) -> pa.Table:
    return cell.sort_by(DRAW_ORDER).slice(0, keep)
