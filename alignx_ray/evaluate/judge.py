"""Generative evaluation (paper §6.1, Table 3, Table 10, Appendix D.3).

Judge win rate: two models answer the same query; a judge LLM reads the user's behaviour
history and decides which response fits the user better, Tie allowed. Which model's response
is shown first is a seeded coin per example (against position bias), and the judge's answer
is mapped back to model A's outcome. Win rate of A = win / (win + lose).

Binary-choice accuracy, for models without log-probabilities: the model reads the history,
the query and the chosen and rejected responses (in seeded random order) and says which one
the user prefers; accuracy = correct / n, an unusable answer counting as wrong.

Answers are JSON constrained by a schema (vLLM structured outputs), so they always parse
unless cut at max_tokens. Every request has its own seed from the example id, so a re-run
samples exactly as before.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alignx_ray.common import prompts
from alignx_ray.common.config import Section, resolve_local
from alignx_ray.common.raydata import fit_local
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import SPACE, PreferenceSpace
from alignx_ray.engines.generation import VllmGenerator
from alignx_ray.engines.scoring import EngineConfig
from alignx_ray.evaluate.eval_config import EvalConfig
from alignx_ray.evaluate.examples import Variant, read_examples, variant, variant_table

CHOICES = {"Response A": "A", "Response B": "B", "Tie": "tie"}
CHOICE_SCHEMA = {
    "type": "object",
    "properties": {"choice": {"type": "string", "enum": list(CHOICES)}},
    "required": ["choice"],
    "additionalProperties": False,
}
BINARY_CHOICE_SCHEMA = {
    **CHOICE_SCHEMA,
    "properties": {"choice": {"type": "string", "enum": ["Response A", "Response B"]}},
}

OUTCOMES = ("win", "lose", "tie", "invalid")


class JudgeConfig(Section):
    """Judge win rate and binary-choice accuracy.

    engine: the judge (or answering) model on vLLM.
    max_tokens / temperature: the judge's JSON answer (max_tokens must hold it even when
        sampled character by character, ~24 tokens); greedy by default, so a verdict depends
        on the displayed texts alone.
    generation_max_tokens / generation_temperature: sampling of the compared models' responses.
    seed: of the displayed order and of every request's sampling seed.
    num_gpus: per engine (each model and the judge run in turn, each in its own Ray task).
    """

    engine: EngineConfig = EngineConfig()
    max_tokens: int = 64
    temperature: float = 0.0
    generation_max_tokens: int = 64
    generation_temperature: float = 0.7
    seed: int = 0
    num_gpus: float = 1


def parse_choice(text: str, allow_tie: bool) -> str | None:
    """The pick in a JSON answer: "A", "B" or "tie"; None when the answer is unusable."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("choice"), str):
        return None
    choice = CHOICES.get(answer["choice"])
    if choice == "tie" and not allow_tie:
        return None
    return choice


def order_swapped(seed: int, example_id: str) -> bool:
    """Whether model A's (or the chosen) response is shown second: a coin fixed by seed and id."""
    return bool(seeded_rng("judge-order", seed, example_id).integers(2))


def _request_seeds(purpose: str, seed: int, ids: list[str]) -> list[int]:
    return [int(seeded_rng(purpose, seed, example_id).integers(1 << 31)) for example_id in ids]


def generate_responses(generator, prompts: list[str], ids: list[str], config: JudgeConfig) -> list[str]:
    """One sampled response per rendered prompt. Both compared models get the same seeds for
    the same example, so only the model differs between them."""
    seeds = _request_seeds("response", config.seed, ids)
    answers = generator.generate(prompts, seeds, config.generation_max_tokens, config.generation_temperature)
    return [text for text, _ in answers]


def _ask(
    generator, tokenizer, kind: str, histories, queries, shown: tuple[list[str], list[str]], ids, config, templates
) -> tuple[list[str | None], list[bool]]:
    """Per example, the displayed position the answer picks ("A", "B", "tie" or None) and
    whether the primary response (model A's, or the chosen) was shown second. `kind` is
    "judge" (Tie allowed) or "binary" (which response the user prefers)."""
    firsts, seconds, swapped = _display_order(ids, config.seed, *shown)
    judging = kind == "judge"
    template, schema = (templates.judge, CHOICE_SCHEMA) if judging else (templates.binary_choice, BINARY_CHOICE_SCHEMA)
    texts = [
        prompts.render_chat(tokenizer, template.format(history=h, query=q, response_a=a, response_b=b))
        for h, q, a, b in zip(histories, queries, firsts, seconds)
    ]
    seeds = _request_seeds("judge", config.seed, ids)
    answers = generator.generate(texts, seeds, config.max_tokens, config.temperature, schema)
    return [parse_choice(text, allow_tie=judging) for text, _ in answers], swapped


def _display_order(
    ids: list[str], seed: int, primary: list[str], secondary: list[str]
) -> tuple[list[str], list[str], list[bool]]:
    """(shown first, shown second, swapped) per example; `primary` is shown second when swapped."""
    swapped = [order_swapped(seed, example_id) for example_id in ids]
    firsts = [q if s else p for p, q, s in zip(primary, secondary, swapped)]
    seconds = [p if s else q for p, q, s in zip(primary, secondary, swapped)]
    return firsts, seconds, swapped


def _picked_primary(pick: str, swapped: bool) -> bool:
    """Whether the displayed position picked holds the primary response (model A, or chosen)."""
    return pick == ("B" if swapped else "A")


def _outcome_for_a(pick: str | None, swapped: bool) -> str:
    if pick is None:
        return "invalid"
    if pick == "tie":
        return "tie"
    return "win" if _picked_primary(pick, swapped) else "lose"


def judge_pairs(
    generator,
    tokenizer,
    histories: list[str],
    queries: list[str],
    responses_a: list[str],
    responses_b: list[str],
    ids: list[str],
    config: JudgeConfig,
    templates: prompts.PromptTemplates = prompts.PromptTemplates(),
) -> list[str]:
    """Model A's outcome per example: "win", "lose", "tie" or "invalid"."""
    shown = (responses_a, responses_b)
    picks, swapped = _ask(generator, tokenizer, "judge", histories, queries, shown, ids, config, templates)
    return [_outcome_for_a(pick, s) for pick, s in zip(picks, swapped)]


def win_rate(outcomes: list[str]) -> dict:
    """Counts per outcome, n, and win / (win + lose) (None when neither occurred)."""
    counts = Counter(outcomes)
    unknown = set(counts) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcomes: {sorted(unknown)}")
    decided = counts["win"] + counts["lose"]
    return {
        **{o: counts[o] for o in OUTCOMES},
        "n": len(outcomes),
        "win_rate": counts["win"] / decided if decided else None,
    }


def binary_choice(
    generator,
    tokenizer,
    histories: list[str],
    queries: list[str],
    chosen: list[str],
    rejected: list[str],
    ids: list[str],
    config: JudgeConfig,
    templates: prompts.PromptTemplates = prompts.PromptTemplates(),
) -> list[bool | None]:
    """Per example, whether the model picks the chosen response; None for an unusable answer."""
    shown = (chosen, rejected)
    picks, swapped = _ask(generator, tokenizer, "binary", histories, queries, shown, ids, config, templates)
    return [None if pick is None else _picked_primary(pick, s) for pick, s in zip(picks, swapped)]


def binary_choice_accuracy(results: list[bool | None]) -> dict:
    """correct / n, an unusable answer counting as wrong (None when n is 0)."""
    correct = sum(r is True for r in results)
    return {
        "n": len(results),
        "correct": correct,
        "n_invalid": sum(r is None for r in results),
        "accuracy": correct / len(results) if results else None,
    }


def _on_vllm(task, num_gpus: float):
    """A Ray task whose worker exits after one call, so the vLLM engine's memory goes with it."""
    import ray

    return ray.remote(num_gpus=fit_local(1, num_gpus)[1], max_calls=1)(task)


def _generate(engine: EngineConfig, model: str, texts: list[str], ids: list[str], config: JudgeConfig) -> list[str]:
    return generate_responses(VllmGenerator(engine, model), texts, ids, config)


def _choose(
    engine: EngineConfig, model: str, kind: str, args: tuple, config: JudgeConfig, templates: prompts.PromptTemplates
) -> list:
    from transformers import AutoTokenizer

    ask = judge_pairs if kind == "judge" else binary_choice
    return ask(VllmGenerator(engine, model), AutoTokenizer.from_pretrained(model), *args, config, templates)


def judged_examples(benchmark: str, eval_config: EvalConfig, out_dir: Path, space: PreferenceSpace):
    """The full-persona variant (P: every item and the demographic text) of each example, and
    how many benchmark rows were rejected."""
    examples, rejected = read_examples(benchmark, eval_config, out_dir, space)
    variants = [variant(e, "all", None) for e in examples if e.has("all")]
    return variants, rejected


def persona_context(variants: list[Variant], templates: prompts.PromptTemplates):
    """(behaviour histories, queries): what the judge or the answering model reads."""
    return (
        [prompts.behaviour_history(templates, list(v.ugc), list(v.pairs), v.demographic) for v in variants],
        [v.example.prompt for v in variants],
    )


def run_judge(
    config: JudgeConfig,
    eval_config: EvalConfig,
    benchmark: str,
    contenders: list[tuple[str, str]],
    judge_model: str,
    out_dir: Path,
    templates: prompts.PromptTemplates = prompts.PromptTemplates(),
    annotator: Callable[[], str] | None = None,
    space: PreferenceSpace = SPACE,
) -> dict:
    """Table 3: win rate of contenders[0] against contenders[1], each a (model, method) that
    answers every example's query in its own prompt format; the judge reads the persona."""
    import ray
    from transformers import AutoTokenizer

    variants, rejected = judged_examples(benchmark, eval_config, out_dir, space)
    ids = [v.example.example_id for v in variants]
    responses = []
    for model, method in contenders:
        table, _ = variant_table(
            variants,
            method,
            eval_config,
            AutoTokenizer.from_pretrained(model),
            templates,
            annotator or (lambda model=model: model),
            space,
        )
        task = _on_vllm(_generate, config.num_gpus)
        responses.append(
            ray.get(
                task.remote(config.engine, resolve_local(model), table.column("prompt_text").to_pylist(), ids, config)
            )
        )
    outcomes = ray.get(
        _on_vllm(_choose, config.num_gpus).remote(
            config.engine,
            resolve_local(judge_model),
            "judge",
            (*persona_context(variants, templates), *responses, ids),
            config,
            templates,
        )
    )
    pq.write_table(
        pa.table({"example_id": ids, "response_a": responses[0], "response_b": responses[1], "outcome": outcomes}),
        out_dir / "judgments.parquet",
    )
    figures = {
        "benchmark": str(benchmark),
        "model_a": list(contenders[0]),
        "model_b": list(contenders[1]),
        "judge": judge_model,
        **win_rate(outcomes),
        "rejected": rejected,
    }
    (out_dir / "judge.json").write_text(json.dumps(figures, indent=1))
    return figures


def run_binary_choice(
    config: JudgeConfig,
    eval_config: EvalConfig,
    benchmark: str,
    model: str,
    out_dir: Path,
    templates: prompts.PromptTemplates = prompts.PromptTemplates(),
    space: PreferenceSpace = SPACE,
) -> dict:
    """Table 10: accuracy of a model asked directly which response the user prefers."""
    import ray

    variants, rejected = judged_examples(benchmark, eval_config, out_dir, space)
    ids = [v.example.example_id for v in variants]
    args = (
        *persona_context(variants, templates),
        [v.example.chosen for v in variants],
        [v.example.rejected for v in variants],
        ids,
    )
    results = ray.get(
        _on_vllm(_choose, config.num_gpus).remote(
            config.engine, resolve_local(model), "binary", args, config, templates
        )
    )
    pq.write_table(pa.table({"example_id": ids, "picked_chosen": results}), out_dir / "binary_choice.parquet")
    figures = {"benchmark": str(benchmark), "model": model, **binary_choice_accuracy(results), "rejected": rejected}
    (out_dir / "binary_choice.json").write_text(json.dumps(figures, indent=1))
    return figures
