"""The AlignX dataset schema, as released (HF `JinaLeejnl/AlignX`), and its reader.

Our dataset is written in exactly this schema plus `example_id` and `split`, and the
released parquet reads into the same table, so training and evaluation take either.
"""

from __future__ import annotations

import pyarrow as pa

from alignx_ray.space import OFFICIAL_D

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


def to_official(table: pa.Table, n_dims: int = OFFICIAL_D) -> pa.Table:
    """Cast a table to the AlignX schema, checking every direction has `n_dims` entries.

    Reads the released parquet (no `example_id` / `split`: ids are made from row numbers)
    as well as ours. Raises ValueError naming the first bad row.
    """
    missing = [f.name for f in OFFICIAL_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"not an AlignX table: missing columns {missing}")
    if "example_id" not in table.column_names:
        table = table.append_column("example_id", pa.array([f"alignx-{i}" for i in range(table.num_rows)]))
    if "split" not in table.column_names:
        table = table.append_column("split", pa.array(["train"] * table.num_rows))
    table = table.select(ALIGNX_SCHEMA.names).cast(ALIGNX_SCHEMA)
    for i, row in enumerate(table.select([DIRECTION, UGC, PAIR]).to_pylist()):
        vectors = [row[DIRECTION]] + [item[DIRECTION] for item in row[UGC] + row[PAIR]]
        if any(v is None or len(v) != n_dims for v in vectors):
            raise ValueError(f"row {i}: every {DIRECTION!r} must have {n_dims} values")
    return table
