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
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from alignx_ray import eval_data, prompts
from alignx_ray.config import Section, resolve_local
from alignx_ray.engines import EngineConfig
from alignx_ray.ingest import write_rejected
from alignx_ray.raydata import ActorPool, map_resumable
from alignx_ray.space import SPACE, PreferenceSpace, aggregate_directions, compare_levels, level_to_direction

SCORE_COLUMNS = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")


class EvalConfig(Section):
    """Evaluation of one method on one benchmark file.

    Variants: personas (persona types, each scored separately; `all` is the full P),
        history_sizes (persona items kept, seeded per example; None keeps all; Fig. 3 is
        [2, 4, 8, 16]), reversal (also score every variant with y_w and y_l swapped, Table 5).
    PBA: profile_source (`auto`, `field`, `gold`, `items`, `infer`: see
        `eval_data.profile_direction`); direction_engine annotates persona items for `infer`
        (its model None: the run's annotator), with direction_batch responses per call, in
        a Ray task holding direction_num_gpus GPUs.
    Scoring: dtype of both models; batch_size rows per actor call; concurrency (min, max)
        actors, num_gpus / num_cpus per actor. max_examples: the first n (None: all).
    benchmarks: extra files the demo evaluates besides its AlignX_test.
    """

    personas: list[str] = ["ugc", "pair", "demo", "all"]
    history_sizes: list[int | None] = [None]
    reversal: bool = True
    profile_source: eval_data.ProfileSource = "auto"
    direction_engine: EngineConfig = EngineConfig(kind="transformers")
    direction_batch: int = 16
    direction_num_gpus: float = 0
    dtype: str = "float32"
    batch_size: int = 16
    concurrency: tuple[int, int] = (1, 1)
    num_gpus: float = 0
    num_cpus: float = 1
    max_examples: int | None = None
    benchmarks: list[str] = []
    seed: int = 0


def summed_logprobs(model, tokenizer, prompts_: list[str], responses: list[str], batch_size: int = 8) -> np.ndarray:
    """Sum of the response tokens' log-probabilities given the prompt (not length-normalised):
    the quantity both the DPO reward and the paper's alignment accuracy are built on. Prompt and
    response are tokenized apart and concatenated, as TRL's DPO does."""
    import torch

    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts_), batch_size):
        chunk = list(zip(prompts_[start:start + batch_size], responses[start:start + batch_size]))
        encoded = [(tokenizer(p, add_special_tokens=False)["input_ids"],
                    tokenizer(r, add_special_tokens=False)["input_ids"]) for p, r in chunk]
        width = max(len(p) + len(r) for p, r in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, r) in enumerate(encoded):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            mask[i, :len(p) + len(r)] = 1
            target[i, len(p):len(p) + len(r)] = True
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        out.append((logp * target[:, 1:].to(device)).sum(-1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def score_pairs(policy, reference, tokenizer, prompts_: list[str], chosen: list[str], rejected: list[str],
                batch_size: int = 8) -> dict[str, np.ndarray]:
    """The four summed log-probs per pair; a reference that is the policy is scored once."""
    scores = {f"policy_{side}": summed_logprobs(policy, tokenizer, prompts_, texts, batch_size)
              for side, texts in (("chosen", chosen), ("rejected", rejected))}
    for side, texts in (("chosen", chosen), ("rejected", rejected)):
        scores[f"reference_{side}"] = (scores[f"policy_{side}"].copy() if reference is policy
                                       else summed_logprobs(reference, tokenizer, prompts_, texts, batch_size))
    return scores


def reward_margin(scores) -> np.ndarray:
    """(policy - reference) on chosen minus the same on rejected; > 0 is correct."""
    s = {k: np.asarray(scores[k], np.float64) for k in SCORE_COLUMNS}
    return (s["policy_chosen"] - s["reference_chosen"]) - (s["policy_rejected"] - s["reference_rejected"])


def load_models(policy: str, reference: str, dtype: str = "float32"):
    """(policy, reference, tokenizer) on the GPU when there is one; the same path loads once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def load(path: str):
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()

    model = load(policy)
    return model, model if reference == policy else load(reference), AutoTokenizer.from_pretrained(policy)


class LogprobScorer:
    """Ray Data actor: both models loaded once, then the four summed log-probs per row."""

    def __init__(self, policy: str, reference: str, dtype: str, batch_size: int):
        self.policy, self.reference, self.tokenizer = load_models(policy, reference, dtype)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = score_pairs(self.policy, self.reference, self.tokenizer, batch.column("prompt_text").to_pylist(),
                             batch.column("chosen").to_pylist(), batch.column("rejected").to_pylist(),
                             self.batch_size)
        for name in SCORE_COLUMNS:
            batch = batch.append_column(name, pa.array(scores[name], pa.float64()))
        return batch


def build_variants(examples: list[eval_data.Example], config: EvalConfig) -> list[eval_data.Variant]:
    """Every (persona type, history size) the example has, each followed by its reversal."""
    out = []
    for e in examples:
        for persona in config.personas:
            if not e.has(persona):
                continue
            for history in config.history_sizes:
                v = eval_data.variant(e, persona, history, config.seed)
                out.append(v)
                flipped = eval_data.reverse(v) if config.reversal else None
                if flipped is not None:
                    out.append(flipped)
    return out


def infer_profiles(variants: list[eval_data.Variant], engine_config: EngineConfig, model: str,
                   templates: prompts.PromptTemplates, batch: int, space: PreferenceSpace = SPACE) -> dict:
    """P~ inferred by an off-the-shelf LLM (paper §5): every persona item annotated on the
    space with the annotation prompt, as in dataset construction (a UGC comment or the
    demographic text against the median, a PAIR item as chosen vs rejected), then aggregated."""
    from transformers import AutoTokenizer

    from alignx_ray.annotate import QuestionBank, label_batch
    from alignx_ray.engines import make_engine

    def texts(v: eval_data.Variant) -> list[tuple[str, str]]:
        out = [(u["prompt"], u["comment"]) for u in v.ugc]
        out += [(p["prompt"], side) for p in v.pairs for side in (p["chosen"], p["rejected"])]
        return out + ([(v.example.prompt, v.demographic)] if v.demographic else [])

    unique = list(dict.fromkeys(t for v in variants for t in texts(v)))
    tokenizer = AutoTokenizer.from_pretrained(model)
    engine, bank = make_engine(engine_config, model, tokenizer), QuestionBank(tokenizer, templates, space)
    levels = {}
    for start in tqdm(range(0, len(unique), batch), desc="infer persona directions", unit="batch"):
        chunk = unique[start:start + batch]
        labelled = label_batch(engine, bank, [p for p, _ in chunk], [r for _, r in chunk])
        levels.update(zip(chunk, labelled["levels"]))
    profiles = {}
    for v in variants:
        vectors = [level_to_direction(levels[(u["prompt"], u["comment"])]) for u in v.ugc]
        vectors += [compare_levels(levels[(p["prompt"], p["chosen"])], levels[(p["prompt"], p["rejected"])])
                    for p in v.pairs]
        if v.demographic:
            vectors.append(level_to_direction(levels[(v.example.prompt, v.demographic)]))
        if vectors:
            profiles[v.row_id] = aggregate_directions(vectors)
    return profiles


def accuracy_figures(margins: np.ndarray) -> dict:
    return {"accuracy": float(np.mean(margins > 0)) if len(margins) else None, "n": int(len(margins)),
            "ties": int(np.sum(margins == 0))}


def metrics(scores: pa.Table, config: EvalConfig) -> dict:
    """Accuracy per (persona, history) on the original preferences and on the reversed ones,
    with the flip rate: how often the model's order of y_w and y_l inverts (strictly) when
    the persona is reversed, i.e. the two margins have the same sign (Table 5)."""
    rows = scores.to_pylist()
    margins = reward_margin({k: [r[k] for r in rows] for k in SCORE_COLUMNS})
    groups: dict[tuple, dict[bool, dict[str, float]]] = {}
    for r, m in zip(rows, margins):
        groups.setdefault((r["persona"], r["history"]), {}).setdefault(r["reversed"], {})[r["example_id"]] = m
    out = {"groups": []}
    for (persona, history), by_kind in groups.items():
        original, reversed_ = by_kind.get(False, {}), by_kind.get(True, {})
        group = {"persona": persona, "history": history, **accuracy_figures(np.array(list(original.values())))}
        if reversed_:
            both = [(original[e], m) for e, m in reversed_.items() if e in original]
            group["reversed"] = {**accuracy_figures(np.array(list(reversed_.values()))),
                                 "flip_rate": float(np.mean([a * b > 0 for a, b in both])) if both else None}
        out["groups"].append(group)
    default_history = config.history_sizes[0]
    head = next((g for g in out["groups"] if g["history"] == default_history), {})  # the first persona type scored
    out.update({"accuracy": head.get("accuracy"), "n": head.get("n", 0)})
    out["persona"] = {g["persona"]: {k: g[k] for k in ("accuracy", "n", "ties")}
                      for g in out["groups"] if g["history"] == default_history}
    if len(config.history_sizes) > 1:
        out["history"] = {str(g["history"] or "all"): {k: g[k] for k in ("accuracy", "n", "ties")}
                          for g in out["groups"] if g["persona"] == head.get("persona")}
    out["reversal"] = {g["persona"]: g["reversed"] for g in out["groups"]
                       if "reversed" in g and g["history"] == default_history}
    return out


def percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def metrics_markdown(figures: dict) -> str:
    """The accuracy table of one evaluation (and the calibration table when there is one)."""
    lines = [f"**{figures['method'].upper()}** on `{figures['benchmark']}`: alignment accuracy (%)", "",
             "| persona | history | accuracy | n | ties | reversed accuracy | flip rate |", "|---|---|---|---|---|---|---|"]
    for g in figures["groups"]:
        rev = g.get("reversed", {})
        lines.append(f"| {g['persona']} | {g['history'] or 'all'} | {percent(g['accuracy'])} | {g['n']} | {g['ties']} | "
                     f"{percent(rev.get('accuracy'))} | {percent(rev.get('flip_rate'))} |")
    if "calibration" in figures:
        lines += ["", "Inferred P~ against gold (%)", "", "| category | precision | recall |", "|---|---|---|"]
        lines += [f"| {name} | {percent(c['precision'])} | {percent(c['recall'])} |" for name, c in figures["calibration"].items()]
    return "\n".join(lines)


def read_examples(benchmark: str, config: EvalConfig, out_dir: Path, space: PreferenceSpace = SPACE):
    """(the first `max_examples` examples, how many rows were rejected: written to `_rejected`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    examples, rejected = eval_data.load_benchmark(benchmark, len(space))
    write_rejected(out_dir, "evaluate", [{"stage": "evaluate", "reason": r["reason"], "raw": r["row"],
                                          "location": f"{benchmark}#{r['example_id']}"} for r in rejected])
    return examples[:config.max_examples] if config.max_examples is not None else examples, len(rejected)


def variant_table(variants: list[eval_data.Variant], method: str, config: EvalConfig, tokenizer,
                  templates: prompts.PromptTemplates, annotator: Callable[[], str], space: PreferenceSpace = SPACE):
    """(the variants with their prompts in the method's format, (inferred P~, gold) pairs for
    calibration). PBA's P~ comes from `config.profile_source`; what must be inferred is
    annotated in a Ray task holding `direction_num_gpus` GPUs, by `direction_engine.model`
    or else the model `annotator()` returns (called only then: it may have to be built)."""
    profiles, calibration_pairs, sources = {}, [], {}
    if method == "pba":
        needs_inference = [v for v in variants if eval_data.profile_direction(v, config.profile_source)[0] == "infer"]
        inferred = {}
        if needs_inference:
            import ray

            task = ray.remote(num_gpus=config.direction_num_gpus)(infer_profiles)
            inferred = ray.get(task.remote(needs_inference, config.direction_engine,
                                           resolve_local(config.direction_engine.model or annotator()),
                                           templates, config.direction_batch, space))
        for v in variants:
            sources[v.row_id], profiles[v.row_id] = eval_data.profile_direction(v, config.profile_source, inferred, space)
            inferred_p = sources[v.row_id] != "gold" and profiles[v.row_id] is not None
            if inferred_p and v.example.gold is not None and not v.reversed:
                calibration_pairs.append((profiles[v.row_id], list(v.example.gold)))
    table = pa.Table.from_pylist([{
        "row_id": v.row_id, "example_id": v.example.example_id, "persona": v.persona, "history": v.history,
        "reversed": v.reversed, "profile_source": sources.get(v.row_id),
        "profile": space.describe_direction(profiles[v.row_id]) if profiles.get(v.row_id) else None,
        "prompt_text": eval_data.eval_prompt(v, method, tokenizer, templates, profiles.get(v.row_id), space),
        "chosen": v.example.chosen, "rejected": v.example.rejected,
    } for v in variants], schema=VARIANTS_SCHEMA)
    return table, calibration_pairs


def run_evaluation(config: EvalConfig, benchmark: str, method: str, policy: str, reference: str, out_dir: Path,
                   templates: prompts.PromptTemplates = prompts.PromptTemplates(),
                   annotator: Callable[[], str] | None = None, space: PreferenceSpace = SPACE) -> dict:
    """Evaluate one method on one benchmark file; writes scores.parquet and metrics.json.
    `annotator` gives the model that infers P~ when needed (None: the policy)."""
    from transformers import AutoTokenizer

    started = time.time()
    examples, rejected = read_examples(benchmark, config, out_dir, space)
    variants = build_variants(examples, config)
    table, calibration_pairs = variant_table(variants, method, config, AutoTokenizer.from_pretrained(policy), templates,
                                             annotator or (lambda: policy), space)
    scored = score_resumable(table, config, policy, reference, out_dir / "_scoring")
    pq.write_table(scored, out_dir / "scores.parquet")
    figures = {
        "benchmark": str(benchmark), "method": method, "policy": policy, "reference": reference,
        **metrics(scored, config), "examples": len(examples), "rejected": rejected,
        "variants_scored": scored.num_rows, "seconds": round(time.time() - started, 1),
    }
    if calibration_pairs:
        figures["calibration"] = eval_data.calibration(calibration_pairs)
    figures["markdown"] = metrics_markdown(figures)
    (out_dir / "metrics.json").write_text(json.dumps(figures, indent=1))
    return figures


VARIANTS_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("example_id", pa.string()), ("persona", pa.string()), ("history", pa.int64()),
    ("reversed", pa.bool_()), ("profile_source", pa.string()), ("profile", pa.string()),
    ("prompt_text", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
])


def score_resumable(table: pa.Table, config: EvalConfig, policy: str, reference: str, work: Path) -> pa.Table:
    """Score the variants on a Ray Data actor pool, resuming a killed run of the same inputs;
    returns them in their original order with the four score columns."""
    from alignx_ray.pipeline import fingerprint

    key = fingerprint(config.dtype, policy, reference, table.column("row_id").to_pylist(),
                      table.column("prompt_text").to_pylist())
    stamp = work / "_inputs.json"
    if not stamp.exists() or json.loads(stamp.read_text())["key"] != key:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        pq.write_table(table, work / "variants.parquet")
        stamp.write_text(json.dumps({"key": key}))
    map_resumable(work / "variants.parquet", work / "scored", "row_id", LogprobScorer,
                  {"policy": resolve_local(policy), "reference": resolve_local(reference), "dtype": config.dtype,
                   "batch_size": config.batch_size},
                  ActorPool(config.batch_size, config.concurrency, config.num_cpus, config.num_gpus))
    scored = pq.read_table(work / "scored")
    order = {rid: i for i, rid in enumerate(table.column("row_id").to_pylist())}
    return scored.take(np.argsort([order[r] for r in scored.column("row_id").to_pylist()]))
