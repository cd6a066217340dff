"""Faults on a real local Ray instance with the real vLLM engine on the tiny annotator, no mocks:
an engine actor killed mid-batch (annotation and P_DEMO), its engine dead or hung while the
actor lives, a constructor that fails, a Ray Train worker killed mid-training. Each stage ends
with every input id exactly once and the labels of a fault-free run, or fails fast saying why.
A pre-empted node: test_preemption.py."""

import json
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from alignx_rows import alignx_row
from cpu import demo_dict, merged
from faults import actors, copy_stages, ids, in_background, record, restarts, rows_written, wait_for

from alignx_ray.common import schema
from alignx_ray.common.raydata import StageFailed
from alignx_ray.run import Run, RunConfig

pytestmark = pytest.mark.faults

# The demo at its smallest that still gives every stage several batches: 4 threads of 3-5
# responses, 2 responses per annotation batch, 1 pair per P_DEMO batch.
CONFIG = {
    "threads": {"n_threads": 4, "seed": 5, "responses_per_thread": [3, 5]},
    "ingest": {"shard_rows": 4},
    "annotate": {"pool": {"batch_size": 2, "num_cpus": 1}},
    "build": {
        "pairs": {"pairs_per_thread": 2},
        "demographics": {"attempts": 1, "max_tokens": 96, "pool": {"batch_size": 1}},
    },
}
# vLLM's engine core in a process of its own, as on a GPU node: it can die or hang while the
# actor that called it lives.
ENGINE_CORE_APART = {"engine": {"vllm_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}}


def run_config(changes: dict | None = None) -> RunConfig:
    return RunConfig.model_validate(demo_dict(merged(CONFIG, changes or {})))


def report(run: Run) -> dict:
    return json.loads((run.run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, annotator_dir, ray_local):
    """The fault-free run up to P_DEMO (its annotator, the cached one, built by then)."""
    run = Run(run_config(), tmp_path_factory.mktemp("fault-free"))
    run.demographics()
    return run


def faulted_run(reference: Run, run_dir, changes: dict | None = None, reuse=("threads", "ingest")) -> Run:
    """A run of the same inputs with `changes`, reusing the reference's finished `reuse` stages."""
    copy_stages(reference.run_dir, run_dir, *reuse)
    return Run(run_config(changes), run_dir)


def annotations(run: Run) -> dict:
    table = pq.read_table(run.dir("annotate") / "data").sort_by("response_id")
    return table.select(["response_id", "levels", "option_probs", "reject_reason"]).to_pydict()


def assert_annotated_once_as(run: Run, reference: Run) -> None:
    """Every ingested id exactly once, with the fault-free run's labels."""
    got, want = annotations(run), annotations(reference)
    assert sorted(ids(run.dir("annotate") / "data", "response_id")) == sorted(
        ids(reference.dir("ingest") / "data", "response_id")
    )
    probs = [np.array(t.pop("option_probs")) for t in (got, want)]
    assert got == want
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)


def stage_seconds(run: Run, stage: str) -> float:
    return report(run)[stage]["stage_seconds"]


def record_annotation(fault: str, run: Run, reference: Run) -> None:
    """The summary row of a fault in annotation that the stage survived."""
    expected = ids(reference.dir("ingest") / "data", "response_id")
    extra = stage_seconds(run, "annotate") - stage_seconds(reference, "annotate")
    record(fault, True, expected, ids(run.dir("annotate") / "data", "response_id"), extra)


def kill_when_writing(run: Run, stage: str, udf: str, start) -> tuple[dict, object]:
    """Start `start` in the background; once the stage has written rows, SIGKILL its actor's
    process (busy with its next batch). Returns (the killed actor, the stage's future)."""
    future = in_background(start)
    wait_for(lambda: rows_written(run.dir(stage)) or future.done(), 600, f"{stage} to write rows")
    assert not future.done(), f"{stage} ended before its actor could be killed: give it more batches"
    actor = wait_for(lambda: actors(udf), 60, f"a live {udf} actor")[0]
    os.kill(actor["Pid"], signal.SIGKILL)
    return actor, future


def test_engine_actor_killed_mid_batch_annotation(reference, tmp_path):
    run = faulted_run(reference, tmp_path)
    actor, future = kill_when_writing(run, "annotate", "AnnotateUDF", run.annotate)
    figures = future.result(timeout=600)
    assert restarts(actor["ActorID"]) == 1  # the same actor, restarted; its batch sent again
    assert_annotated_once_as(run, reference)
    assert figures["actor_exits"] == {}  # killed from outside: no exit of its own
    record_annotation("annotation actor SIGKILLed mid-batch", run, reference)


def test_without_restarts_the_same_kill_loses_the_batch(reference, tmp_path):
    """The negative control: with restarts off, the kill fails the stage, and its output lacks
    rows, which the exactly-once check above would catch."""
    run = faulted_run(reference, tmp_path, {"annotate": {"pool": {"max_restarts": 0}}})
    _, future = kill_when_writing(run, "annotate", "AnnotateUDF", run.annotate)
    with pytest.raises(StageFailed, match="ActorDiedError"):
        future.result(timeout=600)
    expected = ids(reference.dir("ingest") / "data", "response_id")
    written = ids(run.dir("annotate") / "data", "response_id")
    assert len(set(written)) < len(expected)
    assert report(run)["annotate"]["status"] == "failed"
    record("annotation actor SIGKILLed, restarts off (control)", False, expected, written, None)


def test_engine_actor_killed_mid_batch_demographics(reference, tmp_path):
    run = faulted_run(reference, tmp_path, reuse=("threads", "ingest", "annotate", "pairs"))
    actor, future = kill_when_writing(run, "demographics", "DemographicsUDF", run.demographics)
    future.result(timeout=600)
    assert restarts(actor["ActorID"]) == 1
    columns = ["pair_id", "demo_text", "demo_raw", "demo_attempts", "reject_reason"]
    got, want = (pq.read_table(r.dir("demographics") / "data", columns=columns) for r in (run, reference))
    got, want = got.sort_by("pair_id"), want.sort_by("pair_id")
    expected = ids(reference.dir("pairs") / "data", "pair_id")
    assert sorted(got["pair_id"].to_pylist()) == sorted(expected)
    assert got.to_pylist() == want.to_pylist()  # seeded by pair id: the same answers
    extra = stage_seconds(run, "demographics") - stage_seconds(reference, "demographics")
    record("P_DEMO actor SIGKILLed mid-batch", True, expected, got["pair_id"].to_pylist(), extra)


def engine_core(actor: dict):
    """The engine core process of an engine actor (vLLM's multiprocess mode)."""
    import psutil

    children = psutil.Process(actor["Pid"]).children(recursive=True)
    return next((c for c in children if "EngineCore" in " ".join(c.cmdline()) + c.name()), None)


def fault_engine_core(reference, tmp_path, changes: dict, send: int):
    """Annotation with the engine core in its own process, which gets `send` once the stage
    has written rows. Returns (run, figures)."""
    run = faulted_run(reference, tmp_path, {"annotate": {**ENGINE_CORE_APART, **changes}})
    future = in_background(run.annotate)
    wait_for(lambda: rows_written(run.dir("annotate")) or future.done(), 600, "annotation to write rows")
    assert not future.done(), "annotation ended before its engine could fail: give it more batches"
    actor = wait_for(lambda: actors("AnnotateUDF"), 60, "a live AnnotateUDF actor")[0]
    core = wait_for(lambda: engine_core(actor), 60, "the actor's engine core process")
    core.send_signal(send)
    try:
        return run, future.result(timeout=600)
    finally:
        if core.is_running():
            core.kill()


def test_engine_core_killed_under_a_live_actor_is_replaced_and_the_stage_completes(reference, tmp_path):
    """vLLM's engine core SIGKILLed mid-call while its actor lives: vLLM 0.32's offline client
    then waits forever (no EngineDeadError reaches the call), so the actor's guard, which
    watches the engine core's process, ends the actor with its engine at once (not after the
    batch timeout), Ray replaces it, and the batch is labelled by a fresh engine."""
    run, figures = fault_engine_core(reference, tmp_path, {"pool": {"batch_timeout_s": 600}}, signal.SIGKILL)
    assert figures["actor_exits"] == {"engine_dead": 1}
    assert_annotated_once_as(run, reference)
    assert stage_seconds(run, "annotate") - stage_seconds(reference, "annotate") < 300  # far under the timeout
    record_annotation("vLLM engine core killed under a live actor (the guard sees it end)", run, reference)


def test_a_call_always_over_the_timeout_fails_the_stage_naming_it(reference, tmp_path):
    """Every attempt over batch_timeout_s: each ends its actor, and once the restarts are spent
    the stage fails, saying so; nothing waits forever."""
    pool = {"batch_timeout_s": 0.05, "max_restarts": 1, "max_task_retries": 1}
    run = faulted_run(reference, tmp_path, {"annotate": {"pool": pool}})
    started = time.time()
    last = "the last: a batch of 2 rows ran over batch_timeout_s=0.05"
    with pytest.raises(StageFailed, match=f"ended themselves 2 times, {last}"):
        run.annotate()
    assert time.time() - started < 300
    assert "batch_timeout_s=0.05" in report(run)["annotate"]["error"]


def test_a_failing_constructor_fails_the_stage_fast_with_its_reason(reference, tmp_path):
    """A model path missing (on every node here): after `init_retries` more actors the stage
    fails with the constructor's error, in the exception and in the report."""
    missing = tmp_path / "no-such-model"
    changes = {"build": {"demographics": {"engine": {"model": str(missing)}, "pool": {"init_retries": 1}}}}
    run = faulted_run(reference, tmp_path, changes, reuse=("threads", "ingest", "annotate", "pairs"))
    before = {a["ActorID"] for a in actors("DemographicsUDF", state=None)}
    started = time.time()
    with pytest.raises(StageFailed, match="no-such-model"):
        run.demographics()
    assert time.time() - started < 180
    tried = [a for a in actors("DemographicsUDF", state=None) if a["ActorID"] not in before]
    assert len(tried) == 2  # the first actor and one retry
    failed = report(run)["demographics"]
    assert failed["status"] == "failed" and "no-such-model" in failed["error"]


TRAIN = {
    "dataset": None,
    "fit_sample": 2,
    "dpo": {"epochs": 3, "learning_rate": 1e-3, "per_device_batch": 2, "save_steps": 1, "logging_steps": 1},
}


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("alignx") / "train.parquet"
    pq.write_table(pa.Table.from_pylist([alignx_row(i) for i in range(16)], schema.ALIGNX_SCHEMA), path)
    return path


def registered_checkpoints(storage) -> int:
    """Checkpoints Ray Train's controller has registered (a restart resumes from the latest of
    them); a checkpoint's folder exists from its first upload on, before it counts."""
    snapshot = storage / "checkpoint_manager_snapshot.json"
    return len(json.loads(snapshot.read_text())["checkpoint_results"]) if snapshot.exists() else 0


def training_run(run_dir, train_data, model) -> Run:
    return Run(run_config({"train": {**TRAIN, "dataset": str(train_data), "model": str(model)}}), run_dir)


def test_training_worker_killed_restarts_from_its_checkpoint(tmp_path, train_data, tiny_model_dir, ray_local):
    """A Ray Train worker SIGKILLed after the first checkpoint: FailureConfig restarts the worker
    group inside the same job from the latest checkpoint; it ends at the fault-free step count."""
    fault_free = training_run(tmp_path / "fault-free", train_data, tiny_model_dir)
    clean = fault_free.train("pba")
    run = training_run(tmp_path / "faulted", train_data, tiny_model_dir)
    future = in_background(lambda: run.train("pba"))
    storage = run.dir("train_pba") / "ray" / "alignxpert-pba"
    wait_for(lambda: registered_checkpoints(storage) or future.done(), 600, "a registered training checkpoint")
    assert not future.done(), "training ended before a worker could be killed: give it more steps"
    worker = wait_for(lambda: actors("RayTrainWorker"), 60, "a live Ray Train worker")[0]
    os.kill(worker["Pid"], signal.SIGKILL)
    figures = future.result(timeout=900)
    assert figures["restarts"] == 1 and clean["restarts"] == 0
    assert figures["resumed_from_step"] >= 1
    assert figures["step"] == clean["step"] == 12  # 16 pairs / (2 workers x 2) x 3 epochs
    assert report(run)["train_pba"]["restarts"] == 1
    extra = figures["stage_seconds"] - clean["stage_seconds"]
    steps = [f"step {s}" for s in range(figures["step"])]  # its rows: the steps trained, each once
    record("Ray Train worker SIGKILLed mid-training", True, [f"step {s}" for s in range(clean["step"])], steps, extra)
