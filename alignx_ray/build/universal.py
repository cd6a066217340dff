"""Universal-value examples (paper §4, Table 1): PKU-SafeRLHF, UltraFeedback and HelpSteer2
pairs, each with a P_PAIR persona, for assembly to mix into AlignX train.

Pairs come from `public_pairs.read_universal`, one Ray task per dataset (all its configured
files read in order as one input). These datasets hold no user content and nobody to describe,
so a universal pair has no P_UGC and no P_DEMO. Its P_PAIR follows the paper's UF-P-4 benchmark
(Appendix C.1: "randomly sampling 2~8 pairs from the same dimension"), made precise:

- a pair's peers are the other pairs of its source whose direction is consistent with its own
  (`personas.consistent`: opposite on no dimension, equal on at least one non-neutral one; "the
  same dimension" for pairs that may be rated on several), made from another prompt (§4.2's
  contextual independence: a pair of the same prompt is no peer);
- its item count is drawn uniformly from [min_items, max_items], seeded by the pair id, and
  that many peers are sampled (all of them when there are fewer); a pair with fewer than
  `min_items` peers is rejected (`too_few_peers`);
- every item is consistent with the pair, so P_PAIR's vote equals the pair's direction on each
  dimension an item shares, and assembly's consistency filter keeps every persona made here.

Scale: no pair is compared with every pair. A source's directions take at most 3^k values on
the k dimensions it rates (k <= 4), so its pairs are grouped by exact direction code, which
groups are consistent with which is a G x G table, and a draw picks positions in the union of
the consistent groups without materialising it (`PeerGroups.draw`). Actors hold ids, group
and thread codes: a few tens of bytes per pair.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data
from pydantic import model_validator
from ray.data.aggregate import Count, Sum

from alignx_ray.build.personas import consistent, item_lists, vote
from alignx_ray.build.public_pairs import STAGE, read_universal, source_dimensions
from alignx_ray.common.config import PoolConfig, Section, resolve_local
from alignx_ray.common.raydata import actor_pool_args, write_parquet, write_rejected
from alignx_ray.common.schema import PERSONAS_SCHEMA, list_matrix
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import NEUTRAL, PreferenceSpace


class UniversalSource(Section):
    """One file or folder of a universal-value dataset, in its public schema.

    source: the dataset (Table 1): `pku_saferlhf`, `ultrafeedback` or `helpsteer2`.
    path: parquet or JSON Lines, a file or a folder, local or a pyarrow filesystem URI.
    """

    source: Literal["pku_saferlhf", "ultrafeedback", "helpsteer2"]
    path: str


class UniversalConfig(Section):
    """The universal-value examples; no `sources`: AlignX from the forum threads alone.

    sources: the files to read; several of one dataset are read in order as one input.
    min_items / max_items: P_PAIR items per pair, drawn uniformly from this range. UF-P-4's
        2~8 is the only persona of universal-value pairs the paper gives, and these examples
        are in-distribution for that benchmark (Table 7); §4.2's H = 16 is for forum pairs,
        and training keeps 0~4 items anyway (Appendix C.2).
    seed: mixed with each pair id into that pair's random stream.
    pool: the actors drawing personas, each holding every source's peer groups.
    """

    sources: list[UniversalSource] = []
    min_items: int = 2
    max_items: int = 8
    seed: int = 0
    pool: PoolConfig = PoolConfig(batch_size=4096, concurrency=(1, 8), num_cpus=1)

    @model_validator(mode="after")
    def _items_range(self) -> UniversalConfig:
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError(f"need 1 <= min_items <= max_items, got {self.min_items} and {self.max_items}")
        return self


def direction_codes(directions: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """(N, D) directions -> (N,) int64 base-3 codes of their values on `dims`
    (digit 0: negative, 1: neutral, 2: positive)."""
    digits = np.rint(np.asarray(directions, np.float64)[:, list(dims)] * 2).astype(np.int64)
    return digits @ 3 ** np.arange(len(dims), dtype=np.int64)


def code_directions(codes: np.ndarray, dims: Sequence[int], n_dims: int) -> np.ndarray:
    """(G,) codes -> (G, D) directions, neutral off `dims` (the inverse of direction_codes)."""
    digits = (np.asarray(codes, np.int64)[:, None] // 3 ** np.arange(len(dims), dtype=np.int64)) % 3
    out = np.full((len(codes), n_dims), NEUTRAL)
    out[:, list(dims)] = digits / 2
    return out


@dataclass(frozen=True)
class PeerGroups:
    """One source's pairs grouped by exact direction: all a persona draw needs, no text.

    Rows are sorted by (direction code, pair id), so group g is rows offsets[g]:offsets[g+1]
    and a draw does not depend on the order the pairs were read in."""

    ids: pa.Array  # (N,) pair ids
    groups: np.ndarray  # (N,) int64: each row's group
    threads: np.ndarray  # (N,) int64: each row's thread (prompt) code
    offsets: np.ndarray  # (G + 1,) int64
    directions: np.ndarray  # (G, D) float64: each group's direction
    peers: np.ndarray  # (G, G) bool: peers[g, h] when group h's direction is consistent with g's
    by_thread: np.ndarray  # (N,) rows sorted by thread: thread t's are by_thread[thread_offsets[t]:...[t + 1]]
    thread_offsets: np.ndarray  # (T + 1,) int64

    @classmethod
    def of(cls, pair_ids: pa.Array, thread_ids: pa.Array, codes: np.ndarray, dims: Sequence[int], n_dims: int):
        order = pc.sort_indices(
            pa.table({"code": codes, "id": pair_ids}), sort_keys=[("code", "ascending"), ("id", "ascending")]
        )
        codes = np.asarray(codes)[order.to_numpy()]
        distinct, first, groups = np.unique(codes, return_index=True, return_inverse=True)
        directions = code_directions(distinct, dims, n_dims)
        threads = pc.take(thread_ids, order).dictionary_encode().indices.to_numpy().astype(np.int64)
        by_thread = np.argsort(threads, kind="stable")
        return cls(
            ids=pc.take(pair_ids, order),
            groups=groups.astype(np.int64),
            threads=threads,
            offsets=np.append(first, len(codes)).astype(np.int64),
            directions=directions,
            peers=np.stack([consistent(directions, d) for d in directions])
            if len(distinct)
            else np.zeros((0, 0), bool),
            by_thread=by_thread,
            thread_offsets=np.concatenate([[0], np.cumsum(np.bincount(threads))]).astype(np.int64),
        )

    def rows_of(self, pair_ids: pa.Array) -> np.ndarray:
        """Each pair id's row (ValueError for an id these groups do not hold)."""
        rows = pc.index_in(pair_ids, value_set=self.ids)
        if rows.null_count:
            raise ValueError(f"{rows.null_count} pairs are not in the peer groups they are drawn from")
        return rows.to_numpy().astype(np.int64)

    def draw(self, row: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(up to `count` peers of `row`, sampled without replacement in random order; how many
        peers it has). Positions are drawn in the concatenated consistent groups, then mapped to
        rows; the pairs of its own prompt there (itself included) are drawn past and dropped, so
        the result is a uniform sample of the others."""
        member = self.peers[self.groups[row]]
        groups = np.flatnonzero(member)
        sizes = self.offsets[groups + 1] - self.offsets[groups]
        ends = np.cumsum(sizes)
        thread = self.threads[row]
        mates = self.by_thread[self.thread_offsets[thread] : self.thread_offsets[thread + 1]]
        excluded = mates[member[self.groups[mates]]]
        total = int(ends[-1]) if len(ends) else 0
        positions = rng.choice(total, min(count + len(excluded), total), replace=False)
        which = np.searchsorted(ends, positions, side="right")
        rows = self.offsets[groups[which]] + positions - (ends[which] - sizes[which])
        return rows[~np.isin(rows, excluded)][:count], total - len(excluded)


# The personas stage's rows before they are split: a persona (PERSONAS_SCHEMA), or the reason
# a pair has none; with its source and thread for the figures and the rejected table.
STAGING_SCHEMA = (
    PERSONAS_SCHEMA.append(pa.field("source", pa.string()))
    .append(pa.field("thread_id", pa.string()))
    .append(pa.field("items", pa.int64()))
    .append(pa.field("reason", pa.string()))
    .append(pa.field("detail", pa.string()))
)


def persona_rows(pairs: pa.Table, groups: dict[str, PeerGroups], config: UniversalConfig) -> pa.Table:
    """The pure core: P_PAIR of each pair (`pair_id, thread_id, source`) in STAGING_SCHEMA,
    drawn from its source's peer groups, seeded by its id; an empty P_UGC; too few peers:
    no items, `reason` set."""
    sources = pairs["source"].to_pylist()
    rows = np.zeros(pairs.num_rows, np.int64)
    for source in set(sources):
        mask = pc.equal(pairs["source"], source)
        rows[np.flatnonzero(mask.to_numpy(zero_copy_only=False))] = groups[source].rows_of(
            pc.filter(pairs["pair_id"], mask)
        )
    ids, directions, lengths, votes, reasons, details = [], [], [], [], [], []
    for pair_id, source, row in zip(pairs["pair_id"].to_pylist(), sources, rows):
        peers = groups[source]
        rng = seeded_rng("universal", config.seed, pair_id)
        items, available = peers.draw(row, int(rng.integers(config.min_items, config.max_items + 1)), rng)
        if available < config.min_items:
            items = items[:0]
            reasons.append("too_few_peers")
            details.append(f"{pair_id}: {available} peers, min_items is {config.min_items}")
        else:
            reasons.append(None)
            details.append(None)
        item_directions = peers.directions[peers.groups[items]]
        ids.append(peers.ids.take(items))
        directions.append(item_directions)
        lengths.append(len(items))
        votes.append(vote(item_directions).tolist() if len(items) else None)
    n_dims = next(iter(groups.values())).directions.shape[1] if groups else 0
    feedback_type = PERSONAS_SCHEMA.field("pair_feedback").type
    columns = {
        "pair_id": pairs["pair_id"],
        "ugc": pa.array([[]] * pairs.num_rows, PERSONAS_SCHEMA.field("ugc").type),
        "pair_feedback": item_lists(
            pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
            np.concatenate(directions) if directions else np.zeros((0, n_dims)),
            lengths,
            "pair_id",
            feedback_type,
        ),
        "ugc_direction": pa.nulls(pairs.num_rows, pa.list_(pa.float64())),
        "pair_direction": pa.array(votes, pa.list_(pa.float64())),
        "source": pairs["source"],
        "thread_id": pairs["thread_id"],
        "items": pa.array(lengths, pa.int64()),
        "reason": pa.array(reasons, pa.string()),
        "detail": pa.array(details, pa.string()),
    }
    return pa.table(columns, schema=STAGING_SCHEMA)


@ray.remote
def read_source(source: str, paths: list[str], space: PreferenceSpace, out_dir: Path) -> dict:
    """One dataset's files -> `out_dir/pairs/<source>.parquet` and its rejected rows, in a task
    (the driver holds no table); returns its counts."""
    pairs, rejected = read_universal(paths, source, space)
    pq.write_table(pairs, out_dir / "pairs" / f"{source}.parquet")
    write_rejected(out_dir, STAGE, rejected, part=source)
    return {
        "files": len(paths),
        "pairs": pairs.num_rows,
        "rejected_rows": rejected.num_rows,
        "rejected_by_reason": dict(Counter(rejected["reason"].to_pylist())),
    }


@ray.remote
def peer_groups(pairs_dir: Path, space: PreferenceSpace) -> dict[str, PeerGroups]:
    """Every source's peer groups, built in a task from the id, thread and direction columns,
    a record batch at a time (directions are kept as one code per pair), put in the object
    store once for every actor."""
    parts: dict[str, list[tuple]] = {}
    dataset = pads.dataset(pairs_dir, format="parquet")
    for batch in dataset.to_batches(columns=["pair_id", "thread_id", "source", "direction"]):
        for source in pc.unique(batch["source"]).to_pylist():
            part = batch.filter(pc.equal(batch["source"], source))
            codes = direction_codes(list_matrix(part["direction"], np.float64), source_dimensions(source, space))
            parts.setdefault(source, []).append((part["pair_id"], part["thread_id"], codes))
    return {
        source: PeerGroups.of(
            pa.concat_arrays([p[0] for p in chunks]),
            pa.concat_arrays([p[1] for p in chunks]),
            np.concatenate([p[2] for p in chunks]),
            source_dimensions(source, space),
            len(space),
        )
        for source, chunks in parts.items()
    }


class PeerPersonaUDF:
    """Ray Data actor holding every source's peer groups, fetched once per actor."""

    def __init__(self, groups_ref: list, config: UniversalConfig):
        self.config = config
        self.groups = ray.get(groups_ref[0])

    def __call__(self, batch: pa.Table) -> pa.Table:
        return persona_rows(batch, self.groups, self.config)


def run_universal(config: UniversalConfig, space: PreferenceSpace, out_dir: Path) -> dict:
    """`out_dir/pairs/` (PAIRS_SCHEMA) and `out_dir/personas/` (PERSONAS_SCHEMA, the pairs
    that have one), the rejected rows and pairs in `out_dir/_rejected/`; counts per source.

    read tasks -> peer groups (a task) -> read_parquet(pairs) -> map_batches(actors) ->
    write_parquet, then the personas and the rejects split from that output."""
    started = time.time()
    pairs_dir, personas_dir, staging = out_dir / "pairs", out_dir / "personas", out_dir / "_staging"
    for folder in (pairs_dir, personas_dir, staging, out_dir / "_rejected"):  # never append to a killed run's
        shutil.rmtree(folder, ignore_errors=True)
    pairs_dir.mkdir(parents=True)
    paths: dict[str, list[str]] = {}
    for item in config.sources:
        paths.setdefault(item.source, []).append(resolve_local(item.path))
    tasks = [read_source.remote(source, files, space, out_dir.resolve()) for source, files in paths.items()]
    figures = dict(zip(paths, ray.get(tasks)))
    groups = peer_groups.remote(pairs_dir.resolve(), space)
    pairs = ray.data.read_parquet(str(pairs_dir.resolve())).select_columns(["pair_id", "thread_id", "source"])
    personas = pairs.map_batches(
        PeerPersonaUDF,
        fn_constructor_kwargs=dict(groups_ref=[groups], config=config),
        batch_format="pyarrow",
        **actor_pool_args(config.pool),
    )
    write_parquet(personas, staging)
    personas_dir.mkdir(parents=True)
    staged_files = sorted(staging.glob("*.parquet"))
    if staged_files:
        staged = ray.data.read_parquet(str(staging.resolve()))
        staged.map_batches(_personas_only, batch_format="pyarrow").write_parquet(str(personas_dir.resolve()))
        drawn = (
            staged.select_columns(["source", "items", "reason"])
            .groupby("source")
            .aggregate(
                Count(alias_name="drawn"),
                Count("reason", ignore_nulls=True, alias_name="too_few_peers"),
                Sum("items", alias_name="items"),
            )
            .take_all()
        )
        bad = pq.read_table(staging, columns=["reason", "detail", "thread_id"], filters=pc.field("reason").is_valid())
    else:  # no universal pair at all
        drawn, bad = [], STAGING_SCHEMA.empty_table().select(["reason", "detail", "thread_id"])
    if not any(personas_dir.glob("*.parquet")):  # no persona is still a table
        pq.write_table(PERSONAS_SCHEMA.empty_table(), personas_dir / "part-0.parquet")
    write_rejected(out_dir, STAGE, bad, part="personas")
    shutil.rmtree(staging, ignore_errors=True)
    counts = {row["source"]: row for row in drawn}
    for source, numbers in figures.items():
        row = counts.get(source, {"drawn": 0, "too_few_peers": 0, "items": 0})
        with_persona = row["drawn"] - row["too_few_peers"]
        numbers.update(
            with_persona=with_persona,
            too_few_peers=row["too_few_peers"],
            items_mean=round((row["items"] or 0) / with_persona, 2) if with_persona else None,
        )
    return {
        "sources": figures,
        "pairs": sum(f["pairs"] for f in figures.values()),
        "with_persona": sum(f["with_persona"] for f in figures.values()),
        "rejected": sum(f["rejected_rows"] + f["too_few_peers"] for f in figures.values()),
        "seconds": round(time.time() - started, 2),
    }


def _personas_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select(PERSONAS_SCHEMA.names)
