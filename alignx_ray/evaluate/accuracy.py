"""Evaluation of ICA and PBA models (paper §6): alignment accuracy, preference reversal,
history-size sweep and the calibration of inferred P~.

The official accuracy rule: per example, the summed (not length-normalised) log-probability
of the response tokens given the prompt; reward = policy minus reference, for chosen and for
rejected; correct iff the chosen reward is strictly greater. Scoring runs as a Ray Data actor
pool (`LogprobScorer`, on CPUs or GPUs) checkpointed by row id, so a re-run resumes. Outputs:
`OUT/scores.parquet` (one row per example and variant, the four summed log-probs) and
`OUT/metrics.json`, whose every accuracy can be recomputed from the scores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignx_ray.common import prompts
from alignx_ray.common.config import resolve_local
from alignx_ray.common.raydata import claim_workdir, map_resumable
from alignx_ray.common.seeding import fingerprint
from alignx_ray.common.space import SPACE, PreferenceSpace
from alignx_ray.engines.logprobs import SCORE_COLUMNS, load_models, reward_margin, score_pairs
from alignx_ray.evaluate.eval_config import EvalConfig
from alignx_ray.evaluate.examples import build_variants, calibration, read_examples, variant_table


class LogprobScorer:
    """Ray Data actor: both models loaded once, then the four summed log-probs per row."""

    def __init__(self, policy: str, reference: str, dtype: str, batch_size: int):
        self.policy, self.reference, self.tokenizer = load_models(policy, reference, dtype)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = score_pairs(
            self.policy,
            self.reference,
            self.tokenizer,
            batch.column("prompt_text").to_pylist(),
            batch.column("chosen").to_pylist(),
            batch.column("rejected").to_pylist(),
            self.batch_size,
        )
        for name in SCORE_COLUMNS:
            batch = batch.append_column(name, pa.array(scores[name], pa.float64()))
        return batch


def wilson_interval(correct: int, n: int, z: float = 1.96) -> list[float] | None:
    """The 95 % Wilson score interval of a proportion correct / n (sound at small n and near
    0 or 1, where the normal approximation is not)."""
    if n == 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(centre - half), 4), round(float(centre + half), 4)]


def accuracy_figures(margins: np.ndarray) -> dict:
    correct = int(np.sum(margins > 0))
    return {
        "accuracy": correct / len(margins) if len(margins) else None,
        "ci95": wilson_interval(correct, len(margins)),
        "n": int(len(margins)),
        "ties": int(np.sum(margins == 0)),
    }


def metrics(scores: pa.Table, config: EvalConfig) -> dict:
    """Accuracy per (persona, history) on the original preferences and on the reversed ones,
    with the flip rate: how often the model's order of y_w and y_l inverts (strictly) when
    the persona is reversed, i.e. the two margins have the same sign (Table 5).

    `starting_model`: the same figures for the reference alone, whose own order is its summed
    log-probabilities (chosen minus rejected): what the model knew before training."""
    rows = scores.to_pylist()
    columns = {k: [r[k] for r in rows] for k in SCORE_COLUMNS}
    out = grouped_metrics(rows, reward_margin(columns), config)
    starting = grouped_metrics(
        rows, np.asarray(columns["reference_chosen"]) - np.asarray(columns["reference_rejected"]), config
    )
    out["starting_model"] = {k: starting[k] for k in ("accuracy", "n", "persona", "reversal")}
    return out


def grouped_metrics(rows: list[dict], margins: np.ndarray, config: EvalConfig) -> dict:
    """`metrics` of one margin per scored row."""
    groups: dict[tuple, dict[bool, dict[str, float]]] = {}
    for r, m in zip(rows, margins):
        groups.setdefault((r["persona"], r["history"]), {}).setdefault(r["reversed"], {})[r["example_id"]] = m
    out = {"groups": []}
    for (persona, history), by_kind in groups.items():
        original, reversed_ = by_kind.get(False, {}), by_kind.get(True, {})
        group = {"persona": persona, "history": history, **accuracy_figures(np.array(list(original.values())))}
        if reversed_:
            both = [(original[e], m) for e, m in reversed_.items() if e in original]
            group["reversed"] = {
                **accuracy_figures(np.array(list(reversed_.values()))),
                "flip_rate": float(np.mean([a * b > 0 for a, b in both])) if both else None,
            }
        out["groups"].append(group)
    default_history = config.history_sizes[0]
    head = next((g for g in out["groups"] if g["history"] == default_history), {})  # the first persona type scored
    out.update({"accuracy": head.get("accuracy"), "n": head.get("n", 0)})
    out["persona"] = {
        g["persona"]: {k: g[k] for k in ("accuracy", "ci95", "n", "ties")}
        for g in out["groups"]
        if g["history"] == default_history
    }
    if len(config.history_sizes) > 1:
        out["history"] = {
            str(g["history"] or "all"): {k: g[k] for k in ("accuracy", "n", "ties")}
            for g in out["groups"]
            if g["persona"] == head.get("persona")
        }
    out["reversal"] = {
        g["persona"]: g["reversed"] for g in out["groups"] if "reversed" in g and g["history"] == default_history
    }
    return out


def percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def metrics_markdown(figures: dict) -> str:
    """The accuracy table of one evaluation (and the calibration table when there is one)."""
    lines = [
        f"**{figures['method'].upper()}** on `{figures['benchmark']}`: alignment accuracy (%)",
        "",
        "| persona | history | accuracy | n | ties | reversed accuracy | flip rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in figures["groups"]:
        rev = g.get("reversed", {})
        lines.append(
            f"| {g['persona']} | {g['history'] or 'all'} | {percent(g['accuracy'])} | {g['n']} | {g['ties']} | "
            f"{percent(rev.get('accuracy'))} | {percent(rev.get('flip_rate'))} |"
        )
    if "calibration" in figures:
        lines += ["", "Inferred P~ against gold (%)", "", "| category | precision | recall |", "|---|---|---|"]
        lines += [
            f"| {name} | {percent(c['precision'])} | {percent(c['recall'])} |"
            for name, c in figures["calibration"].items()
        ]
    return "\n".join(lines)


def run_evaluation(
    config: EvalConfig,
    benchmark: str,
    method: str,
    policy: str,
    reference: str,
    out_dir: Path,
    templates: prompts.PromptTemplates = prompts.PromptTemplates(),
    annotator: Callable[[], str] | None = None,
    space: PreferenceSpace = SPACE,
) -> dict:
    """Evaluate one method on one benchmark file; writes scores.parquet and metrics.json.
    `annotator` gives the model that infers P~ when needed (None: the policy)."""
    from transformers import AutoTokenizer

    started = time.time()
    examples, rejected = read_examples(benchmark, config, out_dir, space)
    variants = build_variants(examples, config)
    table, calibration_pairs = variant_table(
        variants, method, config, AutoTokenizer.from_pretrained(policy), templates, annotator or (lambda: policy), space
    )
    scored = score_resumable(table, config, policy, reference, out_dir / "_scoring")
    pq.write_table(scored, out_dir / "scores.parquet")
    figures = {
        "benchmark": str(benchmark),
        "method": method,
        "policy": policy,
        "reference": reference,
        **metrics(scored, config),
        "examples": len(examples),
        "rejected": rejected,
        "variants_scored": scored.num_rows,
        "seconds": round(time.time() - started, 1),
    }
    if calibration_pairs:
        figures["calibration"] = calibration(calibration_pairs)
    figures["markdown"] = metrics_markdown(figures)
    (out_dir / "metrics.json").write_text(json.dumps(figures, indent=1))
    return figures


def score_resumable(table: pa.Table, config: EvalConfig, policy: str, reference: str, work: Path) -> pa.Table:
    """Score the variants on a Ray Data actor pool, resuming a killed run of the same inputs;
    returns them in their original order with the four score columns."""
    key = fingerprint(
        config.dtype, policy, reference, table.column("row_id").to_pylist(), table.column("prompt_text").to_pylist()
    )
    if not claim_workdir(work, key) or not (work / "variants.parquet").exists():
        pq.write_table(table, work / "variants.parquet")
    map_resumable(
        work / "variants.parquet",
        work / "scored",
        "row_id",
        LogprobScorer,
        {
            "policy": resolve_local(policy),
            "reference": resolve_local(reference),
            "dtype": config.dtype,
            "batch_size": config.pool.batch_size,
        },
        config.pool,
    )
    scored = pq.read_table(work / "scored")
    order = {rid: i for i, rid in enumerate(table.column("row_id").to_pylist())}
    return scored.take(np.argsort([order[r] for r in scored.column("row_id").to_pylist()]))
