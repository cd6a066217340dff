"""Dataset statistics of Appendix A.1.1 / E: how diverse the preference directions are.

The paper backs its claim of a diverse, largely independent 90-dimension space with four
figures, all computed from the examples' `Preference Direction` column:

* Figure 4, the Pearson correlation between the dimensions, and "99.65% of dimension pairs
  have correlations below 0.5" (A.1.1);
* "1,210,986 different preference directions in ALIGNX, accounting for 92.33% of the total
  data" (E.1);
* the distribution of positive / neutral / negative labels per dimension;
* Table 13, "the data count for different combinations of 'Gender' and 'Succorance' at
  varying intensities" (E.2), a check for societal bias.

`dataset_statistics` computes them over a NumPy matrix, `split_statistics` over a split's
files on Ray Data. `split_sources` adds Table 1: examples per source (forum or a universal-value
dataset, known from the example id) and, per dimension a universal source rates, how many of
them have a direction on it. `stats_report` draws the figures and writes the report's sections.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignx_ray.build.public_pairs import FORUM, SOURCES, source_dimensions, sources_of
from alignx_ray.common.raydata import shuffle_partitions
from alignx_ray.common.schema import DIRECTION
from alignx_ray.common.space import NEGATIVE, NEUTRAL, POSITIVE, SPACE, PreferenceSpace

CORRELATION_THRESHOLD = 0.5
GENDER_NAME = "Gender"
SUCCORANCE_PREFIX = "Need for Succorance"
LABELS = {"positive": POSITIVE, "neutral": NEUTRAL, "negative": NEGATIVE}
TABLE13_DIRECTIONS = {"negative": NEGATIVE, "positive": POSITIVE}  # Table 13 has no neutral row/column
CODE_DIGITS = 39  # base-3 digits of a direction packed in one int64 (3**39 < 2**63)


def dataset_statistics(directions: np.ndarray, space: PreferenceSpace = SPACE) -> dict:
    """The Appendix A.1.1 / E statistics of an (N, D) matrix of direction vectors.

    Returns a dict whose values are all JSON-serialisable except `correlation`, the D x D
    Pearson matrix as a NumPy array (kept out of JSON: D x D numbers belong in a figure):

    * `correlation`: r between dimensions i and j. A dimension that never changes has no
      defined correlation (zero variance), so its whole row and column, diagonal included,
      are NaN rather than a made-up 0 or 1.
    * `n_examples`, `n_dimensions`.
    * `correlation_threshold`: 0.5; `pairs_total`: unordered pairs i < j; `pairs_undefined`:
      those involving a constant dimension.
    * `share_pairs_below_threshold`: share of the defined pairs with r < 0.5. Signed r, as the
      paper words it ("have correlations below 0.5"), so a strongly negative pair counts as
      below. None when no pair is defined.
    * `strongest_pair`: {"dimensions": [i, j], "r": r} with the largest r (the paper names
      Abasement / Aggression at 0.86), or None.
    * `distinct_directions` and `distinct_share` (of `n_examples`): different vectors.
    * `label_counts`: {"positive" | "neutral" | "negative": [count per dimension]}.
    * `gender_succorance`: Table 13, see `gender_succorance_table`; None when the space has no
      Gender or Need for Succorance dimension.
    """
    directions = _checked_directions(directions, space)
    distinct = int(np.unique(_codes(directions), axis=0).shape[0])
    return statistics_from_partial(partial_statistics(directions, space), distinct, space)


def partial_statistics(directions: np.ndarray, space: PreferenceSpace = SPACE) -> dict[str, np.ndarray]:
    """The additive parts of the statistics of a block of (N, D) direction vectors: n, the
    per-dimension sums, the D x D Gram matrix, the label counts per dimension and Table 13's
    counts. Blocks combine by adding them (`add_partials`), so the statistics of any number of
    rows are computed block by block, in parallel, in memory that does not grow with N."""
    gender = _find_dimension(space, lambda name: name == GENDER_NAME)
    succorance = _find_dimension(space, lambda name: name.startswith(SUCCORANCE_PREFIX))
    table13 = np.zeros((len(TABLE13_DIRECTIONS), len(TABLE13_DIRECTIONS)), np.int64)
    if gender is not None and succorance is not None:
        poles = np.array(list(TABLE13_DIRECTIONS.values()))
        rows, columns = directions[:, gender, None] == poles, directions[:, succorance, None] == poles
        table13 = (rows[:, :, None] & columns[:, None, :]).sum(axis=0).astype(np.int64)
    return {
        "n": np.array(directions.shape[0], np.int64),
        "sums": directions.sum(axis=0),
        "gram": directions.T @ directions,
        "labels": np.stack([(directions == value).sum(axis=0) for value in LABELS.values()]).astype(np.int64),
        "table13": table13,
    }


def add_partials(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: a[key] + b[key] for key in a}


def statistics_from_partial(partial: dict[str, np.ndarray], distinct: int, space: PreferenceSpace = SPACE) -> dict:
    """`dataset_statistics` from the combined partial statistics and the distinct-vector count."""
    n_examples = int(partial["n"])
    correlation = pearson_from_sums(n_examples, partial["sums"], partial["gram"])
    pairs = correlation[np.triu_indices(len(space), k=1)]
    defined = pairs[~np.isnan(pairs)]
    return {
        "correlation": correlation,
        "n_examples": n_examples,
        "n_dimensions": len(space),
        "correlation_threshold": CORRELATION_THRESHOLD,
        "pairs_total": int(pairs.size),
        "pairs_undefined": int(pairs.size - defined.size),
        "share_pairs_below_threshold": float(np.mean(defined < CORRELATION_THRESHOLD)) if defined.size else None,
        "strongest_pair": _strongest_pair(correlation),
        "distinct_directions": distinct,
        "distinct_share": distinct / n_examples,
        "label_counts": {label: partial["labels"][i].astype(int).tolist() for i, label in enumerate(LABELS)},
        "gender_succorance": _gender_succorance(partial["table13"], space),
    }


def pearson_correlation(directions: np.ndarray) -> np.ndarray:
    """D x D Pearson r, NaN in the rows and columns of constant dimensions."""
    return pearson_from_sums(directions.shape[0], directions.sum(axis=0), directions.T @ directions)


def pearson_from_sums(n: int, sums: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Pearson r from the count, the column sums and the Gram matrix (no centred copy of the
    data, so 1.3M x 90 needs no second matrix, and blocks add up); with values in {0, 0.5, 1}
    the sums are exact, and a constant dimension's variance comes out exactly 0."""
    scatter = gram - np.outer(sums, sums) / n
    variances = np.diag(scatter)
    varying = variances > 0
    correlation = np.full(scatter.shape, np.nan)
    # sqrt of the product, not a product of square roots: identical columns then give exactly 1.
    norms = np.sqrt(np.outer(variances[varying], variances[varying]))
    correlation[np.ix_(varying, varying)] = np.clip(scatter[np.ix_(varying, varying)] / norms, -1.0, 1.0)
    return correlation


def gender_succorance_table(directions: np.ndarray, space: PreferenceSpace = SPACE) -> dict | None:
    """Table 13: number of examples per (Gender direction, Succorance direction).

    As in the paper, rows are Gender and columns Need for Succorance, each Negative / Positive
    in the example's `Preference Direction`; examples neutral on either are not counted (the
    table has no neutral row or column). Gender positive is "Female", negative "Male".
    `counts[row][column]` reads e.g. counts["negative"]["positive"] = Male and Strong
    Succorance. The demographic text is not used: the table is over dimension directions.
    """
    return _gender_succorance(partial_statistics(directions, space)["table13"], space)


def _gender_succorance(counts: np.ndarray, space: PreferenceSpace) -> dict | None:
    gender = _find_dimension(space, lambda name: name == GENDER_NAME)
    succorance = _find_dimension(space, lambda name: name.startswith(SUCCORANCE_PREFIX))
    if gender is None or succorance is None:
        return None
    return {
        "rows": {"dimension": gender, "labels": _pole_labels(space[gender])},
        "columns": {"dimension": succorance, "labels": _pole_labels(space[succorance])},
        "counts": {
            row: {column: int(counts[r, c]) for c, column in enumerate(TABLE13_DIRECTIONS)}
            for r, row in enumerate(TABLE13_DIRECTIONS)
        },
    }


def split_statistics(split_dir: Path, space: PreferenceSpace = SPACE, batch_size: int = 16384) -> dict:
    """`dataset_statistics` of a split's parquet files, streamed: the `Preference Direction`
    column alone is read, each block's `partial_statistics` computed in parallel and added up
    as they arrive (the driver holds D x D numbers, whatever the number of rows), and the
    distinct directions counted by a Ray Data groupby on their exact base-3 codes."""
    import ray.data  # lazy: the pure statistics above need no Ray

    directions = ray.data.read_parquet(str(Path(split_dir).resolve())).select_columns([DIRECTION])
    total = _streamed_sum(
        directions, lambda batch: partial_statistics(directions_from_table(batch, space), space), batch_size
    )
    if total is None or total["n"] == 0:
        raise ValueError("no examples: the statistics are undefined")

    def code_block(batch: pa.Table) -> pa.Table:
        digits = _codes(_checked_directions(directions_from_table(batch, space), space)).astype(np.int64)
        parts = [digits[:, start : start + CODE_DIGITS] for start in range(0, digits.shape[1], CODE_DIGITS)]
        return pa.table({f"code{k}": part @ 3 ** np.arange(part.shape[1]) for k, part in enumerate(parts)})

    codes = directions.map_batches(code_block, batch_format="pyarrow", batch_size=batch_size)
    distinct = (
        codes.groupby([f"code{k}" for k in range(-(-len(space) // CODE_DIGITS))], num_partitions=shuffle_partitions())
        .count()
        .count()
    )
    return statistics_from_partial(total, distinct, space)


def _streamed_sum(ds, partial, batch_size: int):
    """The sum (`add_partials`) of `partial(batch)` over a Ray Dataset's batches: each block's
    partial computed in parallel, pickled, and added up in the driver as they arrive (one per
    block: a few, not one per row). None for an empty dataset."""

    def partial_block(batch: pa.Table) -> pa.Table:
        return pa.table({"partial": [pickle.dumps(partial(batch))]})

    total = None
    partials = ds.map_batches(partial_block, batch_format="pyarrow", batch_size=batch_size)
    for batch in partials.iter_batches(batch_format="pyarrow", batch_size=None):
        for blob in batch.column("partial").to_pylist():
            part = pickle.loads(blob)
            total = part if total is None else add_partials(total, part)
    return total


def source_counts(table: pa.Table, space: PreferenceSpace = SPACE) -> dict[str, np.ndarray]:
    """Per source of the examples (`public_pairs.sources_of` their ids): (D + 1,) int64, the
    examples with a non-neutral direction on each dimension, then the number of examples. Each
    source is a key of every result, so results add up with `add_partials`."""
    sources = sources_of(table.column("example_id")).to_numpy(zero_copy_only=False)
    decided = directions_from_table(table, space) != NEUTRAL
    return {
        source: np.append(decided[sources == source].sum(axis=0), (sources == source).sum()).astype(np.int64)
        for source in (FORUM, *SOURCES)
    }


def table1(counts: dict[str, np.ndarray], space: PreferenceSpace = SPACE) -> dict:
    """Table 1 from `source_counts`: per source with examples, {examples, non_neutral: {dimension
    name: count}} over the dimensions some universal source rates (forum examples counted on
    them too, for comparison; a universal source only on its own)."""
    rated = {source: source_dimensions(source, space) for source in SOURCES}
    shown = sorted({d for dims in rated.values() for d in dims})
    return {
        source: {
            "examples": int(row[-1]),
            "non_neutral": {space[d].name: int(row[d]) for d in rated.get(source, shown)},
        }
        for source, row in counts.items()
        if row[-1]
    }


def split_sources(split_dir: Path, space: PreferenceSpace = SPACE, batch_size: int = 16384) -> dict:
    """`table1` of a split's parquet files, streamed: the example ids and directions alone are
    read, and each block's `source_counts` added up as they arrive."""
    import ray.data  # lazy: the pure statistics above need no Ray

    ds = ray.data.read_parquet(str(Path(split_dir).resolve())).select_columns(["example_id", DIRECTION])
    counts = _streamed_sum(ds, lambda batch: source_counts(batch, space), batch_size)
    return table1(counts or {}, space)


def directions_from_table(table: pa.Table, space: PreferenceSpace = SPACE) -> np.ndarray:
    """The `Preference Direction` column as an (N, D) float matrix, without a Python list per row."""
    column = table.column(DIRECTION).combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} rows have no {DIRECTION!r}")
    lengths = pc.list_value_length(column).to_numpy()
    if np.any(lengths != len(space)):
        row = int(np.argmax(lengths != len(space)))
        raise ValueError(f"row {row}: {DIRECTION!r} has {lengths[row]} values, the space has {len(space)}")
    return column.flatten().to_numpy(zero_copy_only=False).astype(float).reshape(len(column), len(space))


def _checked_directions(directions: np.ndarray, space: PreferenceSpace) -> np.ndarray:
    directions = np.asarray(directions, dtype=float)
    if directions.ndim != 2 or directions.shape[1] != len(space):
        raise ValueError(f"need an (N, {len(space)}) matrix, got shape {directions.shape}")
    if directions.shape[0] == 0:
        raise ValueError("no examples: the statistics are undefined")
    allowed = np.isin(directions, list(LABELS.values()))
    if not allowed.all():
        row, dim = np.argwhere(~allowed)[0]
        raise ValueError(f"row {row}, dimension {dim}: {directions[row, dim]!r} is not one of {tuple(LABELS.values())}")
    return directions


def _codes(directions: np.ndarray) -> np.ndarray:
    """One byte per label (0, 1, 2), so finding distinct rows compares bytes, not floats."""
    return np.rint(directions * 2).astype(np.uint8)


def _strongest_pair(correlation: np.ndarray) -> dict | None:
    upper = correlation.copy()
    upper[np.tril_indices_from(upper)] = np.nan  # each pair once, no diagonal
    if np.all(np.isnan(upper)):
        return None
    i, j = np.unravel_index(np.nanargmax(upper), upper.shape)
    return {"dimensions": [int(i), int(j)], "r": float(upper[i, j])}


def _find_dimension(space: PreferenceSpace, matches) -> int | None:
    return next((i for i, name in enumerate(space.names) if matches(name)), None)


def _pole_labels(dimension) -> dict:
    return {"negative": dimension.negative, "positive": dimension.positive}
