"""Exact persona retrieval: FAISS IndexFlatIP (float, one-hot codes) vs IndexBinaryFlat (bits)
vs IndexPQFastScan with exact codebooks (two dimensions per 4-bit code, `alignx_ray.retrieval`).

    python benchmarks/retrieval.py [--responses 200000] [--queries 20000] [--k 100]

Levels are synthetic with the sparsity of real annotations (most dimensions "cannot
reflect"). Each method runs in its own process, so its peak memory is its own: the
process's peak RSS is reset once the data is made (Linux /proc/self/clear_refs), and the
figure is that peak above the RSS at the reset. The neighbour sets are compared
with `retrieval.same_neighbours`: equal similarity at every rank, equal ids above each
query's k-th similarity. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np


def make_levels(n: int, seed: int, d: int = 90) -> np.ndarray:
    """Mostly level 2 ("cannot reflect"); each response shows a few dimensions high or low."""
    rng = np.random.default_rng(seed)
    levels = np.full((n, d), 2, np.uint8)
    shown = rng.random((n, d)) < 0.12
    levels[shown] = rng.choice(np.array([1, 3], np.uint8), shown.sum())
    return levels


def memory_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM peak)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measure(kind: str, args, queue) -> None:
    import faiss

    from alignx_ray.engines.retrieval import LevelIndex

    faiss.omp_set_num_threads(args.threads)
    base, queries = make_levels(args.responses, 0), make_levels(args.queries, 1)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    rss0 = memory_kib("VmRSS")
    started = time.perf_counter()
    index = LevelIndex(base, kind)
    built = time.perf_counter()
    result = index.search(queries, args.k)
    done = time.perf_counter()
    rss1 = memory_kib("VmHWM")
    np.save(f"{args.scratch}/{kind}-scores.npy", result[0])
    np.save(f"{args.scratch}/{kind}-ids.npy", result[1])
    queue.put(
        {
            "build_s": round(built - started, 3),
            "search_s": round(done - built, 3),
            "peak_mib_above_data": round((rss1 - rss0) / 1024, 1),
        }
    )


def main() -> None:
    import tempfile

    from alignx_ray.engines.retrieval import same_neighbours

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = scratch
        kinds = ("flat_ip", "binary", "fastscan")
        for kind in kinds:
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(kind, args, queue))
            proc.start()
            figures[kind] = queue.get()
            proc.join()
            print(
                f"{kind:8s} build {figures[kind]['build_s']:8.3f} s  search {figures[kind]['search_s']:8.3f} s  "
                f"peak +{figures[kind]['peak_mib_above_data']:.0f} MiB",
                flush=True,
            )
        loaded = {
            kind: (np.load(f"{scratch}/{kind}-scores.npy"), np.load(f"{scratch}/{kind}-ids.npy")) for kind in kinds
        }
    identical = {kind: same_neighbours(loaded["flat_ip"], loaded[kind]) for kind in kinds[1:]}
    total = {kind: f["build_s"] + f["search_s"] for kind, f in figures.items()}
    fastest = min(kinds[1:], key=total.get)
    print(
        json.dumps(
            {
                "responses": args.responses,
                "queries": args.queries,
                "k": args.k,
                "threads": args.threads,
                **{f"{kind}_{key}": value for kind, f in figures.items() for key, value in f.items()},
                **{f"speedup_{kind}_vs_flat_ip": round(total["flat_ip"] / total[kind], 2) for kind in kinds[1:]},
                "fastest": fastest,
                "speedup_vs_flat_ip": round(total["flat_ip"] / total[fastest], 2),
                "identical_binary": identical["binary"],
                "identical_fastscan": identical["fastscan"],
                "identical": identical[fastest],
            }
        )
    )


if __name__ == "__main__":
    main()
