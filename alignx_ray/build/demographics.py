"""Demographic personas P_DEMO (paper §4.2, Algorithm 1 line 10, Prompt #2).

An LLM reads the post and the pair and describes who would prefer y_w over y_l, answering
in JSON constrained by a schema (vLLM structured outputs): a reason, a textual persona,
labels for the dimensions it can observe, and liked / disliked interest keywords. The labels
and keywords map to a direction over the space; the persona is kept when that direction is
consistent with the pair's (`personas.consistent`). An unusable or inconsistent answer is
sampled again with the next seed; after `attempts` the pair goes on without P_DEMO and the
reason is recorded in `_rejected`. A pair whose prompt is over the engine's max_model_len is
not sent (vLLM would fail its whole batch) and goes on without P_DEMO too, with its reason.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alignx_ray.build.personas import consistent
from alignx_ray.common import prompts
from alignx_ray.common.config import PoolConfig, Section
from alignx_ray.common.raydata import map_resumable, write_rejected
from alignx_ray.common.schema import DEMOGRAPHICS_SCHEMA
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import NEUTRAL, SPACE, PreferenceSpace
from alignx_ray.engines.generation import VllmGenerator
from alignx_ray.engines.scoring import EngineConfig, vllm_engine_processes

REQUIRED_KEYS = ("reason", "textual persona", "dimension description", "like keywords", "dislike keywords")


class DemographicsConfig(Section):
    """The P_DEMO stage.

    engine: the generation model on vLLM (model None: the run's annotation model).
    max_tokens / temperature: sampling of one answer; every attempt has its own seed.
    attempts: answers tried per pair before it goes on without P_DEMO.
    pool: the engine actors (batch_size pairs per call).
    """

    engine: EngineConfig = EngineConfig()
    max_tokens: int = 1024
    temperature: float = 0.7
    attempts: int = 3
    pool: PoolConfig = PoolConfig(batch_size=256, concurrency=(1, 16), num_cpus=4, num_gpus=1)
    seed: int = 0


def parse_demographic(text: str, space: PreferenceSpace = SPACE) -> tuple[str, np.ndarray]:
    """Prompt #2's JSON answer -> (demographic text, direction over the space).

    A dimension label sets its dimension to 1.0 (first label) or 0.0 (second); a liked
    keyword sets its interest dimension to 1.0, a disliked one to 0.0; everything else is
    neutral. Occupation is free text without a dimension. Keywords outside the space are
    ignored (the model may name any interest). Raises ValueError with the reason.
    """
    try:
        answer = json.loads(text, strict=False)  # grammars may let raw control characters into strings
    except json.JSONDecodeError as e:
        raise ValueError(f"not_json: {e.msg}") from None
    if not isinstance(answer, dict):
        raise ValueError("not_an_object")
    missing = [k for k in REQUIRED_KEYS if k not in answer]
    if missing:
        raise ValueError(f"missing_keys: {missing}")
    persona, labels = answer["textual persona"], answer["dimension description"]
    if not isinstance(persona, str) or not persona.strip():
        raise ValueError("empty_textual_persona")
    if not isinstance(labels, dict):
        raise ValueError("dimension_description_not_an_object")
    direction = np.full(len(space), NEUTRAL)
    by_name = {d.name: i for i, d in enumerate(space) if d.demo_labels}
    for name, label in labels.items():
        if name == "Occupation":
            continue
        if name not in by_name:
            raise ValueError(f"unknown_dimension: {name!r}")
        options = space[by_name[name]].demo_labels
        if label not in options:
            raise ValueError(f"unknown_label: {name!r}: {label!r}")
        direction[by_name[name]] = 1.0 if label == options[0] else 0.0
    by_keyword = {d.keyword.lower(): i for i, d in enumerate(space) if d.keyword}
    for key, value in (("like keywords", 1.0), ("dislike keywords", 0.0)):
        if not isinstance(answer[key], str):
            raise ValueError(f"bad_type: {key!r}")
        for word in filter(None, (w.strip().lower() for w in answer[key].split(","))):
            i = by_keyword.get(word)
            if i is not None:
                if direction[i] not in (NEUTRAL, value):
                    raise ValueError(f"keyword_liked_and_disliked: {word!r}")
                direction[i] = value
    return persona.strip(), direction


def judge_answer(text: str, finished: bool, pair_direction: np.ndarray, space: PreferenceSpace):
    """(demographic text, direction, None) for a usable answer, else (None, None, reason)."""
    if not finished:
        return None, None, "cut_at_max_tokens"
    try:
        persona, direction = parse_demographic(text, space)
    except ValueError as e:
        return None, None, str(e)
    if not consistent(direction, pair_direction)[0]:
        return None, None, "inconsistent_with_pair"
    return persona, direction, None


def demographics_batch(
    generator,
    tokenizer,
    pairs: pa.Table,
    config: DemographicsConfig,
    templates: prompts.PromptTemplates,
    space: PreferenceSpace = SPACE,
) -> pa.Table:
    """P_DEMO for a batch of pairs: up to `attempts` answers each, retried pairs only."""
    rows = pairs.select(["pair_id", "prompt", "chosen", "rejected", "direction"]).to_pylist()
    schema = prompts.demographic_json_schema(space)
    texts = {
        r["pair_id"]: prompts.render_chat(
            tokenizer, prompts.demographic_prompt(templates, r["prompt"], r["chosen"], r["rejected"], space)
        )
        for r in rows
    }
    lengths = {pair: len(tokenizer.encode(text, add_special_tokens=False)) for pair, text in texts.items()}
    limit = generator.max_prompt_tokens
    out = {
        r["pair_id"]: {
            "pair_id": r["pair_id"],
            "demo_text": None,
            "demo_direction": None,
            "demo_raw": None,
            "demo_attempts": 0,
            "reject_reason": None
            if lengths[r["pair_id"]] <= limit
            else f"prompt_too_long: {lengths[r['pair_id']]} tokens > {limit}",
        }
        for r in rows
    }
    pending = [r for r in rows if out[r["pair_id"]]["reject_reason"] is None]
    for attempt in range(config.attempts):
        if not pending:
            break
        seeds = [int(seeded_rng("demo", config.seed, r["pair_id"], attempt).integers(1 << 31)) for r in pending]
        answers = generator.generate(
            [texts[r["pair_id"]] for r in pending], seeds, config.max_tokens, config.temperature, schema
        )
        still = []
        for r, (text, finished) in zip(pending, answers):
            persona, direction, reason = judge_answer(text, finished, np.asarray(r["direction"]), space)
            row = out[r["pair_id"]]
            row.update(demo_raw=text, demo_attempts=attempt + 1, reject_reason=reason)
            if reason is None:
                row.update(demo_text=persona, demo_direction=direction.tolist())
            else:
                still.append(r)
        pending = still
    return pa.Table.from_pylist(list(out.values()), DEMOGRAPHICS_SCHEMA)


class DemographicsUDF:
    """Ray Data actor owning one vLLM generator."""

    def __init__(
        self, config: DemographicsConfig, model_path: str, templates: prompts.PromptTemplates, space: PreferenceSpace
    ):
        from transformers import AutoTokenizer

        self.config, self.templates, self.space = config, templates, space
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.generator = VllmGenerator(config.engine, model_path)

    def engine_processes(self) -> list:
        """For `ActorGuard`: the processes the engine runs in besides this one."""
        return vllm_engine_processes()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return demographics_batch(self.generator, self.tokenizer, batch, self.config, self.templates, self.space)


def run_demographics(
    config: DemographicsConfig,
    pairs_dir: Path,
    out_dir: Path,
    model_path: str,
    templates: prompts.PromptTemplates,
    space: PreferenceSpace = SPACE,
) -> dict:
    """P_DEMO for every pair; resumable by `pair_id`; unusable answers counted by reason."""
    started = time.time()
    faults = map_resumable(
        pairs_dir / "data",
        out_dir / "data",
        "pair_id",
        DemographicsUDF,
        dict(config=config, model_path=model_path, templates=templates, space=space),
        config.pool,
    )
    table = pq.read_table(out_dir / "data", columns=["pair_id", "reject_reason", "demo_attempts"])
    bad = table.filter(pc.is_valid(table["reject_reason"]))
    write_rejected(
        out_dir,
        "demographics",
        [
            {"reason": r.split(":")[0], "detail": r, "response_id": p}
            for p, r in zip(bad["pair_id"].to_pylist(), bad["reject_reason"].to_pylist())
        ],
    )
    reasons = Counter(r.split(":")[0] for r in bad["reject_reason"].to_pylist())
    return {
        "pairs": table.num_rows,
        "with_demographic": table.num_rows - bad.num_rows,
        "without_demographic": bad.num_rows,
        "attempts_mean": round(pc.mean(table["demo_attempts"]).as_py() or 0, 2),
        "reasons": dict(reasons),
        "seconds": round(time.time() - started, 2),
        **faults,
    }
