"""The dataset statistics as the run report shows them: the figures of Appendix A.1.1 / E
(the correlation heatmap, the label distribution) and the report.md sections, Table 1's too.

`stats` computes the numbers; this module draws and writes them (matplotlib through the Agg
canvas: no pyplot state, no display).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alignx_ray.build.public_pairs import FORUM
from alignx_ray.build.stats import (
    CORRELATION_THRESHOLD,
    TABLE13_DIRECTIONS,
    dataset_statistics,
    directions_from_table,
    split_statistics,
)
from alignx_ray.common.space import SPACE, PreferenceSpace

CORRELATION_FIGURE = "correlation.png"
LABEL_FIGURE = "label_distribution.png"


def write_statistics(
    table_or_directions: pa.Table | np.ndarray,
    out_dir: Path,
    space: PreferenceSpace = SPACE,
    report_dir: Path | None = None,
) -> dict:
    """Write `correlation.png` and `label_distribution.png` to `out_dir`; return the statistics.

    Takes an AlignX table (its `Preference Direction` column) or an (N, D) matrix. The result
    is `dataset_statistics` without the correlation matrix (the heatmap shows it), plus
    `figures` (file names in `out_dir`) and `markdown`, a report.md section linking the
    figures relative to `report_dir` (default `out_dir`, i.e. report.md sits beside them).
    """
    directions = (
        directions_from_table(table_or_directions, space)
        if isinstance(table_or_directions, pa.Table)
        else table_or_directions
    )
    return _write_figures(dataset_statistics(directions, space), out_dir, space, report_dir)


def write_split_statistics(
    split_dir: Path, out_dir: Path, space: PreferenceSpace = SPACE, report_dir: Path | None = None
) -> dict:
    """`write_statistics` of a split's parquet files, computed on Ray Data (`split_statistics`)."""
    return _write_figures(split_statistics(split_dir, space), out_dir, space, report_dir)


def table1_markdown(table: dict, space: PreferenceSpace = SPACE) -> str:
    """Table 1 as a report.md section: a column per source, a row per dimension ("-": a
    universal source that does not rate it)."""
    if not table:
        return ""
    sources = list(table)
    dimensions = list(dict.fromkeys(name for row in table.values() for name in row["non_neutral"]))
    lines = [
        "## Sources (paper Table 1)",
        "",
        f"Examples per source, and how many have a non-neutral direction on each universal-value dimension"
        f" ({FORUM}: the annotated threads, the paper's Reddit).",
        "",
        "| | " + " | ".join(sources) + " |",
        "|---|" + "---:|" * len(sources),
        "| examples | " + " | ".join(f"{table[s]['examples']:,}" for s in sources) + " |",
    ]
    for name in dimensions:
        cells = [table[s]["non_neutral"].get(name) for s in sources]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:,}" for c in cells) + " |")
    return "\n".join(lines + [""])


def _write_figures(stats: dict, out_dir: Path, space: PreferenceSpace, report_dir: Path | None) -> dict:
    correlation = stats.pop("correlation")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_correlation(correlation, out_dir / CORRELATION_FIGURE)
    _plot_label_distribution(stats["label_counts"], out_dir / LABEL_FIGURE)
    figures = [CORRELATION_FIGURE, LABEL_FIGURE]
    links = [Path(os.path.relpath(out_dir / name, report_dir or out_dir)).as_posix() for name in figures]
    stats["figures"] = figures
    stats["markdown"] = _markdown(stats, space, *links)
    return stats


def _plot_correlation(correlation: np.ndarray, path: Path) -> None:
    cmap = matplotlib.colormaps["coolwarm"].with_extremes(bad="black")  # constant dimension: no r
    fig = Figure(figsize=(9, 8))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(correlation), cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    ticks = np.arange(0, correlation.shape[0], 10)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("dimension index")
    ax.set_ylabel("dimension index")
    ax.set_title("Pearson correlation between dimensions (black: constant dimension, no r)")
    fig.colorbar(image, ax=ax, label="Pearson r")
    _save(fig, path)


def _plot_label_distribution(label_counts: dict, path: Path) -> None:
    indices = np.arange(len(label_counts["positive"]))
    fig = Figure(figsize=(14, 5))
    ax = fig.subplots()
    bottom = np.zeros(len(indices))
    for label, colour in (("positive", "tab:green"), ("neutral", "tab:grey"), ("negative", "tab:red")):
        counts = np.asarray(label_counts[label])
        ax.bar(indices, counts, bottom=bottom, color=colour, label=label, width=0.85)
        bottom += counts
    ax.set_xlabel("dimension index")
    ax.set_ylabel("examples")
    ax.set_title("Preference direction labels per dimension")
    ax.set_xlim(-1, len(indices))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    """Render through the Agg canvas directly: no pyplot state, no display needed."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _markdown(stats: dict, space: PreferenceSpace, correlation_link: str, label_link: str) -> str:
    lines = [
        "## Dataset statistics",
        "",
        f"- examples: {stats['n_examples']:,}; dimensions: {stats['n_dimensions']}",
        f"- distinct preference directions: {stats['distinct_directions']:,}"
        f" ({stats['distinct_share']:.2%} of examples)",
        _pairs_line(stats),
        _strongest_line(stats["strongest_pair"], space),
        "",
        f"![Pearson correlation between dimensions]({correlation_link})",
        "",
        f"![Preference direction labels per dimension]({label_link})",
        "",
    ]
    table = stats["gender_succorance"]
    if table is not None:
        rows, columns, counts = table["rows"]["labels"], table["columns"]["labels"], table["counts"]
        lines += [
            "Gender x Succorance (paper Table 13): examples per direction pair, neutral excluded. "
            f"Succorance negative: {columns['negative']}; positive: {columns['positive']}.",
            "",
            "| Gender / Succorance | Negative | Positive |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {row.capitalize()} ({rows[row]}) | {counts[row]['negative']:,} | {counts[row]['positive']:,} |"
            for row in TABLE13_DIRECTIONS
        ]
        lines.append("")
    return "\n".join(lines)


def _pairs_line(stats: dict) -> str:
    share = stats["share_pairs_below_threshold"]
    defined = stats["pairs_total"] - stats["pairs_undefined"]
    shown = "undefined" if share is None else f"{share:.2%}"
    line = f"- dimension pairs with Pearson r < {CORRELATION_THRESHOLD}: {shown} of {defined:,} pairs"
    if stats["pairs_undefined"]:
        line += f" ({stats['pairs_undefined']:,} more pairs involve a constant dimension and have no r)"
    return line


def _strongest_line(pair: dict | None, space: PreferenceSpace) -> str:
    if pair is None:
        return "- strongest correlation: none defined"
    i, j = pair["dimensions"]
    names = f"{i} ({space[i].name}) and {j} ({space[j].name})"
    return f"- strongest correlation: r = {pair['r']:.2f} between {names}"
