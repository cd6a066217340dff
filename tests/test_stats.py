"""Tests for the dataset statistics: matrices whose statistics are known by construction."""

import json

import numpy as np
import pyarrow as pa
import pytest

from alignx_ray.build.stats import dataset_statistics, directions_from_table
from alignx_ray.build.stats_report import write_statistics
from alignx_ray.common.schema import DIRECTION, DIRECTION_TYPE
from alignx_ray.common.space import SPACE

pytestmark = pytest.mark.filterwarnings("error")  # constant dimensions must not divide by zero

D = len(SPACE)
GENDER, SUCCORANCE = 1, 38
GROUPS = 7  # the 7 non-constant columns of an 8 x 8 Hadamard matrix
FLIPPED = range(84, 90)  # one column of each of groups 0..5 is the negative pole pattern


def hadamard_directions() -> tuple[np.ndarray, np.ndarray]:
    """Directions whose correlations are exactly 1, -1 or 0, and the expected matrix.

    Dimension j takes Hadamard column 1 + j % 7 (0 / 1 values), complemented for j in
    FLIPPED. Hadamard columns are orthogonal and balanced, so r is 0 across groups and
    +-1 within a group. The 8 rows are stacked twice: 8 distinct vectors in 16 examples.
    """
    hadamard = np.array([[1]])
    for _ in range(3):
        hadamard = np.kron(hadamard, np.array([[1, 1], [1, -1]]))
    group = np.arange(D) % GROUPS
    sign = np.where(np.isin(np.arange(D), FLIPPED), -1, 1)
    columns = (hadamard[:, 1 + group] * sign + 1) / 2
    expected = np.where(group[:, None] == group[None, :], np.outer(sign, sign), 0).astype(float)
    return np.vstack([columns, columns]), expected


def gender_succorance_directions() -> np.ndarray:
    """All neutral except Gender / Succorance, in (gender, succorance, rows) blocks, and
    dimension 89 negative throughout."""
    blocks = [(0.0, 0.0, 1), (0.0, 1.0, 2), (1.0, 0.0, 3), (1.0, 1.0, 4), (0.5, 1.0, 5), (1.0, 0.5, 6), (0.5, 0.5, 7)]
    rows = []
    for gender, succorance, count in blocks:
        row = np.full(D, 0.5)
        row[GENDER], row[SUCCORANCE], row[89] = gender, succorance, 0.0
        rows += [row] * count
    return np.array(rows)


def test_correlation_and_share_below_half_by_construction():
    directions, expected = hadamard_directions()
    stats = dataset_statistics(directions)
    assert np.array_equal(stats["correlation"], expected)
    # Same group, same sign: 7 groups of 12 same-signed columns (groups 0..5 have a 13th,
    # flipped, column whose 12 pairs have r = -1 and so are below 0.5 as the paper words it).
    assert stats["pairs_total"] == 90 * 89 // 2 == 4005
    assert stats["pairs_undefined"] == 0
    assert stats["share_pairs_below_threshold"] == (4005 - 7 * 66) / 4005
    assert stats["strongest_pair"] == {"dimensions": [0, 7], "r": 1.0}


def test_distinct_directions_by_construction():
    directions, _ = hadamard_directions()
    stats = dataset_statistics(directions)
    assert stats["n_examples"] == 16 and stats["n_dimensions"] == 90
    assert stats["distinct_directions"] == 8
    assert stats["distinct_share"] == 0.5


def test_label_counts_by_construction():
    stats = dataset_statistics(gender_succorance_directions())
    counts = stats["label_counts"]
    assert stats["n_examples"] == 28
    assert (counts["positive"][GENDER], counts["neutral"][GENDER], counts["negative"][GENDER]) == (13, 12, 3)
    succorance = (counts["positive"][SUCCORANCE], counts["neutral"][SUCCORANCE], counts["negative"][SUCCORANCE])
    assert succorance == (11, 13, 4)
    assert (counts["positive"][89], counts["neutral"][89], counts["negative"][89]) == (0, 0, 28)
    assert counts["neutral"][0] == 28 and counts["positive"][0] == counts["negative"][0] == 0
    assert all(sum(label[d] for label in counts.values()) == 28 for d in range(D))


def test_gender_succorance_table_counts_rows_gender_columns_succorance_without_neutral():
    table = dataset_statistics(gender_succorance_directions())["gender_succorance"]
    assert table["rows"]["dimension"] == GENDER
    assert table["columns"]["dimension"] == SUCCORANCE
    assert table["rows"]["labels"] == {"negative": "Male", "positive": "Female"}
    assert table["counts"] == {"negative": {"negative": 1, "positive": 2}, "positive": {"negative": 3, "positive": 4}}


def test_constant_dimensions_have_nan_correlation_and_are_left_out_of_the_share():
    directions = gender_succorance_directions()
    stats = dataset_statistics(directions)
    correlation = stats["correlation"]
    varying = [GENDER, SUCCORANCE]
    constant = np.setdiff1d(np.arange(D), varying)
    assert np.isnan(correlation[constant, :]).all() and np.isnan(correlation[:, constant]).all()
    assert correlation[GENDER, GENDER] == correlation[SUCCORANCE, SUCCORANCE] == 1.0
    r = np.corrcoef(directions[:, GENDER], directions[:, SUCCORANCE])[0, 1]
    assert correlation[GENDER, SUCCORANCE] == pytest.approx(r, abs=1e-12)
    assert stats["pairs_undefined"] == 4005 - 1
    assert stats["share_pairs_below_threshold"] == float(r < 0.5)
    assert stats["distinct_directions"] == 7 and stats["distinct_share"] == 0.25


def test_all_constant_has_no_defined_pair():
    stats = dataset_statistics(np.full((5, D), 0.5))
    assert np.isnan(stats["correlation"]).all()
    assert stats["share_pairs_below_threshold"] is None and stats["strongest_pair"] is None
    assert stats["distinct_directions"] == 1 and stats["distinct_share"] == 0.2


@pytest.mark.parametrize(
    "directions",
    [np.full((3, D - 1), 0.5), np.full((0, D), 0.5), np.where(np.eye(3, D) > 0, 0.3, 0.5)],
    ids=["wrong-width", "empty", "not-a-label"],
)
def test_rejects_bad_input(directions):
    with pytest.raises(ValueError):
        dataset_statistics(directions)


def test_write_statistics_writes_figures_and_markdown(tmp_path):
    out_dir = tmp_path / "stats"
    stats = write_statistics(gender_succorance_directions(), out_dir, report_dir=tmp_path)
    for name in ("correlation.png", "label_distribution.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert stats["figures"] == ["correlation.png", "label_distribution.png"]
    assert "correlation" not in stats
    json.dumps(stats, allow_nan=False)
    markdown = stats["markdown"]
    assert "](stats/correlation.png)" in markdown and "](stats/label_distribution.png)" in markdown
    assert "| Negative (Male) | 1 | 2 |" in markdown
    assert "| Positive (Female) | 3 | 4 |" in markdown
    assert "7 (25.00% of examples)" in markdown


def test_write_statistics_reads_the_direction_column(tmp_path):
    directions, _ = hadamard_directions()
    table = pa.table({DIRECTION: pa.array(directions.tolist(), type=DIRECTION_TYPE)})
    assert np.array_equal(directions_from_table(table.slice(3)), directions[3:])
    from_table = write_statistics(table, tmp_path / "table")
    from_matrix = write_statistics(directions, tmp_path / "matrix")
    assert from_table == from_matrix
    assert "](correlation.png)" in from_table["markdown"]
    short = pa.table({DIRECTION: pa.array([[0.5] * (D - 1)], type=DIRECTION_TYPE)})
    with pytest.raises(ValueError, match="row 0"):
        directions_from_table(short)
