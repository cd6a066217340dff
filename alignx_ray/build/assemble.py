"""Assembly of AlignX examples: consistency filter, the AlignX_test split, the official schema.

Input: one joined row per pair (pair columns, its personas, its P_DEMO). Output: examples in
`schema.ALIGNX_SCHEMA`. AlignX_test (paper Appendix C.1) is drawn first (`test_draw.py`,
balanced over dimension x direction); its personas keep `test_items` sampled items. Every
thread with a test example is left out of train, so no post of the test split is trained
on. Universal-value pairs (`universal.py`: PKU-SafeRLHF, UltraFeedback, HelpSteer2), when the
run has them, go to train only. A train pair whose personas agree with it on no dimension is
rejected (the paper's consistency filter).

Ray layer: the stages' tables joined by pair_id (Ray Data hash joins), the test draw
(`test_draw.py`: the driver draws from a bounded table), then every example assembled in
parallel and written by split.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from alignx_ray.build.test_draw import DrawConfig, draw_test_split, persona_agreement
from alignx_ray.common import schema
from alignx_ray.common.raydata import footer_columns, shuffle_partitions, write_parquet, write_rejected
from alignx_ray.common.schema import list_matrix
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import byte_directions, direction_bytes


class AssembleConfig(DrawConfig):
    """The dataset's splits: the AlignX_test draw's settings, whose `test_items` and `seed`
    also cut each test persona to its sampled items."""


def official_persona(
    lists: pa.ChunkedArray, item_type: pa.StructType, pair_ids: pa.ChunkedArray, items: int | None, seed: int
) -> pa.ListArray:
    """A joined persona column in the official item type (a missing persona is an empty list);
    with `items`, each keeps that many, sampled by a stream seeded by its pair id and kind."""
    lists = lists.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(lists)
    if items is not None:  # test examples only: a bounded number of rows
        kind = "ugc" if item_type == schema.UGC_ITEM else "pair"
        starts = np.cumsum(lengths) - lengths
        picks = [
            start + np.sort(seeded_rng(kind, "test", seed, pair_id).permutation(n)[:items])
            for start, n, pair_id in zip(starts, lengths, pair_ids.to_pylist())
        ]
        lengths = np.array([len(p) for p in picks], np.int64)
        flat = flat.take(pa.array(np.concatenate([np.zeros(0, np.int64), *picks])))
    fields = [flat.field(f.name if f.name != schema.DIRECTION else "direction") for f in item_type]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(fields, fields=list(item_type)))


def official_examples(joined: pa.Table, split: str, items: int | None, seed: int) -> pa.Table:
    """Joined pairs -> AlignX rows (ALIGNX_SCHEMA) of `split`, column by column."""
    n = joined.num_rows
    return pa.table(
        {
            schema.PROMPT: joined["prompt"],
            schema.CHOSEN: joined["chosen"],
            schema.REJECTED: joined["rejected"],
            schema.DIRECTION: joined["direction"],
            schema.DEMOGRAPHIC: joined["demo_text"],
            schema.UGC: official_persona(joined["ugc"], schema.UGC_ITEM, joined["pair_id"], items, seed),
            schema.PAIR: official_persona(joined["pair_feedback"], schema.PAIR_ITEM, joined["pair_id"], items, seed),
            "example_id": joined["pair_id"],
            "split": pa.array([split] * n, pa.string()),
        },
        schema=schema.ALIGNX_SCHEMA,
    )


def assemble_examples(
    batch: pa.Table, test: dict[str, tuple[int, float]], test_threads: set[str], config: AssembleConfig
) -> pa.Table:
    """Joined pairs -> STAGING_SCHEMA: the test examples (personas cut to `test_items`), the
    train examples, then the rejected pairs with their reason (`reject`): a pair of a thread
    held out for AlignX_test, or one whose personas are inconsistent with it."""
    in_test = pc.is_in(batch["pair_id"], pa.array(list(test), pa.string())).to_numpy(zero_copy_only=False)
    held = pc.is_in(batch["thread_id"], pa.array(list(test_threads), pa.string())).to_numpy(zero_copy_only=False)
    held &= ~in_test
    inconsistent = ~persona_agreement(batch).any(axis=1) & ~in_test & ~held
    train = ~(in_test | held | inconsistent)
    rejected = batch.filter(pa.array(held | inconsistent)).select(["pair_id", "thread_id"])
    reasons = np.where(held, "thread_held_out_for_test", "personas_inconsistent_with_pair")[held | inconsistent]
    parts = [
        official_examples(batch.filter(pa.array(in_test)), "test", config.test_items, config.seed),
        official_examples(batch.filter(pa.array(train)), "train", None, config.seed),
        pa.table(
            {
                "example_id": rejected["pair_id"],
                "thread_id": rejected["thread_id"],
                "reject": pa.array(reasons, pa.string()),
            }
        ),
    ]
    return pa.concat_tables([conform(part, STAGING_SCHEMA) for part in parts])


# Assembled rows before the split: the examples, and the rejected pairs with their reason.
STAGING_SCHEMA = schema.ALIGNX_SCHEMA.append(pa.field("reject", pa.string())).append(pa.field("thread_id", pa.string()))


# A persona item with its text, as assembly joins it: a response (UGC) or a pair (PAIR).
UGC_TEXT_ITEM = pa.struct(
    [
        ("response_id", pa.string()),
        ("prompt", pa.string()),
        ("comment", pa.string()),
        ("direction", schema.DIRECTION_TYPE),
    ]
)
PAIR_TEXT_ITEM = pa.struct(
    [
        ("pair_id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("direction", schema.DIRECTION_TYPE),
    ]
)
# The text of anything a persona item can name, by id: a response or a pair.
TEXT_SCHEMA = pa.schema([(name, pa.string()) for name in ("item_id", "prompt", "comment", "chosen", "rejected")])
# Everything assembly gathers about a pair, one row per piece, grouped by pair_id (a co-group:
# one shuffle joins them all). `kind` says which piece a row is.
UGC, PAIR_ITEM, PAIR, VOTES, DEMO = range(5)
PIECES_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("kind", pa.int8()),
        ("position", pa.int32()),  # an item's place in its persona
        ("item_id", pa.string()),
        ("thread_id", pa.string()),
        ("prompt", pa.string()),
        ("comment", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("direction", schema.DIRECTION_TYPE),
        ("direction_code", pa.binary()),  # an item's direction, one byte per dimension (2 x value)
        ("source", pa.string()),
        ("ugc_direction", schema.DIRECTION_TYPE),
        ("pair_direction", schema.DIRECTION_TYPE),
        ("demo_text", pa.string()),
        ("demo_direction", schema.DIRECTION_TYPE),
    ]
)
# One row per pair, as the draw and the examples read it.
JOINED_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("thread_id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("direction", schema.DIRECTION_TYPE),
        ("source", pa.string()),
        ("ugc", pa.list_(UGC_TEXT_ITEM)),
        ("pair_feedback", pa.list_(PAIR_TEXT_ITEM)),
        ("ugc_direction", schema.DIRECTION_TYPE),
        ("pair_direction", schema.DIRECTION_TYPE),
        ("demo_text", pa.string()),
        ("demo_direction", schema.DIRECTION_TYPE),
        ("ugc_items", pa.int32()),  # the personas' sizes, so the test draw reads no list column
        ("pair_items", pa.int32()),
    ]
)
PERSONA_KINDS = {"ugc": UGC, "pair_feedback": PAIR_ITEM}
PAIRS_PER_BUCKET = 1024  # pairs gathered per call of the co-group's UDF


def conform(table: pa.Table, target: pa.Schema, **constants) -> pa.Table:
    """`table` in `target`'s columns: its own where it has them, `constants` next, else null."""
    columns = {}
    for f in target:
        if f.name in table.column_names:
            columns[f.name] = table[f.name]
        elif f.name in constants:
            columns[f.name] = pa.array([constants[f.name]] * table.num_rows, f.type)
        else:
            columns[f.name] = pa.nulls(table.num_rows, f.type)
    return pa.table(columns, schema=target)


def pack_directions(directions: pa.Array) -> pa.Array:
    """Directions (0, 0.5 or 1 per dimension) as one byte each: an item crosses the shuffles in
    D bytes instead of 8D."""
    n = len(directions)
    codes = direction_bytes(list_matrix(directions, np.float64))
    offsets = np.arange(n + 1, dtype=np.int32) * codes.shape[1]
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(codes.tobytes())])


def unpack_directions(codes: pa.Array, n_dims: int) -> pa.Array:
    """The inverse of `pack_directions`, read from the codes' buffer at once."""
    codes = codes.cast(pa.binary())
    offsets = np.frombuffer(codes.buffers()[1], np.int32)[codes.offset : codes.offset + len(codes) + 1]
    data = np.frombuffer(codes.buffers()[2], np.uint8) if len(codes) else np.zeros(0, np.uint8)
    values = byte_directions(data[offsets[0] : offsets[-1]])
    return pa.FixedSizeListArray.from_arrays(values, n_dims).cast(schema.DIRECTION_TYPE)


def id_buckets(ids: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """A bucket in [0, buckets) per id, the same in every process (Python's string hash is
    salted per process): a tabulation hash of the id's bytes, over the string buffer at once."""
    ids = (ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids).cast(pa.string())
    offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset : ids.offset + len(ids) + 1].astype(np.int64)
    lengths = np.diff(offsets)
    if not len(ids):
        return np.zeros(0, np.int32)
    if not lengths.all():
        raise ValueError("ids must be non-empty strings")
    data = np.frombuffer(ids.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    position = np.arange(len(data)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    table = np.random.default_rng(0).integers(0, 2**63, size=(int(lengths.max()), 256), dtype=np.uint64)
    mixed = np.add.reduceat(table[position, data], offsets[:-1] - offsets[0])
    return (mixed % np.uint64(buckets)).astype(np.int32)


def flat_items(personas: pa.Table, column: str) -> pa.Table:
    """One row per item of `column` (`ugc` or `pair_feedback`): its pair, kind, position, id
    and direction (coded)."""
    items = personas[column].combine_chunks()
    lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(items)
    starts = np.cumsum(lengths) - lengths
    return pa.table(
        {
            "pair_id": pc.take(personas["pair_id"], pa.array(np.repeat(np.arange(len(lengths)), lengths))),
            "kind": pa.array(np.full(len(flat), PERSONA_KINDS[column], np.int8)),
            "position": pa.array((np.arange(len(flat)) - np.repeat(starts, lengths)).astype(np.int32)),
            "item_id": flat.field(0),
            "direction_code": pack_directions(flat.field("direction")),
        }
    )


def persona_items(personas: pa.Table) -> pa.Table:
    """Both personas' items of a batch of personas, one row each."""
    return pa.concat_tables([flat_items(personas, column) for column in PERSONA_KINDS])


def joined_rows(pieces: pa.Table) -> pa.Table:
    """The pieces of some pairs (all pieces of each) -> one JOINED_SCHEMA row per pair that has
    both its pair row and its personas (as an inner join would give), items in persona order.
    Column by column: the pieces are ordered by pair, kind and position (sorting the key columns
    only, then taking each kind's rows with just the columns it needs, so the text is copied
    once), so each persona's items are contiguous and in the order of the pair rows."""
    order = pc.sort_indices(
        pieces.select(["pair_id", "kind", "position"]),
        sort_keys=[("pair_id", "ascending"), ("kind", "ascending"), ("position", "ascending")],
    )
    kinds = pieces["kind"].take(order).to_numpy()
    sorted_ids = pieces["pair_id"].take(order)

    def of_kind(kind: int, columns: list[str], among: pa.Array | None = None) -> pa.Table:
        """The rows of one kind, in order; with `among`, only those of these pairs."""
        keep = kinds == kind
        if among is not None:
            keep &= pc.is_in(sorted_ids, among).to_numpy(zero_copy_only=False)
        return pieces.select(columns).take(order.filter(pa.array(keep)))

    votes = of_kind(VOTES, ["pair_id", "ugc_direction", "pair_direction"])
    pair_columns = ["pair_id", "thread_id", "prompt", "chosen", "rejected", "direction", "source"]
    pairs = of_kind(PAIR, pair_columns, among=votes["pair_id"].combine_chunks())
    if pairs.num_rows == 0:
        return JOINED_SCHEMA.empty_table()
    ids = pairs["pair_id"].combine_chunks()
    n_dims = len(pairs["direction"][0])

    def value(part: pa.Table, name: str) -> pa.ChunkedArray | pa.Array:
        return part[name].take(pc.index_in(ids, part["pair_id"]))  # null where the pair has none

    lists, sizes = {}, {}
    for column, kind in PERSONA_KINDS.items():
        item_type = UGC_TEXT_ITEM if kind == UGC else PAIR_TEXT_ITEM
        names = ["item_id", "prompt", "comment"] if kind == UGC else ["item_id", "prompt", "chosen", "rejected"]
        part = of_kind(kind, ["pair_id", *names, "direction_code"], among=ids)
        owner = pc.index_in(part["pair_id"], ids).to_numpy(zero_copy_only=False)
        sizes[column] = np.bincount(owner, minlength=len(ids)).astype(np.int32)
        fields = [part[n].combine_chunks() for n in names]
        fields.append(unpack_directions(part["direction_code"].combine_chunks(), n_dims))
        offsets = pa.array(np.concatenate([[0], np.cumsum(sizes[column])]).astype(np.int32))
        lists[column] = pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(fields, fields=list(item_type)))
    demo = of_kind(DEMO, ["pair_id", "demo_text", "demo_direction"])
    return pa.table(
        {
            **{name: pairs[name] for name in pair_columns},
            **lists,
            "ugc_direction": value(votes, "ugc_direction"),
            "pair_direction": value(votes, "pair_direction"),
            "demo_text": value(demo, "demo_text"),
            "demo_direction": value(demo, "demo_direction"),
            "ugc_items": sizes["ugc"],
            "pair_items": sizes["pair_feedback"],
        },
        schema=JOINED_SCHEMA,
    )


def with_bucket(pieces: pa.Table, buckets: int) -> pa.Table:
    return pieces.append_column("bucket", pa.array(id_buckets(pieces["pair_id"], buckets)))


def item_text_bytes(pair_folders: list[Path], persona_folders: list[Path], annotate_data: Path) -> int:
    """About how many bytes of text the persona items carry once joined to their texts, which
    the personas' files (ids only) do not show: items x the mean text of their source rows,
    from the footers. A co-group sized without it put 5.5M items in 3 partitions at 1M
    responses (a 7 GiB reducer)."""
    _, persona_columns = footer_columns(*persona_folders)

    def items(column: str, id_field: str) -> int:
        return sum(
            values
            for path, (values, _) in persona_columns.items()
            if path.split(".")[0] == column and path.split(".")[-1] == id_field
        )

    def mean_text(folders: list[Path], columns: list[str]) -> float:
        rows, stats = footer_columns(*folders)
        return sum(stats.get(c, (0, 0))[1] for c in columns) / max(rows, 1)

    return int(
        items("ugc", schema.PERSONA_UGC_ITEM[0].name) * mean_text([annotate_data], ["post", "response"])
        + items("pair_feedback", schema.PERSONA_PAIR_ITEM[0].name)
        * mean_text(pair_folders, ["prompt", "chosen", "rejected"])
    )


def joined(
    pairs_dir: Path,
    personas_dir: Path,
    demographics_dir: Path | None,
    annotate_dir: Path,
    universal_dir: Path | None = None,
):
    """A Ray Dataset of one row per pair (JOINED_SCHEMA): its pair columns, its personas with
    their items' text, and (when built) P_DEMO.

    Personas name their items by id; here, once, every item gets its text by one Ray Data hash
    join against the texts of all responses and pairs. Then the items, the pairs, the personas'
    votes and P_DEMO are gathered by pair_id in one groupby. Two shuffles, sized by the data;
    no table passes through the driver. The universal pairs and personas, when given, are read
    beside the forum ones (same schemas)."""
    pair_folders, persona_folders = [pairs_dir / "data"], [personas_dir / "data"]
    if universal_dir is not None:
        pair_folders.append(universal_dir / "pairs")
        persona_folders.append(universal_dir / "personas")
    pairs = ray.data.read_parquet([str(f.resolve()) for f in pair_folders])
    personas = ray.data.read_parquet([str(f.resolve()) for f in persona_folders])
    responses = ray.data.read_parquet(str((annotate_dir / "data").resolve()))
    partitions = shuffle_partitions(
        *pair_folders,
        *persona_folders,
        annotate_dir / "data",
        size=item_text_bytes(pair_folders, persona_folders, annotate_dir / "data"),
    )
    texts = (
        responses.select_columns(["response_id", "post", "response"])
        .rename_columns({"response_id": "item_id", "post": "prompt", "response": "comment"})
        .map_batches(conform, fn_args=(TEXT_SCHEMA,), batch_format="pyarrow")
        .union(
            pairs.select_columns(["pair_id", "prompt", "chosen", "rejected"])
            .rename_columns({"pair_id": "item_id"})
            .map_batches(conform, fn_args=(TEXT_SCHEMA,), batch_format="pyarrow")
        )
    )
    items = personas.select_columns(list(PERSONA_KINDS) + ["pair_id"]).map_batches(
        persona_items, batch_format="pyarrow"
    )
    pieces = [
        items.join(texts, "inner", partitions, on=("item_id",)),
        pairs.select_columns(["pair_id", "thread_id", "prompt", "chosen", "rejected", "direction", "source"]),
        personas.select_columns(["pair_id", "ugc_direction", "pair_direction"]),
    ]
    kinds = [None, PAIR, VOTES]
    if demographics_dir is not None:
        demo = ray.data.read_parquet(str((demographics_dir / "data").resolve()))
        pieces.append(demo.select_columns(["pair_id", "demo_text", "demo_direction"]))
        kinds.append(DEMO)
    conformed = [
        ds.map_batches(
            conform, fn_args=(PIECES_SCHEMA,), fn_kwargs={} if kind is None else {"kind": kind}, batch_format="pyarrow"
        )
        for ds, kind in zip(pieces, kinds)
    ]
    # Pairs are gathered a bucket of about PAIRS_PER_BUCKET at a time: one call per pair would
    # spend more on the call than on the pair.
    n_pairs = footer_columns(*pair_folders)[0]
    buckets = max(partitions, -(-n_pairs // PAIRS_PER_BUCKET))
    return (
        conformed[0]
        .union(*conformed[1:])
        .map_batches(with_bucket, fn_args=(buckets,), batch_format="pyarrow")
        .groupby("bucket", num_partitions=partitions)
        .map_groups(joined_rows, batch_format="pyarrow")
    )


def run_assemble(
    config: AssembleConfig,
    annotate_dir: Path,
    pairs_dir: Path,
    personas_dir: Path,
    demographics_dir: Path | None,
    out_dir: Path,
    universal_dir: Path | None = None,
) -> dict:
    """The AlignX train and test splits (parquet in the official schema) and their rejects;
    with `universal_dir` (the universal stage's folder), its pairs join train.

    The joined pairs are written once, then read twice: for the test draw's candidates (at
    most `candidates_per_cell` per cell, kept by a Ray Data groupby, so the driver draws from
    a bounded table), and to assemble every example in parallel, written by split."""
    started = time.time()
    staging = out_dir / "_staging"
    for folder in (staging, out_dir / "train", out_dir / "test"):  # no partial output of a killed run
        shutil.rmtree(folder, ignore_errors=True)
    write_parquet(joined(pairs_dir, personas_dir, demographics_dir, annotate_dir, universal_dir), staging / "joined")
    rows = ray.data.read_parquet(str((staging / "joined").resolve()))
    test, test_threads = draw_test_split(rows, config, _direction_length(pairs_dir))
    examples = rows.map_batches(assemble_examples, fn_args=(test, test_threads, config), batch_format="pyarrow")
    write_parquet(examples, staging / "examples")
    assembled = ray.data.read_parquet(str((staging / "examples").resolve()))
    for split in ("train", "test"):
        write_parquet(assembled.map_batches(_of_split, fn_args=(split,), batch_format="pyarrow"), out_dir / split)
        if not any((out_dir / split).glob("*.parquet")):  # an empty split is still a table
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(schema.ALIGNX_SCHEMA.empty_table(), out_dir / split / "part-0.parquet")
    split_counts = (
        assembled.select_columns(["split"]).groupby("split", num_partitions=shuffle_partitions()).count().take_all()
    )
    counts = {row["split"]: row["count()"] for row in split_counts}
    bad = pq.read_table(
        staging / "examples", columns=["example_id", "reject", "thread_id"], filters=pc.field("reject").is_valid()
    )
    write_rejected(
        out_dir,
        "assemble",
        pa.table(
            {
                "reason": bad["reject"],
                "detail": bad["example_id"],
                "thread_id": bad["thread_id"],
            }
        ),
    )
    shutil.rmtree(staging)
    pq.write_table(
        pa.table(
            {
                "example_id": pa.array(list(test), pa.string()),
                "dimension": pa.array([d for d, _ in test.values()], pa.int64()),
                "direction": pa.array([v for _, v in test.values()], pa.float64()),
            }
        ),
        out_dir / "test_cells.parquet",
    )
    return {
        "pairs_in": sum(counts.values()),
        "train": counts.get("train", 0),
        "test": counts.get("test", 0),
        "rejected": bad.num_rows,
        "rejected_by_reason": dict(Counter(bad["reject"].to_pylist())),
        "test_dimensions": len({d for d, _ in test.values()}),
        "seconds": round(time.time() - started, 2),
    }


def _direction_length(pairs_dir: Path) -> int:
    """D, from the first pair's direction (0 when there are no pairs)."""
    for path in sorted((pairs_dir / "data").glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1, columns=["direction"]):
            return len(batch.column(0)[0])
    return 0


def _of_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.and_(pc.is_null(batch["reject"]), pc.equal(batch["split"], split))).select(
        schema.ALIGNX_SCHEMA.names
    )
