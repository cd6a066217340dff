"""What the fault tests share: the processes of a stage's actors, faults sent to them, and the
summary of what each fault cost (rows lost, duplicates, extra seconds)."""

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

# Where the fault tests add their summary rows (benchmarks/faults.py sets it); unset: nowhere.
SUMMARY_ENV = "ALIGNX_FAULT_SUMMARY"


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` until it returns something true; fail naming `what` after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"waited {timeout} s for {what}")


def in_background(fn) -> Future:
    """`fn()` on a thread of this process (the driver), so the test can act on its actors."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def actors(class_part: str, state: str | None = "ALIVE") -> list[dict]:
    """Actors of this process's Ray instance whose class name holds `class_part` (Ray Data names
    an actor after its stage's UDF: MapWorker(MapBatches(AnnotateUDF))). The GCS's actor table:
    the local instance runs without the dashboard that `ray.util.state` asks."""
    from ray._private.state import actors as actor_table

    return [
        a
        for a in actor_table().values()
        if class_part in a["ActorClassName"] and (state is None or a["State"] == state) and a["Pid"]
    ]


def restarts(actor_id: str) -> int:
    from ray._private.state import actors as actor_table

    return actor_table(actor_id)["NumRestarts"]


def rows_written(stage_dir: Path) -> bool:
    """Some rows of the stage are in its output already."""
    return any((stage_dir / "data").glob("*.parquet"))


def copy_stages(source: Path, target: Path, *stages: str) -> None:
    """Finished stages (their manifests included) of another run, to be reused by this one."""
    for stage in stages:
        shutil.copytree(source / stage, target / stage)


def ids(folder: Path, column: str) -> list[str]:
    return pq.read_table(folder, columns=[column])[column].to_pylist()


def record(fault: str, survived: bool, expected: list[str], written: list[str], extra_s: float | None) -> None:
    """One row of the fault summary: rows lost (ids expected and not written) and duplicates
    (ids written more than once) are counted from the stage's output."""
    path = os.environ.get(SUMMARY_ENV)
    if not path:
        return
    row = {
        "fault": fault,
        "survived": survived,
        "rows_in": len(expected),
        "rows_lost": len(set(expected) - set(written)),
        "duplicate_rows": len(written) - len(set(written)),
        "extra_s": None if extra_s is None else round(extra_s, 1),
    }
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
