"""Commands run as a user runs them, and killed as a pre-empted node kills them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# A run of its own: a fresh local Ray instance, not the session's or a submitted job's.
ENV = {**{k: v for k, v in os.environ.items() if k != "ALIGNX_OFFICIAL_DIR"}, "RAY_ADDRESS": ""}


def alignx(*args: str) -> list[str]:
    return [sys.executable, "-m", "alignx_ray.cli", *args]


def kill_when(cmd: list[str], ready, timeout: float, settle: float = 2.0) -> None:
    """Start `cmd` in its own session; once `ready()` holds (and `settle` seconds more), kill -9
    its whole process group: the driver, the Ray instance it started and every worker."""
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    time.sleep(settle)
    assert proc.poll() is None, f"{cmd[3]} ended (rc {proc.returncode}) before it could be killed; give it more work"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_to_end(cmd: list[str], timeout: float) -> None:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def exists(pattern: Path):
    """A `ready` test: some path matches the glob `pattern`."""
    return lambda: any(pattern.parent.glob(pattern.name))
