"""The embedded default: every stage on generated threads with planted traits, locally.

The planted truth is kept beside the threads, so each stage's output is checked against it
in the report, which makes the demo an end-to-end test of the whole path, not a smoke run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from alignx_ray.annotator import label_accuracy
from alignx_ray.pipeline import Run, RunConfig
from alignx_ray.report import RunReport


def annotation_vs_truth(run: Run) -> dict:
    """Label accuracy of the annotation stage against the planted levels."""
    truth = pq.read_table(run.dir("threads") / "truth.parquet").to_pydict()
    levels_true = dict(zip(truth["response_id"], truth["levels"]))
    out = pq.read_table(run.dir("annotate") / "data", columns=["response_id", "levels", "option_probs"]).to_pydict()
    ids = [rid for rid, lv in zip(out["response_id"], out["levels"]) if lv]
    probs = np.array([p for p, lv in zip(out["option_probs"], out["levels"]) if lv], dtype=np.float32)
    return label_accuracy(np.array([levels_true[rid] for rid in ids]), probs)


def run_demo(config: RunConfig, run_dir: Path) -> RunReport:
    started = time.time()
    run = Run(config, run_dir, RunReport(run_dir, "alignx-ray demo"))
    annotator = json.loads((Path(run.annotation_model()) / "annotator_report.json").read_text())
    run.report.add("annotator", {
        "path": run.annotation_model(),
        "label_accuracy_unseen_threads": annotator["accuracy"],
        "planted_label_accuracy_unseen_threads": annotator["planted_accuracy"],
        "build_seconds": annotator["seconds"],
    })
    run.annotate()
    run.report.add("annotate_vs_planted", annotation_vs_truth(run))
    run.report.add("run", {"seconds": round(time.time() - started, 1)})
    return run.report
