"""A node pre-empted: on a two-node local cluster (a second raylet on this machine offering the
resource the engine actors need), the worker node is removed mid-annotation and again in the
persona stage, and a new one added; each stage ends exactly once, equal to a fault-free run.
The cluster runs in a process of its own (preemption_run.py): it needs a Ray of its own."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cpu import write_config
from faults import copy_stages, ids, record
from processes import ENV

from alignx_ray.common.config import load_config
from alignx_ray.run import Run, RunConfig

pytestmark = pytest.mark.faults

CONFIG = {
    "threads": {"n_threads": 4, "seed": 5, "responses_per_thread": [3, 5]},
    "ingest": {"shard_rows": 4},
    "annotate": {"pool": {"batch_size": 2, "num_cpus": 1, "resources": {"preemptible": 1}}},
    "build": {
        "pairs": {"pairs_per_thread": 2},
        "personas": {"items": 4, "pool": {"batch_size": 1, "resources": {"preemptible": 1}}},
    },
}


def table(run_dir: Path, stage: str, columns: list[str]) -> dict:
    return pq.read_table(run_dir / stage / "data", columns=columns).sort_by(columns[0]).to_pydict()


def test_preempted_engine_node_annotation_and_personas_end_exactly_once(tmp_path, annotator_dir, ray_local):
    config = write_config(tmp_path / "config.yaml", CONFIG)
    fault_free = Run(load_config(RunConfig, config), tmp_path / "fault-free")
    fault_free.personas()  # on the session's single-node instance, where `preemptible` is not asked for
    run_dir = tmp_path / "preempted"
    copy_stages(fault_free.run_dir, run_dir, "threads", "ingest")
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("preemption_run.py")), str(config), str(run_dir)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    clean = json.loads((fault_free.run_dir / "report.json").read_text())

    columns = ["response_id", "levels", "option_probs", "reject_reason"]
    got, want = table(run_dir, "annotate", columns), table(fault_free.run_dir, "annotate", columns)
    expected = ids(fault_free.dir("ingest") / "data", "response_id")
    assert sorted(got["response_id"]) == sorted(expected)
    np.testing.assert_allclose(np.array(got.pop("option_probs")), np.array(want.pop("option_probs")), atol=1e-5)
    assert got == want
    extra = figures["annotate"]["seconds"] - clean["annotate"]["seconds"]
    written = ids(run_dir / "annotate" / "data", "response_id")
    record("engine node pre-empted mid-annotation", True, expected, written, extra)

    columns = ["pair_id", "ugc", "pair_feedback", "ugc_direction", "pair_direction"]
    got, want = table(run_dir, "personas", columns), table(fault_free.run_dir, "personas", columns)
    expected = ids(fault_free.dir("pairs") / "data", "pair_id")
    assert sorted(got["pair_id"]) == sorted(expected)
    assert got == want
    extra = figures["personas"]["seconds"] - clean["personas"]["seconds"]
    record("node pre-empted in the persona stage", True, expected, ids(run_dir / "personas" / "data", "pair_id"), extra)
