"""The run report: `RUN_DIR/report.json` (one key per stage) and `RUN_DIR/report.md`.

Stages add their figures as they finish, and the report is rewritten each time, so a killed
run still leaves the figures of the stages it finished.
"""

from __future__ import annotations

import json
from pathlib import Path


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
        for stage, figures in self.stages.items():
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
