"""Judge win rate and binary-choice accuracy: parsing and arithmetic, then the real vLLM engine."""

import json

import pyarrow.parquet as pq
import pytest
from cpu import DEMO, DEMO_YAML

from alignx_ray.common import prompts
from alignx_ray.evaluate.judge import (
    BINARY_CHOICE_SCHEMA,
    CHOICE_SCHEMA,
    OUTCOMES,
    binary_choice,
    binary_choice_accuracy,
    generate_responses,
    judge_pairs,
    order_swapped,
    parse_choice,
    win_rate,
)


@pytest.mark.parametrize(
    "text, allow_tie, expected",
    [
        ('{"choice": "Response A"}', True, "A"),
        (' \n{ "choice" :\t"Response B" }\n', False, "B"),
        ('{"choice": "Tie"}', True, "tie"),
        ('{"choice": "Tie"}', False, None),
        ('{"choice": "response a"}', True, None),
        ('{"choice": "A"}', True, None),
        ('{"choice": ["Response A"]}', True, None),
        ('{"verdict": "Response A"}', True, None),
        ('{"choice": "Response A"', True, None),
        ('["Response A"]', True, None),
        ("Response A", True, None),
        ("", True, None),
    ],
)
def test_parse_choice(text, allow_tie, expected):
    assert parse_choice(text, allow_tie) == expected


def test_every_schema_value_parses():
    for schema, allow_tie in ((CHOICE_SCHEMA, True), (BINARY_CHOICE_SCHEMA, False)):
        values = schema["properties"]["choice"]["enum"]
        assert all(parse_choice(json.dumps({"choice": v}), allow_tie) is not None for v in values)
    assert "Tie" not in BINARY_CHOICE_SCHEMA["properties"]["choice"]["enum"]


def test_win_rate_counts_ties_and_invalid_outside_the_rate():
    out = win_rate(["win", "lose", "win", "tie", "invalid"])
    assert out == {"win": 2, "lose": 1, "tie": 1, "invalid": 1, "n": 5, "win_rate": pytest.approx(2 / 3)}
    assert win_rate(["tie", "invalid"])["win_rate"] is None
    assert win_rate([]) == {"win": 0, "lose": 0, "tie": 0, "invalid": 0, "n": 0, "win_rate": None}
    with pytest.raises(ValueError, match="unknown outcomes"):
        win_rate(["win", "draw"])


def test_binary_choice_accuracy_counts_invalid_as_wrong():
    assert binary_choice_accuracy([True, False, None, True]) == {"n": 4, "correct": 2, "n_invalid": 1, "accuracy": 0.5}
    assert binary_choice_accuracy([])["accuracy"] is None


def test_order_swapped_is_a_fixed_fair_coin():
    ids = [f"ex{i}" for i in range(400)]
    first = [order_swapped(0, i) for i in ids]
    assert first == [order_swapped(0, i) for i in ids]
    assert 0.4 < sum(first) / len(ids) < 0.6
    assert first != [order_swapped(1, i) for i in ids]


def flipped_ids(ids: list[str], seed: int) -> list[str]:
    """Ids whose display coin is the opposite of the given ones'."""
    out = []
    for example_id in ids:
        k = 0
        while order_swapped(seed, f"{example_id}~{k}") == order_swapped(seed, example_id):
            k += 1
        out.append(f"{example_id}~{k}")
    return out


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from alignx_ray.engines.generation import VllmGenerator

    return VllmGenerator(DEMO.judge.engine, str(tiny_model_dir))


def test_judge_and_binary_choice_on_vllm(generator, tiny_tokenizer):
    """The random tiny model cannot judge, but under the schema every answer parses and a re-run
    answers the same. With a greedy judge the displayed prompt alone fixes the answer, so making
    B the model A under ids with the opposite coin (the very same prompts) mirrors every outcome.
    This model's greedy judge always says Tie, so binary choice (same position mapping, no Tie)
    is where the mirror meets real wins and losses."""
    templates = prompts.PromptTemplates()
    greedy = DEMO.judge.model_copy(update={"generation_max_tokens": 12})
    assert greedy.temperature == 0.0
    sampled = greedy.model_copy(update={"temperature": 1.0})
    n = 6
    ids = [f"ex{i}" for i in range(n)]
    flipped = flipped_ids(ids, greedy.seed)
    queries = [f"Which hobby should I try this year, option {i}?" for i in range(n)]
    ugc = [{"prompt": "Weekend plans?", "comment": "Painting, as always."}]
    pairs = [{"prompt": "Best pet?", "chosen": "A calm old cat.", "rejected": "Snakes."}]
    histories = [prompts.behaviour_history(templates, ugc, pairs)] * n

    with_history = [prompts.ica_prompt(tiny_tokenizer, templates, q, ugc, pairs) for q in queries]
    without = [prompts.render_chat(tiny_tokenizer, q) for q in queries]
    responses_a = generate_responses(generator, with_history, ids, greedy)
    responses_b = generate_responses(generator, without, ids, greedy)
    assert responses_a == generate_responses(generator, with_history, ids, greedy)

    def judge(config, a, b, example_ids):
        return judge_pairs(generator, tiny_tokenizer, histories, queries, a, b, example_ids, config, templates)

    sampled_outcomes = judge(sampled, responses_a, responses_b, ids)
    assert len(sampled_outcomes) == n and set(sampled_outcomes) <= {"win", "lose", "tie"}
    assert judge(sampled, responses_a, responses_b, ids) == sampled_outcomes

    outcomes = judge(greedy, responses_a, responses_b, ids)
    assert len(outcomes) == n and set(outcomes) <= {"win", "lose", "tie"}
    assert judge(greedy, responses_b, responses_a, flipped) == [
        {"win": "lose", "lose": "win", "tie": "tie"}[o] for o in outcomes
    ]
    assert win_rate(outcomes)["n"] == n

    def choose(chosen, rejected, example_ids):
        return binary_choice(generator, tiny_tokenizer, histories, queries, chosen, rejected, example_ids, greedy)

    results = choose(responses_a, responses_b, ids)
    assert len(results) == n and all(isinstance(r, bool) for r in results)
    assert choose(responses_a, responses_b, ids) == results
    assert choose(responses_b, responses_a, flipped) == [not r for r in results]
    assert binary_choice_accuracy(results)["n_invalid"] == 0


def test_judge_and_binary_choice_jobs_on_the_official_file(ray_local, tiny_model_dir, official_dir, tmp_path):
    """`alignx judge` end to end: two contenders answer, the judge rules; then binary choice."""
    from alignx_ray.cli import main

    psoups = str(official_dir / "psoups_friendly_unfriendly.json")
    common = ["--config", str(DEMO_YAML), "--benchmark", psoups, "--set", "evaluate.max_examples=3"]
    common += ["--set", "judge.max_tokens=32"]
    model = str(tiny_model_dir)
    main(
        [
            "judge",
            *common,
            "--model-a",
            model,
            "--method-a",
            "ica",
            "--model-b",
            model,
            "--method-b",
            "pba",
            "--judge",
            model,
            "--out",
            str(tmp_path / "judge"),
        ]
    )
    wins = json.loads((tmp_path / "judge" / "judge.json").read_text())
    judged = pq.read_table(tmp_path / "judge" / "judgments.parquet").to_pydict()
    assert wins["n"] == 3 and sum(wins[o] for o in OUTCOMES) == 3 and judged["outcome"].count("win") == wins["win"]
    assert all(judged["response_a"]) and judged["example_id"] == [f"psoups_friendly_unfriendly-{i}" for i in range(3)]
    main(["judge", *common, "--binary-choice", model, "--out", str(tmp_path / "choice")])
    choice = json.loads((tmp_path / "choice" / "binary_choice.json").read_text())
    picked = pq.read_table(tmp_path / "choice" / "binary_choice.parquet").column("picked_chosen").to_pylist()
    assert choice["n"] == 3 and choice["correct"] == sum(p is True for p in picked)
