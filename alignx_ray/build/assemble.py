"""Assembly of AlignX examples: consistency filter, the AlignX_test split, the official schema.

Input: one joined row per pair (pair columns, its personas, its P_DEMO). Output: examples in
`schema.ALIGNX_SCHEMA`. AlignX_test (paper Appendix C.1) is drawn first, balanced over
dimension x direction: for each dimension d, n_d examples with direction 1 and n_d with 0 on
d, where the pair and every persona show that direction on d and both behavioural personas
have at least `test_items` items, n_d = min(per_cell, eligible positive, eligible negative).
Its personas keep `test_items` sampled items. Every thread with a test example is left out
of train, so no post of the test split is trained on.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alignx_ray.build.personas import example_consistent
from alignx_ray.common import schema
from alignx_ray.common.config import Section
from alignx_ray.common.raydata import write_rejected
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import NEUTRAL

CELL_DIRECTIONS = (1.0, 0.0)


class AssembleConfig(Section):
    """The dataset's splits.

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


def persona_directions(row: dict) -> list[np.ndarray]:
    """Voted directions of the personas this example has (UGC, PAIR, DEMO when present)."""
    keys = ("ugc_direction", "pair_direction", "demo_direction")
    return [np.asarray(row[k]) for k in keys if row.get(k) is not None]


def select_test(rows: list[dict], config: AssembleConfig) -> dict[str, tuple[int, float]]:
    """pair_id -> (dimension, direction) of the AlignX_test examples (see module docstring)."""
    eligible = [
        r
        for r in rows
        if len(r["ugc"]) >= config.test_items
        and len(r["pair_feedback"]) >= config.test_items
        and example_consistent(np.asarray(r["direction"]), persona_directions(r))
    ]
    order = sorted(eligible, key=lambda r: seeded_rng("test", config.seed, r["pair_id"]).random())
    n_dims = len(rows[0]["direction"]) if rows else 0
    shows = {}  # (d, v) -> pair ids showing v on d in the pair and in every persona, in draw order
    for r in order:
        agree = np.asarray(r["direction"]).copy()
        for persona in persona_directions(r):
            agree[persona != agree] = NEUTRAL
        for d in np.flatnonzero(agree != NEUTRAL):
            shows.setdefault((int(d), float(agree[d])), []).append(r["pair_id"])
    test: dict[str, tuple[int, float]] = {}
    for d in range(n_dims):
        if config.test_max is not None and len(test) >= config.test_max:
            break
        cells = [[p for p in shows.get((d, v), []) if p not in test] for v in CELL_DIRECTIONS]
        n = min(config.test_per_cell, *map(len, cells))
        for v, cell in zip(CELL_DIRECTIONS, cells):
            test.update({p: (d, v) for p in cell[:n]})
    return test


def to_example(row: dict, split: str, items: int | None, seed: int) -> dict:
    """One AlignX row; with `items`, each behavioural persona keeps that many, sampled."""

    def keep(persona: list, kind: str) -> list:
        if items is None:
            return persona
        rng = seeded_rng(kind, "test", seed, row["pair_id"])
        return [persona[i] for i in sorted(rng.permutation(len(persona))[:items])]

    return {
        schema.PROMPT: row["prompt"],
        schema.CHOSEN: row["chosen"],
        schema.REJECTED: row["rejected"],
        schema.DIRECTION: row["direction"],
        schema.DEMOGRAPHIC: row.get("demo_text"),
        schema.UGC: [
            {"prompt": u["prompt"], "comment": u["comment"], schema.DIRECTION: u["direction"]}
            for u in keep(row["ugc"], "ugc")
        ],
        schema.PAIR: [
            {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], schema.DIRECTION: p["direction"]}
            for p in keep(row["pair_feedback"], "pair")
        ],
        "example_id": row["pair_id"],
        "split": split,
    }


def assemble_rows(
    rows: list[dict], test: dict[str, tuple[int, float]], test_threads: set[str], config: AssembleConfig
) -> tuple[pa.Table, list[dict]]:
    """Joined pair rows -> (AlignX examples, rejected rows with reasons)."""
    examples, rejected = [], []
    for r in rows:
        if r["pair_id"] in test:
            examples.append(to_example(r, "test", config.test_items, config.seed))
        elif r["thread_id"] in test_threads:
            rejected.append(
                {
                    "stage": "assemble",
                    "reason": "thread_held_out_for_test",
                    "detail": r["pair_id"],
                    "thread_id": r["thread_id"],
                }
            )
        elif not example_consistent(np.asarray(r["direction"]), persona_directions(r)):
            rejected.append(
                {
                    "stage": "assemble",
                    "reason": "personas_inconsistent_with_pair",
                    "detail": r["pair_id"],
                    "thread_id": r["thread_id"],
                }
            )
        else:
            examples.append(to_example(r, "train", None, config.seed))
    return pa.Table.from_pylist(examples, schema.ALIGNX_SCHEMA), rejected


def joined_rows(pairs_dir: Path, personas_dir: Path, demographics_dir: Path | None) -> list[dict]:
    """One dict per pair, sorted by pair_id: its pair columns, personas and (when built) P_DEMO."""
    parts = [pq.read_table(personas_dir / "data")]
    if demographics_dir is not None:
        parts.append(pq.read_table(demographics_dir / "data", columns=["pair_id", "demo_text", "demo_direction"]))
    extra = [{r["pair_id"]: r for r in part.to_pylist()} for part in parts]
    return [
        {**pair, **{k: v for part in extra for k, v in part[pair["pair_id"]].items()}}
        for pair in pq.read_table(pairs_dir / "data").sort_by("pair_id").to_pylist()
    ]


def run_assemble(
    config: AssembleConfig, pairs_dir: Path, personas_dir: Path, demographics_dir: Path | None, out_dir: Path
) -> dict:
    """The AlignX train and test splits (parquet in the official schema) and their rejects."""
    started = time.time()
    rows = joined_rows(pairs_dir, personas_dir, demographics_dir)
    test = select_test(rows, config)
    test_threads = {r["thread_id"] for r in rows if r["pair_id"] in test}
    examples, rejected = assemble_rows(rows, test, test_threads, config)
    for split in ("train", "test"):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(examples.filter(pc.equal(examples["split"], split)), out_dir / split / "part-0.parquet")
    pq.write_table(
        pa.table(
            {
                "example_id": list(test),
                "dimension": [d for d, _ in test.values()],
                "direction": [v for _, v in test.values()],
            }
        ),
        out_dir / "test_cells.parquet",
    )
    write_rejected(out_dir, "assemble", rejected)
    split = examples["split"].to_pylist()
    reasons = Counter(r["reason"] for r in rejected)
    return {
        "pairs_in": len(rows),
        "train": split.count("train"),
        "test": split.count("test"),
        "rejected": len(rejected),
        "rejected_by_reason": dict(reasons),
        "test_dimensions": len({d for d, _ in test.values()}),
        "seconds": round(time.time() - started, 2),
    }
