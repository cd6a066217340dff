"""The actor guard alone, in a process of its own as in a Ray actor: a batch over its timeout, or
an engine failure, ends the process with the guard's status after a record in the stage's
fault ledger; a batch in time is returned as the UDF made it. (On Ray: test_faults.py.)"""

import json
import subprocess
import sys
import textwrap

import pytest

from alignx_ray.common.raydata import GUARD_EXIT_STATUS, exit_records

pytestmark = pytest.mark.faults

# argv: ledger, what the UDF does with its batch (`sleep` for 60 s, `fail` as a dead engine,
# `core_dies`: its engine core process killed while the call waits, `echo`), the batch
# timeout. Prints the batch the guard returned.
ACTOR = textwrap.dedent(
    """
    import subprocess, sys, time
    import psutil
    from alignx_ray.common.raydata import EngineFailure, guarded

    class Engine:  # its process `core` stands for vLLM's engine core
        def __init__(self, action):
            self.action = action
            self.core = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print("core", self.core.pid, file=sys.stderr, flush=True)

        def engine_processes(self):
            return [psutil.Process(self.core.pid)]

        def __call__(self, batch):
            if self.action == "core_dies":
                self.core.kill()
                time.sleep(60)
            if self.action == "sleep":
                time.sleep(60)
            if self.action == "fail":
                raise EngineFailure("the engine core died") from ConnectionError("socket closed")
            return [x * 2 for x in batch]

    ledger, action, timeout = sys.argv[1:]
    actor = guarded(Engine)({"action": action}, float(timeout), ledger)
    print(actor([1, 2, 3]), flush=True)
    actor.inner.core.kill()
    """
)


def run_guarded(tmp_path, action: str, timeout: float) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", ACTOR, str(tmp_path / "_faults"), action, str(timeout)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_a_batch_in_time_is_returned(tmp_path):
    done = run_guarded(tmp_path, "echo", 30)
    assert done.returncode == 0 and done.stdout.strip() == "[2, 4, 6]"
    assert exit_records(tmp_path / "_faults") == []


def test_a_batch_over_its_timeout_ends_the_process_and_its_engine_core(tmp_path):
    import psutil

    done = run_guarded(tmp_path, "sleep", 0.5)
    assert done.returncode == GUARD_EXIT_STATUS and done.stdout == ""
    core = int(done.stderr.split("core ", 1)[1].split()[0])
    assert not psutil.pid_exists(core) or psutil.Process(core).status() == psutil.STATUS_ZOMBIE
    [record] = exit_records(tmp_path / "_faults")
    assert record["reason"] == "batch_timeout"
    assert record["detail"] == "a batch of 3 rows ran over batch_timeout_s=0.5"
    assert "Engine actor exits, for Ray to replace: batch_timeout" in done.stderr


def test_an_engine_process_that_ends_mid_call_ends_the_actor_at_once(tmp_path):
    """The engine core dies while the call waits on it: the guard sees it within a poll, long
    before the batch timeout, and ends the actor."""
    import time

    started = time.monotonic()
    done = run_guarded(tmp_path, "core_dies", 50)
    assert done.returncode == GUARD_EXIT_STATUS and done.stdout == ""
    assert time.monotonic() - started < 30  # the call alone would sleep 60 s, the timeout 50 s
    [record] = exit_records(tmp_path / "_faults")
    core = int(done.stderr.split("core ", 1)[1].split()[0])
    assert record["reason"] == "engine_dead"
    assert record["detail"] == f"its engine's process {core} has ended"


def test_an_engine_failure_ends_the_process(tmp_path):
    done = run_guarded(tmp_path, "fail", 30)
    assert done.returncode == GUARD_EXIT_STATUS
    [record] = exit_records(tmp_path / "_faults")
    assert record["reason"] == "engine_failed"
    assert record["detail"] == "the engine core died (ConnectionError('socket closed'))"
    assert json.loads((next((tmp_path / "_faults").glob("*.json"))).read_text())["pid"] > 0
