"""Every table's schema: the stages' tables, and the AlignX dataset as released (HF
`JinaLeejnl/AlignX`) with its reader.

Our dataset is written in exactly this schema plus `example_id` and `split`, and the
released parquet reads into the same table, so training and evaluation take either.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignx_ray.common.space import OFFICIAL_D

PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
DIRECTION = "Preference Direction"
DEMOGRAPHIC = "Demographic Information"
UGC = "User-Generated Content"
PAIR = "Pair-wise Comparative Feedback"

DIRECTION_TYPE = pa.list_(pa.float64())
UGC_ITEM = pa.struct([("prompt", pa.string()), ("comment", pa.string()), (DIRECTION, DIRECTION_TYPE)])
PAIR_ITEM = pa.struct(
    [("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()), (DIRECTION, DIRECTION_TYPE)]
)
OFFICIAL_SCHEMA = pa.schema(
    [
        (PROMPT, pa.string()),
        (CHOSEN, pa.string()),
        (REJECTED, pa.string()),
        (DIRECTION, DIRECTION_TYPE),
        (DEMOGRAPHIC, pa.string()),
        (UGC, pa.list_(UGC_ITEM)),
        (PAIR, pa.list_(PAIR_ITEM)),
    ]
)
ALIGNX_SCHEMA = OFFICIAL_SCHEMA.append(pa.field("example_id", pa.string())).append(pa.field("split", pa.string()))


# The stages' tables, in run order (each stage also writes `_rejected/<stage>.parquet`).
RESPONSES_SCHEMA = pa.schema(
    [
        ("thread_id", pa.string()),
        ("response_id", pa.string()),
        ("post", pa.string()),
        ("response", pa.string()),
        ("source", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("location", pa.string()),
        ("thread_id", pa.string()),
        ("response_id", pa.string()),
        ("raw", pa.string()),
    ]
)
# The annotate stage's table: the responses, their levels and option probabilities, and the
# reason a response has no levels (null when labelled). The dataset build reads these columns.
REJECT_COLUMN = "reject_reason"
LABELLED_COLUMNS = ["thread_id", "response_id", "post", "response", "source", "levels", REJECT_COLUMN]


def only_labelled(table: pa.Table) -> pa.Table:
    """The responses of `table` that have levels (rejected ones are already in annotate/_rejected)."""
    return table.filter(pc.is_null(table[REJECT_COLUMN])).drop_columns([REJECT_COLUMN])


PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("thread_id", pa.string()),
        ("prompt", pa.string()),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_levels", pa.list_(pa.uint8())),
        ("rejected_levels", pa.list_(pa.uint8())),
        ("direction", pa.list_(pa.float64())),
        ("source", pa.string()),
    ]
)
# Persona items name their source by id (no text; assembly joins it) with its direction.
PERSONA_UGC_ITEM = pa.struct([("response_id", pa.string()), ("direction", pa.list_(pa.float64()))])
PERSONA_PAIR_ITEM = pa.struct([("pair_id", pa.string()), ("direction", pa.list_(pa.float64()))])
PERSONAS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("ugc", pa.list_(PERSONA_UGC_ITEM)),
        ("pair_feedback", pa.list_(PERSONA_PAIR_ITEM)),
        ("ugc_direction", pa.list_(pa.float64())),
        ("pair_direction", pa.list_(pa.float64())),
    ]
)
DEMOGRAPHICS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("demo_text", pa.string()),
        ("demo_direction", pa.list_(pa.float64())),
        ("demo_raw", pa.string()),
        ("demo_attempts", pa.int32()),
        ("reject_reason", pa.string()),
    ]
)
# One row per (example, persona, history, reversal) scored by the evaluation.
VARIANTS_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("example_id", pa.string()),
        ("persona", pa.string()),
        ("history", pa.int64()),
        ("reversed", pa.bool_()),
        ("profile_source", pa.string()),
        ("profile", pa.string()),
        ("prompt_text", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
    ]
)


def list_matrix(column: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    """A list column of equal-length rows as an (N, D) array, without a Python row loop; a
    fixed-size list column keeps its D when empty."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else -1 if len(column) else 0
    return flat.astype(dtype, copy=False).reshape(len(column), width)


def to_official(table: pa.Table, n_dims: int = OFFICIAL_D, first_row: int = 0) -> pa.Table:
    """Cast a table to the AlignX schema, checking every direction has `n_dims` entries.

    Reads the released parquet (no `example_id` / `split`: ids are made from row numbers,
    `first_row` being the number of the table's first row, so a file read in pieces gets the
    ids it gets read whole) as well as ours. Raises ValueError naming the first bad row.
    """
    missing = [f.name for f in OFFICIAL_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"not an AlignX table: missing columns {missing}")
    if "example_id" not in table.column_names:
        ids = [f"alignx-{i}" for i in range(first_row, first_row + table.num_rows)]
        table = table.append_column("example_id", pa.array(ids, pa.string()))
    if "split" not in table.column_names:
        table = table.append_column("split", pa.array(["train"] * table.num_rows))
    table = table.select(ALIGNX_SCHEMA.names).cast(ALIGNX_SCHEMA)
    for i, row in enumerate(table.select([DIRECTION, UGC, PAIR]).to_pylist()):
        vectors = [row[DIRECTION]] + [item[DIRECTION] for item in row[UGC] + row[PAIR]]
        if any(v is None or len(v) != n_dims for v in vectors):
            raise ValueError(f"row {first_row + i}: every {DIRECTION!r} must have {n_dims} values")
    return table
