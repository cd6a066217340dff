"""Annotation speed on this machine, side by side in one run (tiny model, CPU by default).

Measures, on the same generated responses:
  - the bare engine in this process vs the Ray Data job (actor pool, checkpoints, parquet in
    and out) with the same engine (the packed tree, the CPU default), start-up and model load
    included, in three layouts: one actor of 1 CPU vs the bare engine at 1 torch thread (the
    headline `ray_job_overhead_ratio`: nothing differs but Ray Data); one actor of every core
    vs the bare engine at every core (its torch threads then share the cores with Ray's own
    processes, and each parallel region waits for its slowest thread); one actor per core vs
    the bare 1-thread engine's time divided by the actors (perfect scaling). Ray turns an
    actor's CPUs into its torch threads;
  - vLLM with prefix caching and the warm-up pass vs without: what sharing the prefix saves
    (on fewer responses: the CPU build is slow);
  - the transformers packed tree vs 90 independent prompts.
Prints a table, then one JSON object of figures as the last line.

    python benchmarks/annotation.py --threads 100   # about 550 responses
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=100, help="generated threads; all their responses are scored")
    parser.add_argument("--batch", type=int, default=8, help="responses per engine call / Ray Data batch")
    parser.add_argument("--plain-responses", type=int, default=4, help="responses for the slow 90-prompt path")
    parser.add_argument("--vllm-responses", type=int, default=8, help="responses for the vLLM comparison")
    args = parser.parse_args()

    from dataclasses import replace

    import torch
    from transformers import AutoTokenizer

    from alignx_ray.common import prompts
    from alignx_ray.common.config import load_config
    from alignx_ray.engines.labelling import QuestionBank, label_batch
    from alignx_ray.engines.scoring import make_engine
    from alignx_ray.fixtures import synthetic
    from alignx_ray.fixtures.tiny import build_tiny_model
    from alignx_ray.run import Run, RunConfig

    # The CPU settings are the demo's (code defaults are a GPU node's).
    demo = load_config(RunConfig, Path(__file__).parents[1] / "configs" / "demo.yaml")

    def cpu_engine(**fields):
        return demo.annotate.engine.model_copy(update=fields)

    work = Path(tempfile.mkdtemp(prefix="alignx-bench-"))
    model = str(build_tiny_model(work / "model"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    bank = QuestionBank(tokenizer, prompts.PromptTemplates())
    threads = replace(synthetic.SyntheticConfig(), n_threads=args.threads, seed=11)
    examples = list(synthetic.iter_examples(threads))
    posts, comments = [e[0] for e in examples], [e[1] for e in examples]
    unique_tokens = sum(bank.request(p, c).unique_tokens() for p, c, _ in examples)

    def run_engine(engine, n=len(examples)) -> float | None:
        """Score the first n responses; the share of prompt tokens a prefix cache served."""
        cached = prompted = 0
        for i in range(0, n, args.batch):
            out = label_batch(engine, bank, posts[i : min(i + args.batch, n)], comments[i : min(i + args.batch, n)])
            cached += sum(c or 0 for c in out["cached_tokens"])
            prompted += sum(out["prompt_tokens"])
        return cached / prompted if None not in out["cached_tokens"] else None

    cores = torch.get_num_threads()
    figures = {
        "device": "cpu",
        "responses": len(examples),
        "D": len(bank.questions),
        "torch_threads": cores,
        "mean_prefix_tokens": round(sum(len(bank.prefix(p, c)) for p, c, _ in examples) / len(examples), 1),
        "mean_question_tokens": round(sum(map(len, bank.questions)) / len(bank.questions), 1),
    }

    tree = make_engine(cpu_engine(kind="transformers"), model, tokenizer)
    for threads_per_engine in sorted({1, cores}):
        torch.set_num_threads(threads_per_engine)
        _, t = timed(lambda: run_engine(tree))
        figures[f"bare_tree_engine_{threads_per_engine}_threads_s_per_response"] = t / len(examples)
    torch.set_num_threads(cores)
    figures["bare_tree_engine_unique_tokens_per_s"] = (
        unique_tokens / figures[f"bare_tree_engine_{cores}_threads_s_per_response"] / len(examples)
    )
    plain = make_engine(cpu_engine(kind="transformers-plain"), model, tokenizer)
    _, t = timed(lambda: run_engine(plain, args.plain_responses))
    figures["plain_90_prompts_s_per_response"] = t / args.plain_responses

    from alignx_ray.common.raydata import init_ray

    def job_seconds(actors: int, cpus_per_actor: int) -> float:
        """The annotate stage on these rows, in a run of its own (start-up and model load included)."""
        pool = demo.annotate.pool.model_copy(
            update={"batch_size": args.batch, "concurrency": (actors, actors), "num_cpus": cpus_per_actor}
        )
        annotate = demo.annotate.model_copy(
            update={"engine": cpu_engine(kind="transformers", model=model), "pool": pool}
        )
        run = Run(
            demo.model_copy(update={"threads": threads, "annotate": annotate}), work / f"run-{actors}x{cpus_per_actor}"
        )
        run.ingest()
        init_ray(run.config.ray)
        job, t = timed(run.annotate)
        assert job["labelled"] == len(examples), "the job must score the same rows as the bare engine"
        return t

    # One layout per figure: each job beside the bare engine with the same torch threads per engine.
    for actors, cpus_per_actor in sorted({(1, 1), (1, cores), (cores, 1)}):
        t = job_seconds(actors, cpus_per_actor)
        name = f"ray_job_{actors}x{cpus_per_actor}"
        figures[f"{name}_s_per_response"] = t / len(examples)
        bare = figures[f"bare_tree_engine_{cpus_per_actor}_threads_s_per_response"] / actors
        figures[f"{name}_over_bare"] = figures[f"{name}_s_per_response"] / bare
    figures["ray_job_overhead_ratio"] = figures["ray_job_1x1_over_bare"]
    # vLLM last: its in-process CPU engine leaves threads behind that would share the cores
    # with everything measured after it.
    n_vllm = min(args.vllm_responses, len(examples))
    for name, sharing in (("vllm_prefix_sharing", True), ("vllm_no_prefix_sharing", False)):
        engine = make_engine(cpu_engine(kind="vllm", prefix_caching=sharing), model, tokenizer)
        run_engine(engine, 1)  # warm-up: the first call compiles and allocates
        hit_rate, t = timed(lambda engine=engine: run_engine(engine, n_vllm))
        figures[f"{name}_s_per_response"] = t / n_vllm
        if sharing:
            figures["vllm_prefix_cache_hit_rate"] = hit_rate
        del engine

    figures["vllm_prefix_sharing_speedup"] = (
        figures["vllm_no_prefix_sharing_s_per_response"] / figures["vllm_prefix_sharing_s_per_response"]
    )
    figures["tree_speedup_vs_plain"] = (
        figures["plain_90_prompts_s_per_response"] / figures[f"bare_tree_engine_{cores}_threads_s_per_response"]
    )

    print(f"\n{'measure':45s} value")
    for key, value in figures.items():
        print(f"{key:45s} {value:.4g}" if isinstance(value, float) else f"{key:45s} {value}")
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
