"""The fault summary: every fault the `faults` tests inject, whether the run survived it, the
rows it lost and wrote twice, and the time it cost over the same stage without it.

    python benchmarks/faults.py [--out benchmarks/results/faults-cpu.json]

Runs the tests that inject faults into a real run (tests/test_faults.py, tests/test_preemption.py)
with pytest, which append one row per fault to a file (`ALIGNX_FAULT_SUMMARY`); their asserts
are the checks, so a row exists only for a fault whose test ran to its end. Prints the table
as markdown; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_faults.py", "tests/test_preemption.py"]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| fault | survived | rows lost | duplicate rows | extra time over a fault-free run |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        extra = "-" if r["extra_s"] is None else f"{r['extra_s']:+.1f} s"
        survived = "yes" if r["survived"] else "no (the job fails)"
        lines.append(
            f"| {r['fault']} | {survived} | {r['rows_lost']} of {r['rows_in']} | {r['duplicate_rows']} | {extra} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults-cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        summary = Path(scratch) / "summary.jsonl"
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "faults", *TESTS],
            cwd=ROOT,
            env={**os.environ, "ALIGNX_FAULT_SUMMARY": str(summary)},
        )
        seconds = time.time() - started
        rows = [json.loads(line) for line in summary.read_text().splitlines()] if summary.exists() else []
    print(markdown(rows))
    result = {
        "command": "python benchmarks/faults.py",
        "device": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "tests_passed": done.returncode == 0,
        "pytest_seconds": round(seconds, 1),
        "faults": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
