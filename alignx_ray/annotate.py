"""Annotation: every response labelled on every dimension of the space (paper §4.1 step 1).

Pure core: `QuestionBank` (token ids of the prompt segments) and `label_batch` (a batch of
responses -> levels and option probabilities through any `ScoringEngine`). Ray layer:
`AnnotateUDF`, a stateful Ray Data actor that owns one engine, and `run_annotate`, which
maps it over the responses table with an autoscaling actor pool and checkpoints by
`response_id`, so a re-run after a kill skips what was already written.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignx_ray import prompts
from alignx_ray.config import RayConfig, Section, SpaceConfig
from alignx_ray.engines import EngineConfig, ScoreRequest, make_engine
from alignx_ray.space import LEVEL_HIGH, LEVEL_LOW, LEVEL_MEDIAN, SPACE

# Argmax option index -> level: (1) high = 3, (2) low = 1, (3) cannot reflect = 2.
OPTION_INDEX_TO_LEVEL = np.array([LEVEL_HIGH, LEVEL_LOW, LEVEL_MEDIAN], dtype=np.uint8)
REJECT_COLUMN = "reject_reason"


class QuestionBank:
    """Token ids of every annotation segment, computed once per tokenizer and space."""

    def __init__(self, tokenizer, templates: prompts.PromptTemplates, space=SPACE):
        self.tokenizer = tokenizer
        self.layout = prompts.annotation_layout(tokenizer, templates, space)
        self.head = self.encode(self.layout.head)
        self.questions = [self.encode(self.layout.branch(prompts.format_question(d, templates))) for d in space]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prefix(self, post: str, comment: str) -> list[int]:
        return self.head + self.encode(self.layout.post_part(post)) + self.encode(self.layout.comment_part(comment))

    def request(self, post: str, comment: str, dims: list[int] | None = None) -> ScoreRequest:
        questions = self.questions if dims is None else [self.questions[d] for d in dims]
        return ScoreRequest(self.prefix(post, comment), questions)


def levels_from_probs(probs: np.ndarray) -> np.ndarray:
    """(..., 3) option probabilities -> (...) uint8 levels by argmax."""
    return OPTION_INDEX_TO_LEVEL[np.asarray(probs).argmax(-1)]


def label_batch(engine, bank: QuestionBank, posts, responses, max_prompt_tokens: int | None = None) -> dict:
    """Label a batch of responses; over-long prompts are marked with a reject reason."""
    requests = [bank.request(p, r) for p, r in zip(posts, responses)]
    longest_question = max(map(len, bank.questions))
    too_long = [max_prompt_tokens is not None and len(q.prefix) + longest_question > max_prompt_tokens
                for q in requests]
    scored = iter(engine.score([q for q, bad in zip(requests, too_long) if not bad]))
    # vLLM says how many prompt tokens its prefix cache served; other engines share by design.
    cached_tokens = iter(getattr(engine, "cached_tokens", None) or [])
    n_dims = len(bank.questions)
    levels, probs, reasons, cached = [], [], [], []
    for q, bad in zip(requests, too_long):
        if bad:
            levels.append(np.zeros(0, np.uint8))
            probs.append(np.zeros((0, 3), np.float32))
            reasons.append(f"prompt_too_long: {len(q.prefix)} prefix tokens + questions > {max_prompt_tokens}")
            cached.append(None)
        else:
            p = next(scored)
            assert p.shape == (n_dims, 3)
            levels.append(levels_from_probs(p))
            probs.append(p.astype(np.float32))
            reasons.append(None)
            cached.append(next(cached_tokens, None))
    return {
        "levels": levels,
        "option_probs": probs,
        REJECT_COLUMN: reasons,
        "unique_tokens": [q.unique_tokens() for q in requests],
        "prompt_tokens": [len(q.prefix) * len(q.branches) + sum(map(len, q.branches)) for q in requests],
        "cached_tokens": cached,
    }


class AnnotateConfig(Section):
    """The annotation stage.

    engine: which scorer and how it is set up (see `EngineConfig`).
    batch_responses: responses per actor call; a response's questions always stay together.
    concurrency: (min, max) actors; Ray Data scales the pool between them with the backlog.
    num_gpus / num_cpus: resources per actor (num_gpus = tensor_parallel_size on GPUs).
    max_prompt_tokens: longest prompt the engine takes (None: the engine's own limit).
    """

    engine: EngineConfig = EngineConfig()
    batch_responses: int = 8
    concurrency: tuple[int, int] = (1, 1)
    num_gpus: float = 0
    num_cpus: float = 1
    max_prompt_tokens: int | None = 2048


class AnnotateUDF:
    """Ray Data actor: loads the tokenizer and engine once, then labels batches."""

    def __init__(self, config: AnnotateConfig, model_path: str, templates: prompts.PromptTemplates,
                 space: SpaceConfig):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.config = config
        self.bank = QuestionBank(tokenizer, templates, space.build())
        self.engine = make_engine(config.engine, model_path, tokenizer)
        self.model_id = Path(model_path).name if os.path.exists(model_path) else model_path
        self.prompt_version = templates.version

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = label_batch(self.engine, self.bank, batch["post"].to_pylist(), batch["response"].to_pylist(),
                          self.config.max_prompt_tokens)
        n = batch.num_rows
        return batch.append_column("levels", pa.array([lv.tolist() for lv in out["levels"]], pa.list_(pa.uint8()))) \
            .append_column("option_probs", pa.array([p.tolist() for p in out["option_probs"]],
                                                    pa.list_(pa.list_(pa.float32(), 3)))) \
            .append_column(REJECT_COLUMN, pa.array(out[REJECT_COLUMN], pa.string())) \
            .append_column("unique_tokens", pa.array(out["unique_tokens"], pa.int64())) \
            .append_column("prompt_tokens", pa.array(out["prompt_tokens"], pa.int64())) \
            .append_column("cached_tokens", pa.array(out["cached_tokens"], pa.int64())) \
            .append_column("engine", pa.array([self.engine.name] * n)) \
            .append_column("model", pa.array([self.model_id] * n)) \
            .append_column("prompt_version", pa.array([self.prompt_version] * n))


def run_annotate(config: AnnotateConfig, responses_dir: Path, out_dir: Path, model_path: str,
                 templates: prompts.PromptTemplates, space: SpaceConfig) -> dict:
    """Map the annotation actor over the responses table; resumable by `response_id`.

    Output: `out_dir/data/*.parquet` (one row per response, input columns kept) and rejected
    rows in `out_dir/_rejected/`; the caller writes the manifest last.
    """
    from alignx_ray.raydata import ActorPool, map_resumable

    started = time.time()
    written_before = set((out_dir / "data").glob("*.parquet"))
    map_resumable(responses_dir, out_dir / "data", "response_id", AnnotateUDF,
                  dict(config=config, model_path=model_path, templates=templates, space=space),
                  ActorPool(config.batch_responses, config.concurrency, config.num_cpus, config.num_gpus))
    return finish_stage(out_dir, "annotate", started, written_before)


def finish_stage(out_dir: Path, stage: str, started: float, written_before: set[Path] = frozenset()) -> dict:
    """Split rejected rows out, check every id is present exactly once, write the figures.

    Reads only the bookkeeping columns, so it stays cheap at millions of rows.
    """
    table = pq.read_table(out_dir / "data", columns=["thread_id", "response_id", REJECT_COLUMN, "unique_tokens"])
    ids = table["response_id"]
    if pa.compute.count_distinct(ids).as_py() != len(ids):
        raise RuntimeError(f"{stage}: duplicate ids in {out_dir / 'data'}")
    bad = table.filter(pa.compute.is_valid(table[REJECT_COLUMN]))
    rejected = pa.table({
        "stage": [stage] * bad.num_rows, "reason": bad[REJECT_COLUMN], "thread_id": bad["thread_id"],
        "response_id": bad["response_id"],
    })
    (out_dir / "_rejected").mkdir(parents=True, exist_ok=True)
    pq.write_table(rejected, out_dir / "_rejected" / f"{stage}.parquet")
    seconds = time.time() - started
    new_files = sorted(set((out_dir / "data").glob("*.parquet")) - set(written_before))
    counted = ["unique_tokens", "prompt_tokens", "cached_tokens"]
    now = pq.read_table(new_files, columns=counted) if new_files else pa.table({c: pa.array([], pa.int64())
                                                                                for c in counted})
    done_now = now.num_rows
    tokens_now = pa.compute.sum(now["unique_tokens"]).as_py() or 0
    reported = now.filter(pa.compute.is_valid(now["cached_tokens"]))
    prompt_tokens = pa.compute.sum(reported["prompt_tokens"]).as_py()
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
        "prefix_cache_hit_rate": round(pa.compute.sum(reported["cached_tokens"]).as_py() / prompt_tokens, 4)
        if prompt_tokens else None,
    }
