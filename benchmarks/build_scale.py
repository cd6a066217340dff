"""The dataset build at scale: every build stage on N responses, with time and memory per stage.

    python benchmarks/build_scale.py --responses 10000 100000 1000000 [--out FILE]

For each N: the demo's generator writes about N responses in shards, with the planted levels
as the annotations (no LLM: `fixtures.synthetic.write_planted_annotations`); then pairs,
personas, assembly (AlignX train and test), statistics and the training-data preparation (both
methods' DPO examples rendered with the tiny model's tokenizer) run on a local Ray instance,
in the production code's configs with one actor of each pool per two cores. Per stage: wall
seconds, the driver's peak RSS (reset before the stage through /proc/self/clear_refs), the
largest Ray worker's RSS and heap (RSS minus shared pages, see `Sampler`) and the object
store's use of /dev/shm (all sampled every 0.2 s),
and the rows it wrote. Between consecutive sizes, the growth exponent of each stage's time
(log t2/t1 / log n2/n1: 1.0 is linear). The last line is one JSON object with a `sizes` list.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

RESPONSES_PER_THREAD = 5.5  # the generator's mean (3 to 8 per thread)


def vm_hwm_mib() -> float:
    """This process's peak RSS since the last reset."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Sampler:
    """Peaks of the Ray workers' memory and of /dev/shm (the object store) while a stage runs.

    A worker's heap is its RSS minus its shared pages, as Ray measures it: the object store's
    pages a worker reads are shared memory the OS counts in every reader's RSS (and in
    `object_store_peak_mib` here), so RSS alone counts them twice. Both are kept, with the
    name of the process at the heap's peak. Only this process's descendants are sampled (a
    local Ray instance's workers are), so another Ray instance on the machine is not counted."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.worker_mib, self.heap_mib, self.heap_process, self.store_mib = interval, 0.0, 0.0, "", 0.0
        self.base_store = shutil.disk_usage("/dev/shm").used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.Process().children(recursive=True):  # this run's Ray instance only
                try:
                    name, memory = " ".join(proc.cmdline()).strip(), proc.memory_info()
                except psutil.Error:  # ended meanwhile
                    continue
                if name.startswith("ray::"):
                    self.worker_mib = max(self.worker_mib, memory.rss / 2**20)
                    heap = (memory.rss - memory.shared) / 2**20
                    if heap > self.heap_mib:
                        self.heap_mib, self.heap_process = heap, name
            self.store_mib = max(self.store_mib, (shutil.disk_usage("/dev/shm").used - self.base_store) / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def rows_of(path: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(path.rglob("*.parquet")))


def build_stages(work: Path, tokenizer_dir: Path):
    """(name, run, parquet output or None) of each stage, in order, on the run folder `work`."""
    from alignx_ray.build.assemble import AssembleConfig, run_assemble
    from alignx_ray.build.pairs import PairsConfig, run_pairs
    from alignx_ray.build.personas import PersonaConfig, run_personas
    from alignx_ray.build.stats_report import write_split_statistics
    from alignx_ray.common import prompts
    from alignx_ray.common.config import PoolConfig
    from alignx_ray.common.space import SPACE
    from alignx_ray.train.dpo_config import TrainConfig
    from alignx_ray.train.dpo_data import prepare_training_data

    cores = psutil.cpu_count() or 2
    pool = PoolConfig(batch_size=4096, concurrency=(1, max(1, cores // 2)), num_cpus=1)
    personas = PersonaConfig(pool=pool)

    def training_data() -> None:
        for method in ("ica", "pba"):
            config = TrainConfig(method=method, prepare=pool.model_copy(update={"batch_size": 1}))
            train, out = str(work / "dataset" / "train"), work / "training" / method
            prepare_training_data(config, train, str(tokenizer_dir), prompts.PromptTemplates(), out)

    return [
        ("pairs", lambda: run_pairs(PairsConfig(), work / "annotate", work / "pairs"), work / "pairs" / "data"),
        (
            "personas",
            lambda: run_personas(personas, work / "annotate", work / "pairs", work / "personas"),
            work / "personas" / "data",
        ),
        (
            "assemble",
            lambda: run_assemble(
                AssembleConfig(), work / "annotate", work / "pairs", work / "personas", None, work / "dataset"
            ),
            work / "dataset" / "train",
        ),
        (
            "statistics",
            lambda: write_split_statistics(work / "dataset" / "train", work / "dataset" / "stats", SPACE),
            None,
        ),
        ("training_data", training_data, work / "training"),
    ]


def measure_size(responses: int, scratch: Path, tokenizer_dir: Path, seed: int) -> dict:
    import ray

    from alignx_ray.fixtures import synthetic

    work = scratch / f"n{responses}"
    started = time.time()
    n_threads = max(1, round(responses / RESPONSES_PER_THREAD))
    config = synthetic.SyntheticConfig(n_threads=n_threads, n_users=max(120, n_threads // 10), seed=seed)
    # Generated in a task: the corpus is the input, and its memory is not the driver's.
    generate = ray.remote(synthetic.write_planted_annotations)
    written = ray.get(generate.remote(config, work / "annotate" / "data"))
    figures = {"responses": written, "threads": n_threads, "generate_seconds": round(time.time() - started, 1)}
    stages = {}
    for name, run, output in build_stages(work, tokenizer_dir):
        reset_peak()
        with Sampler() as sampler:
            t0 = time.time()
            run()
            seconds = time.time() - t0
        stages[name] = {
            "seconds": round(seconds, 2),
            "driver_peak_rss_mib": round(vm_hwm_mib(), 1),
            "max_worker_rss_mib": round(sampler.worker_mib, 1),
            "max_worker_heap_mib": round(sampler.heap_mib, 1),
            "max_heap_process": sampler.heap_process,
            "object_store_peak_mib": round(sampler.store_mib, 1),
            "rows_out": rows_of(output) if output else None,
        }
        print(f"  {written:>9} responses  {name:14s} {json.dumps(stages[name])}", flush=True)
    # Retrieval's work is queries x pool (every pair against every response, and every pair):
    # its rate, a lower bound since the stage's seconds include more than the searches.
    persona = stages["personas"]
    persona["comparisons"] = persona["rows_out"] * (written + persona["rows_out"])
    persona["comparisons_per_second"] = round(persona["comparisons"] / max(persona["seconds"], 1e-3))
    shutil.rmtree(work, ignore_errors=True)
    return {
        **figures,
        "total_seconds": round(sum(s["seconds"] for s in stages.values()), 2),
        "driver_peak_rss_mib": max(s["driver_peak_rss_mib"] for s in stages.values()),
        "max_worker_peak_rss_mib": max(s["max_worker_rss_mib"] for s in stages.values()),
        "max_worker_peak_heap_mib": max(s["max_worker_heap_mib"] for s in stages.values()),
        "object_store_peak_mib": max(s["object_store_peak_mib"] for s in stages.values()),
        "stages": stages,
    }


def growth(sizes: list[dict]) -> list[dict]:
    """Per consecutive sizes: each stage's time ratio and exponent (log t2/t1 / log n2/n1)."""
    out = []
    for small, large in zip(sizes, sizes[1:]):
        n = math.log(large["responses"] / small["responses"])
        per_stage = {}
        for name, stage in large["stages"].items():
            before = max(small["stages"][name]["seconds"], 1e-3)
            ratio = stage["seconds"] / before
            per_stage[name] = {"time_ratio": round(ratio, 2), "exponent": round(math.log(max(ratio, 1e-9)) / n, 2)}
        out.append({"from": small["responses"], "to": large["responses"], "stages": per_stage})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--out", help="also write the JSON object here")
    args = parser.parse_args()

    from alignx_ray.common.config import RayConfig
    from alignx_ray.common.raydata import init_ray

    ray = init_ray(RayConfig(num_cpus=args.num_cpus))

    @ray.remote
    def tiny_tokenizer(path: Path) -> Path:
        """Built in a task, so torch is never imported here and the driver's RSS is the pipeline's."""
        from alignx_ray.fixtures.tiny import build_tiny_model

        return build_tiny_model(path)

    scratch = Path(tempfile.mkdtemp(prefix="alignx-scale-"))
    tokenizer_dir = ray.get(tiny_tokenizer.remote(scratch / "tiny"))
    result = {"machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB", "sizes": []}
    for responses in args.responses:
        print(f"{responses} responses", flush=True)
        result["sizes"].append(measure_size(responses, scratch, tokenizer_dir, args.seed))
        result["growth"] = growth(result["sizes"])
        if args.out:  # after every size, so a long run keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
