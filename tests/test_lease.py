"""Two jobs on one run directory: the second refuses and names the first; a dead job's lease
is taken over (its pid gone on this host, or its heartbeat too old); taking over is possible."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone

import pytest
from processes import ENV, alignx

from alignx_ray.common.lease import LEASE_FILE, LeaseConfig, LeaseHeld, LeaseLost, RunLease, stale_reason

pytestmark = pytest.mark.faults

# A job in another process: asks for the lease of argv[1] (at the time argv[2], when given),
# says whether it got it, and holds it until killed.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from alignx_ray.common.lease import LeaseConfig, LeaseHeld, RunLease
    if len(sys.argv) > 2:
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    try:
        with RunLease(sys.argv[1], LeaseConfig()):
            print("held", flush=True)
            time.sleep(3600)
    except LeaseHeld as e:
        print("refused:", e, flush=True)
    """
)


def start_holder(run_dir, at: float | None = None) -> subprocess.Popen:
    args = [sys.executable, "-c", HOLDER, str(run_dir), *([] if at is None else [str(at)])]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def lease_of(run_dir) -> dict:
    return json.loads((run_dir / LEASE_FILE).read_text())


def write_lease(run_dir, host: str, pid: int, heartbeat_age: float) -> None:
    now = time.time()
    record = {"host": host, "pid": pid, "started": now - 3600, "heartbeat": now - heartbeat_age, "token": "theirs"}
    (run_dir / LEASE_FILE).write_text(json.dumps(record))


@pytest.fixture
def holder(tmp_path):
    proc = start_holder(tmp_path)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_job_refuses_naming_the_first_and_takes_over_once_it_is_killed(tmp_path, holder):
    with pytest.raises(LeaseHeld) as refused:
        RunLease(tmp_path, LeaseConfig()).acquire()
    started = datetime.fromtimestamp(lease_of(tmp_path)["started"], timezone.utc).isoformat(timespec="seconds")
    for fact in (f"host {socket.gethostname()}", f"pid {holder.pid}", f"started {started}", "lease.take_over"):
        assert fact in str(refused.value)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with RunLease(tmp_path, LeaseConfig()) as lease:  # its pid is gone: no waiting for its heartbeat
        assert lease_of(tmp_path)["token"] == lease.record["token"]
    assert not (tmp_path / LEASE_FILE).exists()  # given back


def test_a_resubmitted_command_refuses_before_it_starts_anything(tmp_path, holder):
    done = subprocess.run(
        alignx("annotate", "--run-dir", str(tmp_path)), env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert f"alignx annotate: run directory {tmp_path} is in use by another job" in done.stderr
    assert f"pid {holder.pid}" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE_FILE]  # no stage was begun


def test_staleness_by_pid_on_this_host_and_by_heartbeat_elsewhere():
    here, me, now = socket.gethostname(), os.getpid(), time.time()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lease = {"host": here, "pid": os.getppid(), "started": now, "heartbeat": now - 10}
    assert stale_reason(lease, now, 300, here, me) is None  # a live process of this host
    assert "is gone" in stale_reason({**lease, "pid": gone.pid}, now, 300, here, me)
    # this very pid: a predecessor's lease in a restarted container
    assert "is gone" in stale_reason({**lease, "pid": me}, now, 300, here, me)
    elsewhere = {**lease, "host": "another-host", "pid": gone.pid}  # its pid says nothing here
    assert stale_reason(elsewhere, now, 300, here, me) is None
    assert "heartbeat was 400 s ago" in stale_reason({**elsewhere, "heartbeat": now - 400}, now, 300, here, me)


def test_a_lease_from_another_host_blocks_until_stale_or_taken_over(tmp_path):
    write_lease(tmp_path, "another-host", 1, heartbeat_age=10)
    with pytest.raises(LeaseHeld, match="host another-host, pid 1"):
        RunLease(tmp_path, LeaseConfig(stale_after_s=300)).acquire()
    with RunLease(tmp_path, LeaseConfig(stale_after_s=5)) as lease:
        assert lease_of(tmp_path)["token"] == lease.record["token"]
    write_lease(tmp_path, "another-host", 1, heartbeat_age=10)
    with RunLease(tmp_path, LeaseConfig(take_over=True)) as lease:
        assert lease_of(tmp_path)["token"] == lease.record["token"]


def test_the_heartbeat_refreshes_and_a_taken_over_job_stops(tmp_path):
    config = LeaseConfig(heartbeat_s=0.05)
    with RunLease(tmp_path, config) as first:
        time.sleep(0.3)
        assert lease_of(tmp_path)["heartbeat"] > first.record["started"]
        first.check()
        with RunLease(tmp_path, config.model_copy(update={"take_over": True})) as second:
            time.sleep(0.3)
            with pytest.raises(LeaseLost, match=f"pid {os.getpid()}"):
                first.check()
        assert not (tmp_path / LEASE_FILE).exists()
        second.check()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_stale_lease_taken_over_meanwhile_is_not_removed(tmp_path):
    """Two jobs judged the same lease stale; the first took it over before the second removes it."""
    write_lease(tmp_path, "another-host", 1, heartbeat_age=1000)
    stale = lease_of(tmp_path)
    with RunLease(tmp_path, LeaseConfig()) as first:
        RunLease(tmp_path, LeaseConfig()).remove_stale(stale)
        assert lease_of(tmp_path)["token"] == first.record["token"]
        assert [p.name for p in tmp_path.iterdir()] == [LEASE_FILE]


def test_of_jobs_starting_at_once_on_a_stale_lease_exactly_one_gets_it(tmp_path):
    write_lease(tmp_path, "another-host", 1, heartbeat_age=1000)
    at = time.time() + 5  # time for every interpreter to start, then all ask at once
    jobs = [start_holder(tmp_path, at) for _ in range(4)]
    try:
        answers = sorted(job.stdout.readline().split(":")[0].strip() for job in jobs)
    finally:
        for job in jobs:
            job.kill()
            job.wait()
    assert answers == ["held", "refused", "refused", "refused"]
