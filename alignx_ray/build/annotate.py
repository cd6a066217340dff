"""Annotation: every response labelled on every dimension of the space (paper §4.1 step 1).

The pure core is `engines.labelling` (`QuestionBank`, `label_batch`: any scoring engine).
Ray layer: `AnnotateUDF`, a stateful Ray Data actor that owns one engine, and `run_annotate`,
which maps it over the responses table with an autoscaling actor pool and checkpoints by
`response_id`, so a re-run after a kill skips what was already written.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alignx_ray.common import prompts
from alignx_ray.common.config import PoolConfig, Section, SpaceConfig
from alignx_ray.common.raydata import map_resumable, write_rejected
from alignx_ray.common.schema import REJECT_COLUMN
from alignx_ray.engines.labelling import QuestionBank, label_batch
from alignx_ray.engines.scoring import EngineConfig, make_engine, vllm_engine_processes


class AnnotateConfig(Section):
    """The annotation stage.

    engine: which scorer and how it is set up (see `EngineConfig`).
    pool: the engine actors; a batch is `pool.batch_size` responses, whose questions always
        stay together (production: 64 x 90 prompts per call keeps a GPU engine's batch full).
    max_prompt_tokens: longest prompt sent to the engine, capped by the engine's own limit
        (vLLM: max_model_len - 1; None: that limit alone); a response with a longer prompt is
        rejected alone, with its reason, and its batch is labelled.
    """

    engine: EngineConfig = EngineConfig()
    pool: PoolConfig = PoolConfig(batch_size=64, concurrency=(1, 16), num_cpus=4, num_gpus=1)
    max_prompt_tokens: int | None = 4096


class AnnotateUDF:
    """Ray Data actor: loads the tokenizer and engine once, then labels batches."""

    def __init__(self, config: AnnotateConfig, model_path: str, templates: prompts.PromptTemplates, space: SpaceConfig):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.config = config
        self.bank = QuestionBank(tokenizer, templates, space.build())
        self.engine = make_engine(config.engine, model_path, tokenizer)
        self.model_id = Path(model_path).name if os.path.exists(model_path) else model_path
        self.prompt_version = templates.version

    def engine_processes(self) -> list:
        """For `ActorGuard`: the processes the engine runs in besides this one."""
        return vllm_engine_processes()

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = label_batch(
            self.engine,
            self.bank,
            batch["post"].to_pylist(),
            batch["response"].to_pylist(),
            self.config.max_prompt_tokens,
        )
        n = batch.num_rows
        return (
            batch.append_column("levels", pa.array([lv.tolist() for lv in out["levels"]], pa.list_(pa.uint8())))
            .append_column(
                "option_probs", pa.array([p.tolist() for p in out["option_probs"]], pa.list_(pa.list_(pa.float32(), 3)))
            )
            .append_column(REJECT_COLUMN, pa.array(out[REJECT_COLUMN], pa.string()))
            .append_column("unique_tokens", pa.array(out["unique_tokens"], pa.int64()))
            .append_column("prompt_tokens", pa.array(out["prompt_tokens"], pa.int64()))
            .append_column("cached_tokens", pa.array(out["cached_tokens"], pa.int64()))
            .append_column("engine", pa.array([self.engine.name] * n))
            .append_column("model", pa.array([self.model_id] * n))
            .append_column("prompt_version", pa.array([self.prompt_version] * n))
        )


def run_annotate(
    config: AnnotateConfig,
    responses_dir: Path,
    out_dir: Path,
    model_path: str,
    templates: prompts.PromptTemplates,
    space: SpaceConfig,
) -> dict:
    """Map the annotation actor over the responses table; resumable by `response_id`.

    Output: `out_dir/data/*.parquet` (one row per response, input columns kept) and rejected
    rows in `out_dir/_rejected/`; the caller writes the manifest last.
    """
    started = time.time()
    written_before = set((out_dir / "data").glob("*.parquet"))
    faults = map_resumable(
        responses_dir,
        out_dir / "data",
        "response_id",
        AnnotateUDF,
        dict(config=config, model_path=model_path, templates=templates, space=space),
        config.pool,
    )
    return {**finish_stage(out_dir, "annotate", started, written_before), **faults}


def finish_stage(out_dir: Path, stage: str, started: float, written_before: set[Path] = frozenset()) -> dict:
    """Split rejected rows out, check every id is present exactly once, write the figures.

    Reads only the bookkeeping columns, so it stays cheap at millions of rows.
    """
    table = pq.read_table(out_dir / "data", columns=["thread_id", "response_id", REJECT_COLUMN, "unique_tokens"])
    ids = table["response_id"]
    if pc.count_distinct(ids).as_py() != len(ids):
        raise RuntimeError(f"{stage}: duplicate ids in {out_dir / 'data'}")
    bad = table.filter(pc.is_valid(table[REJECT_COLUMN]))
    write_rejected(
        out_dir,
        stage,
        pa.table(
            {
                "reason": bad[REJECT_COLUMN],
                "thread_id": bad["thread_id"],
                "response_id": bad["response_id"],
            }
        ),
    )
    seconds = time.time() - started
    new_files = sorted(set((out_dir / "data").glob("*.parquet")) - set(written_before))
    counted = ["unique_tokens", "prompt_tokens", "cached_tokens"]
    now = (
        pq.read_table(new_files, columns=counted)
        if new_files
        else pa.table({c: pa.array([], pa.int64()) for c in counted})
    )
    done_now = now.num_rows
    tokens_now = pc.sum(now["unique_tokens"]).as_py() or 0
    reported = now.filter(pc.is_valid(now["cached_tokens"]))
    prompt_tokens = pc.sum(reported["prompt_tokens"]).as_py()
    return {
        "responses_in": table.num_rows,
        "labelled": table.num_rows - bad.num_rows,
        "rejected": bad.num_rows,
        "reused_from_checkpoint": table.num_rows - done_now,
        "computed_now": done_now,
        "seconds": round(seconds, 2),
        "responses_per_s": round(done_now / seconds, 3),
        "unique_tokens_per_s": round(tokens_now / seconds, 1),
        # Share of the branch prompts' tokens served from vLLM's prefix cache (None: not vLLM).
        "prefix_cache_hit_rate": round(pc.sum(reported["cached_tokens"]).as_py() / prompt_tokens, 4)
        if prompt_tokens
        else None,
    }
