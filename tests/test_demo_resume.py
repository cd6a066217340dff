"""The whole run killed and resumed: `alignx demo --run-dir DIR` is killed with kill -9 in the
annotation stage, in the demographic-persona stage and in ICA training, then run once more to
the end. Its dataset must equal, row for row, that of an uninterrupted run, and its report must
say which stages were reused, resumed and computed."""

import json

import pyarrow.parquet as pq
import pytest
from cpu import write_config
from processes import alignx, exists, kill_when, run_to_end

from alignx_ray.common.config import load_config
from alignx_ray.run import Run, RunConfig

# The demo at its smallest: a few threads, a short training, a few evaluated examples.
CONFIG = {
    "threads": {"n_threads": 12, "seed": 5, "responses_per_thread": [3, 5]},
    "ingest": {"shard_rows": 4},
    "annotate": {"engine": {"kind": "transformers"}, "pool": {"batch_size": 2, "num_cpus": 1}},
    "build": {
        "personas": {"items": 4},
        "demographics": {"attempts": 1, "pool": {"batch_size": 2}, "max_tokens": 256},
        "pairs": {"pairs_per_thread": 1},
        "assemble": {"test_per_cell": 1, "test_max": None, "test_items": 2},
    },
    "train": {"dpo": {"epochs": 3, "learning_rate": 1e-3, "per_device_batch": 2, "save_steps": 1, "logging_steps": 1}},
    "evaluate": {"personas": ["all"], "reversal": False, "max_examples": 3},
}


def rows(run_dir, split: str) -> list[dict]:
    return pq.read_table(run_dir / "dataset" / split).sort_by("example_id").to_pylist()


def report(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, annotator_dir):
    """The demo config (its annotator: the shipped one, checked by `annotator_dir`)."""
    return write_config(tmp_path_factory.mktemp("demo-resume") / "config.yaml", CONFIG)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, config_path, ray_local):
    """The dataset of the same config, built without interruption in this process."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    Run(load_config(RunConfig, config_path), run_dir).dataset()
    return run_dir


def test_demo_killed_at_three_points_resumes_to_the_same_dataset(tmp_path, config_path, uninterrupted):
    run_dir = tmp_path / "run"
    cmd = alignx("demo", "--config", str(config_path), "--run-dir", str(run_dir))

    kill_when(cmd, exists(run_dir / "annotate" / "_checkpoint"), timeout=300)
    assert not (run_dir / "annotate" / "_manifest.json").exists()

    kill_when(cmd, exists(run_dir / "demographics" / "_checkpoint"), timeout=600)
    assert report(run_dir)["annotate"]["status"] == "resumed"
    assert not (run_dir / "demographics" / "_manifest.json").exists()

    kill_when(cmd, exists(run_dir / "train_ica" / "ray" / "alignxpert-ica" / "checkpoint_*"), timeout=900)
    assert report(run_dir)["demographics"]["status"] == "resumed"
    assert not (run_dir / "train_ica" / "_manifest.json").exists()

    run_to_end(cmd, timeout=1800)
    for split in ("train", "test"):
        assert rows(run_dir, split) == rows(uninterrupted, split)
    assert rows(run_dir, "train"), "the resumed run built an empty dataset"
    figures = report(run_dir)
    done = figures["run"]
    assert {"threads", "ingest", "annotate", "pairs", "personas", "demographics", "dataset"} <= set(done["reused"])
    assert done["resumed"] == ["train_ica"] and "train_pba" in done["computed"]
    # Training went on from its checkpoint and ran the same schedule as the uninterrupted method.
    assert figures["train_ica"]["resumed_from_step"] >= 1
    assert figures["train_ica"]["step"] == figures["train_pba"]["step"]
    assert "evaluation" in figures and figures["judge_alignx_test"]["status"] == "computed"
