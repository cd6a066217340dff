"""`ray job submit` for real: a Ray head on loopback, the annotation and dataset jobs submitted
with `--working-dir .`, and a job stopped midway then resubmitted to the same output."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cpu import write_config

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# A loopback-only test cluster: token authentication off for the head and every CLI call (Ray
# turns it on by default when a token file exists, and then each client needs that token).
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A Ray head of its own (own ports and temp dir, so the session's local instance and
    other tests never join it), stopped with the module."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            # every port of its own: the defaults are taken by the session's local instance
            *(
                f"--{flag}={free_port()}"
                for flag in (
                    "ray-client-server-port",
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "metrics-export-port",
                    "runtime-env-agent-port",
                )
            ),
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    try:
        while subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, env=ENV).returncode:
            assert time.time() < deadline and proc.poll() is None, "the Ray head did not come up"
            time.sleep(2)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the head and every process it started (one process group)
        proc.wait()


def submit(address: str, script: str, config: Path, run_dir: Path, wait: bool = True) -> str:
    """Submit from the repository root as the README says; returns the job id."""
    job_id = f"alignx-{script.split('/')[-1][:-3]}-{time.time_ns()}"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--submission-id", job_id]
    cmd += [] if wait else ["--no-wait"]
    cmd += ["--", sys.executable, script, "--config", str(config), "--run-dir", str(run_dir)]
    deadline = time.time() + 120
    while True:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)
        if "No available agent" not in done.stderr or time.time() > deadline:  # the node's agent starts last
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return job_id


def status(address: str, job_id: str) -> str:
    done = subprocess.run([RAY, "job", "status", "--address", address, job_id], capture_output=True, text=True, env=ENV)
    out = (done.stdout + done.stderr).lower()  # e.g. "Job 'x' succeeded", "... is currently running"
    return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s.lower() in out), "UNKNOWN")


def annotations(run_dir: Path) -> dict:
    table = pq.read_table(run_dir / "annotate" / "data").sort_by("response_id")
    return table.select(["response_id", "thread_id", "levels", "reject_reason"]).to_pydict()


@pytest.fixture(scope="module")
def job_config(tmp_path_factory, annotator_dir):
    changes = {
        "ray": {"num_cpus": None},
        "threads": {"n_threads": 8, "seed": 11, "responses_per_thread": [3, 5]},
        "ingest": {"shard_rows": 4},
        "annotate": {
            "engine": {"kind": "transformers", "model": str(annotator_dir)},
            "pool": {"batch_size": 2, "num_cpus": 1},
        },
        "build": {
            "pairs": {"pairs_per_thread": 1},
            "personas": {"items": 4},
            "demographics_enabled": False,
            "assemble": {"test_per_cell": 1, "test_max": None, "test_items": 2},
        },
    }
    return write_config(tmp_path_factory.mktemp("job") / "config.yaml", changes)


def test_submitted_jobs_annotate_then_build(head, job_config, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(head, "jobs/annotate.py", job_config, run_dir)
    assert status(head, job) == "SUCCEEDED"
    manifest = json.loads((run_dir / "annotate" / "_manifest.json").read_text())
    assert manifest["labelled"] + manifest["rejected"] == manifest["responses_in"] > 0
    job = submit(head, "jobs/build_dataset.py", job_config, run_dir)
    assert status(head, job) == "SUCCEEDED"
    train = pq.read_table(run_dir / "dataset" / "train")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["annotate"]["status"] == "reused" and report["dataset"]["train"] == train.num_rows

    # A job stopped midway and submitted again finishes with the same annotations.
    stopped_dir = tmp_path / "stopped"
    job = submit(head, "jobs/annotate.py", job_config, stopped_dir, wait=False)
    deadline = time.time() + 300
    while not (stopped_dir / "annotate" / "_checkpoint").exists():
        assert time.time() < deadline and status(head, job) in ("PENDING", "RUNNING"), status(head, job)
        time.sleep(0.5)
    subprocess.run([RAY, "job", "stop", "--address", head, job], capture_output=True, timeout=120, env=ENV)
    while status(head, job) in ("PENDING", "RUNNING"):
        time.sleep(1)
    assert status(head, job) == "STOPPED" and not (stopped_dir / "annotate" / "_manifest.json").exists()
    job = submit(head, "jobs/annotate.py", job_config, stopped_dir)
    assert status(head, job) == "SUCCEEDED"
    assert annotations(stopped_dir) == annotations(run_dir)
