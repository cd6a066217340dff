"""One job at a time in a run directory: the lease file `RUN_DIR/_lease.json`.

Two jobs in one run directory (a resubmission while the first still runs, as a KubeRay
`backoffLimit` retry can start) would resume the same stages at once, writing rows twice or
wiping each other's work. The job holding the lease records its host, pid, start time and a
heartbeat it refreshes; a second job refuses to start and names it. A dead job's lease does
not block: it is stale when its pid is gone on this host, or when its heartbeat is older than
`stale_after_s` (all that tells of a job on another host), and a stale lease is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from alignx_ray.common.config import Section

logger = logging.getLogger(__name__)
LEASE_FILE = "_lease.json"


class LeaseConfig(Section):
    """The run directory's lease: one job at a time.

    heartbeat_s: how often the holding job refreshes its heartbeat.
    stale_after_s: a lease whose heartbeat is older belongs to a dead job and is taken over
        (the only test for a job on another host, whose pid cannot be checked; keep it well
        above heartbeat_s and the clock skew between hosts).
    take_over: take the lease even from a job that looks alive; only once that job is known
        to be gone, since two jobs in one run directory write the same rows twice.
    """

    heartbeat_s: float = 15.0
    stale_after_s: float = 120.0
    take_over: bool = False


class LeaseHeld(RuntimeError):
    """Another job, alive as far as can be told, holds the run directory."""


class LeaseLost(RuntimeError):
    """Another job took this job's lease over: this one must stop writing."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def stale_reason(holder: dict, now: float, stale_after_s: float, host: str, pid: int) -> str | None:
    """Why `holder`'s lease is a dead job's, or None while that job may still run; `host` and
    `pid` are this process's. A lease naming this very pid on this host is a predecessor's: a
    restarted container numbers its processes from the start again."""
    if holder["host"] == host and (holder["pid"] == pid or not pid_alive(holder["pid"])):
        return f"its process {holder['pid']} is gone from {host}"
    age = now - holder["heartbeat"]
    if age > stale_after_s:
        return f"its last heartbeat was {age:.0f} s ago (stale after {stale_after_s:.0f} s)"
    return None


def describe(holder: dict, now: float) -> str:
    started = datetime.fromtimestamp(holder["started"], timezone.utc).isoformat(timespec="seconds")
    return (
        f"host {holder['host']}, pid {holder['pid']}, started {started}, "
        f"last heartbeat {now - holder['heartbeat']:.0f} s ago"
    )


class RunLease:
    """Holds the lease of `run_dir` for the length of a `with` block, its heartbeat refreshed
    by a daemon thread, and gives it back at the end.

    The lease file is only ever created whole and exclusively (a hard link of a written file),
    so of two jobs starting at once exactly one gets it.
    """

    def __init__(self, run_dir: Path, config: LeaseConfig):
        self.path = Path(run_dir) / LEASE_FILE
        self.config = config
        now = time.time()
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now,
            "heartbeat": now,
            "token": uuid.uuid4().hex,
        }
        self.lost: str | None = None  # who took the lease over, once the heartbeat sees it
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)

    def __enter__(self) -> RunLease:
        self.acquire()
        self._heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._heartbeat.join()
        if self._is_ours(self._read()):
            self.path.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Create the lease, taking over a stale one; LeaseHeld when a live job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = self._read()
            if holder is None:  # given back meanwhile
                continue
            now = time.time()
            reason = stale_reason(holder, now, self.config.stale_after_s, self.record["host"], self.record["pid"])
            if reason is None and not self.config.take_over:
                raise LeaseHeld(
                    f"run directory {self.path.parent} is in use by another job ({describe(holder, now)}): two jobs "
                    "in one run directory would write the same rows twice. If that job is gone, run again once its "
                    f"heartbeat is over {self.config.stale_after_s:.0f} s old, or now with --set lease.take_over=true."
                )
            logger.warning("taking over the lease of %s: %s", describe(holder, now), reason or "take_over is set")
            self.remove_stale(holder)

    def check(self) -> None:
        """LeaseLost once another job has taken the lease over."""
        if self.lost:
            raise LeaseLost(f"the lease of {self.path.parent} was taken over by {self.lost}")

    def _create(self) -> bool:
        staged = self._staged(self.record)
        try:
            os.link(staged, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            staged.unlink()

    def remove_stale(self, stale: dict) -> None:
        """Remove the lease `stale`, judged stale a moment ago; when another job has taken it
        over meanwhile, that job's lease stays."""
        aside = self.path.with_name(f"{LEASE_FILE}.{self.record['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = json.loads(aside.read_text())
        if moved["token"] != stale["token"]:
            try:
                os.link(aside, self.path)
            except FileExistsError:  # a third job's, created meanwhile: the moved one's heartbeat will see it
                pass
        aside.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            try:
                holder = self._read()
                if not self._is_ours(holder):
                    self.lost = describe(holder, time.time()) if holder else "nobody (its file was removed)"
                    logger.error("the lease of %s was taken over by %s", self.path.parent, self.lost)
                    return
                self.record["heartbeat"] = time.time()
                os.replace(self._staged(self.record), self.path)
            except OSError as e:  # a shared filesystem's hiccup: the next beat tries again
                logger.warning("lease heartbeat of %s failed: %s", self.path.parent, e)

    def _staged(self, record: dict) -> Path:
        staged = self.path.with_name(f"{LEASE_FILE}.{record['token']}.new")
        staged.write_text(json.dumps(record))
        return staged

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def _is_ours(self, holder: dict | None) -> bool:
        return holder is not None and holder["token"] == self.record["token"]
