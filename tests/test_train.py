"""DPO formats (pinned strings) and training on a real multi-worker Ray Train run with TRL and
DeepSpeed ZeRO-3 on CPU (a kill -9 and resume of training: test_demo_resume.py)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from alignx_rows import alignx_row, direction
from cpu import DEMO, merged

from alignx_ray.common import prompts, schema
from alignx_ray.common.space import SPACE
from alignx_ray.train.dpo_data import dpo_example, profile_text, sample_items


def test_item_sampling_is_seeded_and_bounded():
    counts = set()
    for i in range(40):
        ugc, pairs = sample_items(alignx_row(i), seed=0)
        assert 0 <= len(ugc) <= 4 and 0 <= len(pairs) <= 4 and (ugc or pairs)
        assert (ugc, pairs) == sample_items(alignx_row(i), seed=0)
        counts.add((len(ugc), len(pairs)))
    assert len(counts) > 5  # the counts vary between examples
    ugc, pairs = sample_items(alignx_row(0, n_ugc=0, n_pair=2), seed=0)
    assert ugc == [] and len(pairs) <= 2


def test_profile_aggregates_item_directions():
    items = [
        {schema.DIRECTION: direction(d2=1.0, d3=0.0)},
        {schema.DIRECTION: direction(d2=1.0)},
        {schema.DIRECTION: direction(d2=1.0, d3=0.0)},
    ]
    # d2: mean 1 -> positive; d3: mean 1/3 <= 0.4 -> negative
    assert profile_text(items, []) == f"{SPACE[2].positive}, {SPACE[3].negative}"


def pinned_row() -> dict:
    row = alignx_row(7, n_ugc=1, n_pair=1)
    row[schema.UGC][0][schema.DIRECTION] = direction(d2=1.0)
    return row


def test_ica_and_pba_prompt_strings_are_pinned(tiny_tokenizer, monkeypatch):
    import alignx_ray.train.dpo_data as dpo_data

    monkeypatch.setattr(dpo_data, "sample_items", lambda row, seed: (row[schema.UGC], row[schema.PAIR]))
    row, templates = pinned_row(), prompts.PromptTemplates()
    ica = dpo_example(row, "ica", tiny_tokenizer, templates)
    assert ica["prompt"] == (
        "<|im_start|>system\nGenerate a task-specific response based on user historical behavior and preferences.\n"
        "<|im_end|>\n<|im_start|>user\n***Task***\n\n**Post:**\nPost 7: what should I cook tonight?\n\n"
        "***Historical Behavior and User Preferences***\n\n"
        "**This person has commented on some posts:**\n\n1. *Post:*\nu-post 0\n\n*Comment:*\nu-comment 0\n\n"
        "**This person has chosen or rejected comments on some posts:**\n\n1. *Post:*\np-post 0\n\n*Chosen:*\ngood 0"
        "\n\n*Rejected:*\nbad 0\n\n**This person's persona is:**\n\nAn outgoing cook.\n\n***Response:***\n\n"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (ica["chosen"], ica["rejected"]) == ("Try a spicy curry, friend 7.", "Order takeout 7.")
    pba = dpo_example(row, "pba", tiny_tokenizer, templates)
    assert pba["prompt"] == (
        "<|im_start|>system\nGenerate a task-specific response based on user preferences.\n<|im_end|>\n"
        "<|im_start|>user\n***Task***\n\n**Post:**\nPost 7: what should I cook tonight?\n\n"
        f"***User Preferences***\n\n{SPACE[2].positive}\n\n***Response:***\n\n<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="unknown method"):
        dpo_example(row, "sft", tiny_tokenizer, templates)


TRAIN = {  # the demo's CPU training (2 workers, ZeRO-3), shorter
    "dpo": {"epochs": 3, "learning_rate": 1e-3, "per_device_batch": 2, "save_steps": 2, "logging_steps": 1},
}


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("alignx") / "train.parquet"
    pq.write_table(pa.Table.from_pylist([alignx_row(i) for i in range(8)], schema.ALIGNX_SCHEMA), path)
    return path


def test_zero3_dpo_on_two_ray_train_workers(tmp_path, train_data, tiny_model_dir, ray_local):
    from alignx_ray.train.dpo_config import TrainConfig
    from alignx_ray.train.dpo_trainer import fit_accuracy, run_training, training_examples

    config = TrainConfig.model_validate(merged(DEMO.train.model_dump(), {**TRAIN, "method": "pba"}))
    figures, final = run_training(config, str(tiny_model_dir), str(train_data), str(tmp_path / "ray"), tmp_path)
    assert figures["step"] == 6 and figures["examples"] == 8  # 8 pairs / (2 workers x 2) x 3 epochs
    assert {"loss", "rewards/accuracies", "rewards/margins"} <= set(figures)
    from transformers import AutoTokenizer

    examples = training_examples(
        config, str(train_data), AutoTokenizer.from_pretrained(tiny_model_dir), prompts.PromptTemplates()
    )
    fit = fit_accuracy(final, str(tiny_model_dir), examples)
    assert fit["n"] == 8 and fit["fit_accuracy"] is not None
    same = fit_accuracy(str(tiny_model_dir), str(tiny_model_dir), examples)
    assert same["fit_accuracy"] == 0.0  # policy == reference: every reward is 0, a tie, never correct
