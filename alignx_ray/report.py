"""The run report: `RUN_DIR/report.json` (one key per stage) and `RUN_DIR/report.md`.

Stages add their figures as they finish, and the report is rewritten each time, so a killed
run still leaves the figures of the stages it finished. A `summary` entry, when a run writes
one, comes first: it is what a person reads first.
"""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY = "summary"
BAR_WIDTH = 30


def seconds_chart(stages: dict[str, dict]) -> str:
    """A markdown bar chart of each stage's wall time as they ran (`stage_seconds`, else the
    stage's own `seconds`)."""
    timed = {}
    for name, figures in stages.items():
        seconds = figures.get("stage_seconds", figures.get("seconds"))
        if isinstance(seconds, (int, float)):
            timed[name] = seconds
    if not timed:
        return ""
    longest = max(timed.values()) or 1.0
    rows = [f"| {name} | {sec:.1f} | {'█' * max(1, round(BAR_WIDTH * sec / longest))} |" for name, sec in timed.items()]
    return "\n".join(["| stage | seconds | |", "|---|---:|---|", *rows])


class RunReport:
    def __init__(self, run_dir: str | Path, title: str = "alignx-ray run"):
        self.run_dir = Path(run_dir)
        self.title = title
        self.json_path = self.run_dir / "report.json"
        self.stages: dict[str, dict] = json.loads(self.json_path.read_text()) if self.json_path.exists() else {}

    def add(self, stage: str, figures: dict) -> None:
        """Record (or replace) one stage's figures and write both files; a `markdown` figure
        (text) is rendered as it is, after the table."""
        self.stages[stage] = figures
        self.write()

    def write(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.stages, indent=1, default=str))
        (self.run_dir / "report.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", f"Run directory: `{self.run_dir}`", ""]
        order = sorted(self.stages, key=lambda stage: stage != SUMMARY)  # stable: the rest as they ran
        for stage, figures in ((stage, self.stages[stage]) for stage in order):
            rows = [f"| {key} | {_cell(value)} |" for key, value in _flatten(figures) if key != "markdown"]
            blocks = ["\n".join(["| figure | value |", "|---|---|", *rows])] if rows else []
            blocks += [figures["markdown"]] if isinstance(figures.get("markdown"), str) else []
            lines += [f"## {stage}", "", "\n\n".join(blocks), ""]
        return "\n".join(lines)


def _flatten(figures: dict, prefix: str = ""):
    for key, value in figures.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."
