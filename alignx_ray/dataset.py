"""The dataset build on Ray (paper §4): pairs, personas, demographic personas, assembly.

Each function is one stage: it reads the previous stage's parquet, maps a pure core from
`pairs`, `personas`, `demographics` or `assemble` with Ray Data, and writes
`RUN_DIR/<stage>/data/` plus `_rejected/`. Personas and demographics are actor stages
checkpointed by `pair_id` (they resume row by row); pairs (grouping) and assembly (a global
test draw) are cheap and redone whole, with deterministic, id-seeded results.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alignx_ray import prompts
from alignx_ray.assemble import AssembleConfig, assemble_rows, select_test
from alignx_ray.config import Section
from alignx_ray.demographics import DemographicsConfig, demographics_batch
from alignx_ray.ingest import write_rejected
from alignx_ray.pairs import PAIRS_SCHEMA, PairsConfig, thread_pairs
from alignx_ray.personas import PersonaConfig, Pool, persona_rows
from alignx_ray.raydata import ActorPool, map_resumable
from alignx_ray.space import SPACE, PreferenceSpace


class BuildConfig(Section):
    """The dataset build.

    pairs / personas / demographics / assemble: each stage's own settings.
    persona_batch / persona_concurrency / persona_num_cpus: the retrieval actor pool (each
        actor holds both FAISS indexes).
    demographics_enabled: off skips the LLM stage (examples then have no P_DEMO).
    """

    pairs: PairsConfig = PairsConfig()
    personas: PersonaConfig = PersonaConfig()
    demographics: DemographicsConfig = DemographicsConfig()
    assemble: AssembleConfig = AssembleConfig()
    persona_batch: int = 256
    persona_concurrency: tuple[int, int] = (1, 1)
    persona_num_cpus: float = 1
    demographics_enabled: bool = True


def labelled_responses(annotate_dir: Path) -> pa.Table:
    """The annotated responses that have levels (rejected ones are already in annotate/_rejected)."""
    table = pq.read_table(annotate_dir / "data", columns=["thread_id", "response_id", "post", "response", "source",
                                                         "levels", "reject_reason"])
    return table.filter(pc.is_null(table["reject_reason"])).drop_columns(["reject_reason"])


def run_pairs(config: PairsConfig, annotate_dir: Path, out_dir: Path) -> dict:
    """Group by thread, draw pairs per thread (Ray Data `map_groups`), write pairs and rejects."""
    import ray.data

    started = time.time()
    responses = labelled_responses(annotate_dir)

    def per_thread(thread: pa.Table) -> pa.Table:
        pairs, rejected = thread_pairs(thread, config)
        rows = [{**p, "reject": None} for p in pairs] + [
            {"thread_id": r["thread_id"], "reject": f"{r['reason']}: {r['detail']}"} for r in rejected]
        return pa.Table.from_pylist(rows, PAIRS_SCHEMA.append(pa.field("reject", pa.string())))

    out = ray.data.from_arrow(responses).groupby("thread_id").map_groups(per_thread, batch_format="pyarrow")
    blocks = ray.get(out.to_arrow_refs())  # one execution
    table = pa.concat_tables(blocks) if blocks else PAIRS_SCHEMA.append(pa.field("reject", pa.string())).empty_table()
    good = table.filter(pc.is_null(table["reject"])).drop_columns(["reject"]).sort_by("pair_id")
    bad = table.filter(pc.is_valid(table["reject"]))
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(good, out_dir / "data" / "pairs.parquet")
    n_rejected = write_rejected(out_dir, "pairs", [
        {"stage": "pairs", "reason": r.split(":")[0], "detail": r, "thread_id": t}
        for t, r in zip(bad["thread_id"].to_pylist(), bad["reject"].to_pylist())])
    seconds = time.time() - started
    return {"responses_in": responses.num_rows, "threads": len(pc.unique(responses["thread_id"])),
            "pairs": good.num_rows, "threads_rejected": n_rejected, "seconds": round(seconds, 2)}


class PersonaUDF:
    """Ray Data actor holding both pools and their FAISS indexes, built once per actor."""

    def __init__(self, responses_ref: list, pairs_ref: list, config: PersonaConfig):
        import ray

        self.config = config
        self.responses = Pool.of_responses(ray.get(responses_ref[0]))
        self.pairs = Pool.of_pairs(ray.get(pairs_ref[0]))
        self.indexes = (self.responses.index(config.index), self.pairs.index(config.index))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return persona_rows(batch, self.responses, self.pairs, self.indexes, self.config)


def run_personas(config: BuildConfig, annotate_dir: Path, pairs_dir: Path, out_dir: Path) -> dict:
    """P_UGC and P_PAIR for every pair; resumable by `pair_id`."""
    import ray

    started = time.time()
    responses = ray.put(labelled_responses(annotate_dir))
    pairs = ray.put(pq.read_table(pairs_dir / "data"))
    map_resumable(pairs_dir / "data", out_dir / "data", "pair_id", PersonaUDF,
                  dict(responses_ref=[responses], pairs_ref=[pairs], config=config.personas),
                  ActorPool(config.persona_batch, config.persona_concurrency, config.persona_num_cpus, 0))
    table = pq.read_table(out_dir / "data", columns=["ugc", "pair_feedback"])
    ugc, fb = pc.list_value_length(table["ugc"]), pc.list_value_length(table["pair_feedback"])
    return {"pairs": table.num_rows, "seconds": round(time.time() - started, 2),
            "ugc_items_mean": round(pc.mean(ugc).as_py() or 0, 2), "pair_items_mean": round(pc.mean(fb).as_py() or 0, 2),
            "without_ugc": pc.sum(pc.equal(ugc, 0)).as_py() or 0, "without_pair": pc.sum(pc.equal(fb, 0)).as_py() or 0}


class DemographicsUDF:
    """Ray Data actor owning one vLLM generator."""

    def __init__(self, config: DemographicsConfig, model_path: str, templates: prompts.PromptTemplates,
                 space: PreferenceSpace):
        from transformers import AutoTokenizer

        from alignx_ray.engines import VllmGenerator

        self.config, self.templates, self.space = config, templates, space
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.generator = VllmGenerator(config.engine, model_path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return demographics_batch(self.generator, self.tokenizer, batch, self.config, self.templates, self.space)


def run_demographics(config: DemographicsConfig, pairs_dir: Path, out_dir: Path, model_path: str,
                     templates: prompts.PromptTemplates, space: PreferenceSpace = SPACE) -> dict:
    """P_DEMO for every pair; resumable by `pair_id`; unusable answers counted by reason."""
    started = time.time()
    map_resumable(pairs_dir / "data", out_dir / "data", "pair_id", DemographicsUDF,
                  dict(config=config, model_path=model_path, templates=templates, space=space),
                  ActorPool(config.batch_pairs, config.concurrency, config.num_cpus, config.num_gpus))
    table = pq.read_table(out_dir / "data", columns=["pair_id", "reject_reason", "demo_attempts"])
    bad = table.filter(pc.is_valid(table["reject_reason"]))
    write_rejected(out_dir, "demographics", [
        {"stage": "demographics", "reason": r.split(":")[0], "detail": r, "response_id": p}
        for p, r in zip(bad["pair_id"].to_pylist(), bad["reject_reason"].to_pylist())])
    reasons = Counter(r.split(":")[0] for r in bad["reject_reason"].to_pylist())
    return {"pairs": table.num_rows, "with_demographic": table.num_rows - bad.num_rows,
            "without_demographic": bad.num_rows, "attempts_mean": round(pc.mean(table["demo_attempts"]).as_py() or 0, 2),
            "reasons": dict(reasons),
            "seconds": round(time.time() - started, 2)}


def joined_rows(pairs_dir: Path, personas_dir: Path, demographics_dir: Path | None) -> list[dict]:
    """One dict per pair, sorted by pair_id: its pair columns, personas and (when built) P_DEMO."""
    parts = [pq.read_table(personas_dir / "data")]
    if demographics_dir is not None:
        parts.append(pq.read_table(demographics_dir / "data", columns=["pair_id", "demo_text", "demo_direction"]))
    extra = [{r["pair_id"]: r for r in part.to_pylist()} for part in parts]
    return [{**pair, **{k: v for part in extra for k, v in part[pair["pair_id"]].items()}}
            for pair in pq.read_table(pairs_dir / "data").sort_by("pair_id").to_pylist()]


def run_assemble(config: AssembleConfig, pairs_dir: Path, personas_dir: Path, demographics_dir: Path | None,
                 out_dir: Path) -> dict:
    """The AlignX train and test splits (parquet in the official schema) and their rejects."""
    started = time.time()
    rows = joined_rows(pairs_dir, personas_dir, demographics_dir)
    test = select_test(rows, config)
    test_threads = {r["thread_id"] for r in rows if r["pair_id"] in test}
    examples, rejected = assemble_rows(rows, test, test_threads, config)
    for split in ("train", "test"):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(examples.filter(pc.equal(examples["split"], split)), out_dir / split / "part-0.parquet")
    pq.write_table(pa.table({"example_id": list(test), "dimension": [d for d, _ in test.values()],
                             "direction": [v for _, v in test.values()]}), out_dir / "test_cells.parquet")
    write_rejected(out_dir, "assemble", rejected)
    split = examples["split"].to_pylist()
    reasons = Counter(r["reason"] for r in rejected)
    return {"pairs_in": len(rows), "train": split.count("train"), "test": split.count("test"),
            "rejected": len(rejected), "rejected_by_reason": dict(reasons),
            "test_dimensions": len({d for d, _ in test.values()}), "seconds": round(time.time() - started, 2)}

