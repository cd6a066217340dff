"""Prompt texts, config loading and the command line."""

import json
import subprocess
import sys

import pytest

from alignx_ray.common import prompts
from alignx_ray.common.config import load_config
from alignx_ray.common.space import SPACE
from alignx_ray.run import RunConfig

T = prompts.PromptTemplates()


def test_ica_prompt_string_is_pinned(tiny_tokenizer):
    text = prompts.ica_prompt(
        tiny_tokenizer,
        T,
        "Which pan?",
        ugc=[{"prompt": "Best knife?", "comment": "A chef's knife."}],
        pairs=[{"prompt": "Tea or coffee?", "chosen": "Tea.", "rejected": "Coffee."}],
        demographic="A young cook who likes gourmet food.",
    )
    assert text == (
        "<|im_start|>system\nGenerate a task-specific response based on user historical behavior and preferences.\n"
        "<|im_end|>\n<|im_start|>user\n***Task***\n\n**Post:**\nWhich pan?\n\n"
        "***Historical Behavior and User Preferences***\n\n"
        "**This person has commented on some posts:**\n\n1. *Post:*\nBest knife?\n\n*Comment:*\nA chef's knife.\n\n"
        "**This person has chosen or rejected comments on some posts:**\n\n"
        "1. *Post:*\nTea or coffee?\n\n*Chosen:*\nTea.\n\n*Rejected:*\nCoffee.\n\n"
        "**This person's persona is:**\n\nA young cook who likes gourmet food.\n\n***Response:***\n\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_pba_prompt_string_is_pinned(tiny_tokenizer):
    text = prompts.pba_prompt(tiny_tokenizer, T, "Which pan?", "Low Agreeableness, Likes gourmet food")
    assert text == (
        "<|im_start|>system\nGenerate a task-specific response based on user preferences.\n<|im_end|>\n"
        "<|im_start|>user\n***Task***\n\n**Post:**\nWhich pan?\n\n***User Preferences***\n\n"
        "Low Agreeableness, Likes gourmet food\n\n***Response:***\n\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_demographic_prompt_lists_48_dimensions_and_43_keywords():
    text = prompts.demographic_prompt(T, "post", "r1", "r2")
    listed = prompts.demographic_dimension_list().splitlines()
    assert len(listed) == 48 and listed[2] == "3. Occupation"
    assert listed[0] == '1. Age group: ("Young", "Older")'
    assert all(d.keyword in text for d in SPACE.keyword_dimensions())
    schema = prompts.demographic_json_schema()
    assert len(schema["properties"]["dimension description"]["properties"]) == 48


def test_judge_and_binary_choice_prompts_carry_their_inputs():
    fields = {"history": "history H", "query": "query Q", "response_a": "answer A", "response_b": "answer B"}
    judge, binary = T.judge.format(**fields), T.binary_choice.format(**fields)
    assert all(x in judge and x in binary for x in fields.values())
    assert '"Tie"' in judge and "Tie" not in binary


def test_few_shot_example_and_overrides():
    example = prompts.annotation_example(T)
    assert example.count("Task:\n") == 3 and "Response:\n1\n\n" in example and "Response:\n3\n\n" in example
    own = prompts.PromptTemplates(annotation_example="EXAMPLE\n\n")
    assert prompts.annotation_example(own) == "EXAMPLE\n\n"


def test_config_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotate:\n  pool:\n    batch_size: 3\n")
    config = load_config(RunConfig, path, ["annotate.engine.kind=transformers", "ray.num_cpus=2"])
    assert (config.annotate.pool.batch_size, config.annotate.engine.kind, config.ray.num_cpus) == (3, "transformers", 2)
    path.write_text("annotate:\n  batch_size: 3\n")
    with pytest.raises(ValueError, match="batch_size"):
        load_config(RunConfig, path)


def test_shipped_configs_load():
    for name in ("configs/demo.yaml", "configs/annotate-qwen14b.yaml", "configs/train.yaml", "configs/evaluate.yaml"):
        assert isinstance(load_config(RunConfig, name), RunConfig)


def alignx(*args):
    return subprocess.run([sys.executable, "-m", "alignx_ray.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_and_profile_round_trip():
    for command in ("tiny-model", "profile", "annotate", "demo"):
        done = alignx(command, "--help")
        assert done.returncode == 0 and "usage: alignx" in done.stdout
    text = "Older, Prefers avoidance, mediation, compromise to handle conflict, Likes humor"
    vector = json.loads(alignx("profile", text).stdout)
    assert len(vector) == 90 and vector[0] == 0.0 and vector[15] == 0.0 and vector[73] == 1.0
    assert alignx("profile", "--vector", json.dumps(vector)).stdout.strip() == text


def test_stage_commands_run_on_the_code_defaults_and_take_input(tmp_path):
    """No --config: the code defaults (production's), never the demo's; --input replaces the
    config's ingest.input; evaluate caps nothing unless asked."""
    from alignx_ray.cli import _run, build_parser

    parser = build_parser()
    for command in ("annotate", "build"):
        args = parser.parse_args([command, "--input", "threads.jsonl", "--run-dir", str(tmp_path)])
        run = _run(args, args.run_dir)
        assert run.config.ingest.input == "threads.jsonl" and run.run_dir == tmp_path
        assert run.config.model_copy(update={"ingest": RunConfig().ingest}) == RunConfig()
        assert run.config.annotate.pool.num_gpus == 1 and run.config.evaluate.max_examples is None
    args = parser.parse_args(["evaluate", "--benchmark", "b.json", "--method", "pba", "--policy", "p", "--out", "o"])
    assert args.config is None and args.max_examples is None
    assert parser.parse_args(["demo"]).config == "configs/demo.yaml"
    with pytest.raises(SystemExit):  # the method is always named
        parser.parse_args(["train"])
