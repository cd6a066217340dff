"""DPO formats (pinned strings), the examples prepared once on Ray Data (equal to the row-by-row
rendering), and training on a real multi-worker Ray Train run with TRL and DeepSpeed ZeRO-3 on
CPU (a kill -9 and resume of training: test_demo_resume.py)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from alignx_rows import alignx_row, direction
from cpu import DEMO, merged

from alignx_ray.common import prompts, schema
from alignx_ray.common.space import SPACE
from alignx_ray.train.dpo_config import TrainConfig
from alignx_ray.train.dpo_data import (
    DPO_SCHEMA,
    dpo_batch,
    dpo_example,
    prepare_training_data,
    prepared_head,
    prepared_parts,
    profile_text,
    reversed_example,
    sample_items,
)
from alignx_ray.train.dpo_trainer import training_dataset


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


def test_reversed_example_swaps_the_preferences_and_flips_the_profile(tiny_tokenizer):
    """Table 5's reversal as a training row: target and PAIR items swapped, directions flipped
    (P~ names the opposite poles), UGC and the demographic text gone; none without PAIR items."""
    row, templates = pinned_row(), prompts.PromptTemplates()
    pba = reversed_example(row, row[schema.PAIR], "pba", tiny_tokenizer, templates)
    # the one PAIR item has d2 = 1.0, d3 = 0.5: flipped, d2 = 0.0 and d3 = 0.5
    assert f"***User Preferences***\n\n{SPACE[2].negative}\n\n" in pba["prompt"]
    assert (pba["chosen"], pba["rejected"]) == ("Order takeout 7.", "Try a spicy curry, friend 7.")
    assert pba["example_id"] == "ex-7|reversed"
    ica = reversed_example(row, row[schema.PAIR], "ica", tiny_tokenizer, templates)
    assert "*Chosen:*\nbad 0\n\n*Rejected:*\ngood 0" in ica["prompt"]
    assert "u-comment" not in ica["prompt"] and "An outgoing cook." not in ica["prompt"]
    assert reversed_example(row, [], "pba", tiny_tokenizer, templates) is None


def test_reversal_copies_follow_their_examples(tiny_tokenizer):
    rows = [alignx_row(0), alignx_row(1, n_ugc=3, n_pair=0), alignx_row(2)]
    table = schema.to_official(pa.Table.from_pylist(rows, schema.ALIGNX_SCHEMA))
    ids = dpo_batch(table, "pba", tiny_tokenizer, prompts.PromptTemplates(), reversal_copies=True)["example_id"]
    assert ids.to_pylist() == ["ex-0", "ex-0|reversed", "ex-1", "ex-2", "ex-2|reversed"]


def old_rendering(dataset, method: str, tokenizer) -> list[dict]:
    """The examples as they were rendered before the preparation: the whole table, row by row."""
    table = schema.to_official(pq.read_table(dataset))
    return [dpo_example(row, method, tokenizer, prompts.PromptTemplates()) for row in table.to_pylist()]


def test_dpo_batch_renders_every_row_in_order(tiny_tokenizer):
    table = schema.to_official(pa.Table.from_pylist([alignx_row(i) for i in range(5)], schema.ALIGNX_SCHEMA))
    batch = dpo_batch(table, "ica", tiny_tokenizer, prompts.PromptTemplates())
    assert batch.schema == DPO_SCHEMA
    assert batch.to_pylist() == [
        dpo_example(r, "ica", tiny_tokenizer, prompts.PromptTemplates()) for r in table.to_pylist()
    ]


def test_prepared_data_is_the_row_by_row_rendering(tmp_path, tiny_model_dir, tiny_tokenizer, ray_local):
    """Ours in two files of several row groups, and the released layout (no example_id, no
    split: ids from row numbers, which must run on across row groups); the first n rows; a
    killed preparation (a part missing) resumes to the same parts."""
    ours, released = tmp_path / "ours", tmp_path / "released.parquet"
    ours.mkdir()
    rows = [alignx_row(i, n_ugc=i % 5, n_pair=(3 * i) % 7) for i in range(11)]
    for name, part in (("a.parquet", rows[:7]), ("b.parquet", rows[7:])):
        pq.write_table(pa.Table.from_pylist(part, schema.ALIGNX_SCHEMA), ours / name, row_group_size=3)
    pq.write_table(pa.Table.from_pylist(rows, schema.ALIGNX_SCHEMA).drop(["example_id", "split"]), released, 4)
    config = TrainConfig.model_validate(merged(DEMO.train.model_dump(), {"method": "ica"}))

    def prepare(dataset, out, **changes) -> list[dict]:
        cfg = config.model_copy(update=changes)
        figures = prepare_training_data(cfg, str(dataset), str(tiny_model_dir), prompts.PromptTemplates(), out)
        prepared = pq.read_table(prepared_parts(out)).to_pylist()
        assert figures["examples"] == len(prepared) and figures["parts"] == len(prepared_parts(out))
        return prepared

    expected = old_rendering(ours, "ica", tiny_tokenizer)
    assert prepare(ours, tmp_path / "ours-all") == expected and len(expected) == 11
    assert len(prepared_parts(tmp_path / "ours-all")) == 5  # 3 + 3 + 1 rows in a, 3 + 1 in b
    Path(prepared_parts(tmp_path / "ours-all")[2]).unlink()
    assert prepare(ours, tmp_path / "ours-all") == expected
    assert prepare(ours, tmp_path / "ours-5", max_examples=5) == expected[:5]
    assert prepared_head(tmp_path / "ours-all", 4).to_pylist() == expected[:4]
    table = schema.to_official(pq.read_table(ours))
    with_reversals = dpo_batch(table, "ica", tiny_tokenizer, prompts.PromptTemplates(), reversal_copies=True)
    with_reversals = with_reversals.to_pylist()
    assert prepare(ours, tmp_path / "ours-reversed", reversal_copies=True) == with_reversals
    assert len(with_reversals) > len(rows)

    expected = old_rendering(released, "pba", tiny_tokenizer)
    assert [e["example_id"] for e in expected] == [f"alignx-{i}" for i in range(11)]
    assert prepare(released, tmp_path / "released", method="pba") == expected
    worker_view = training_dataset(str(tmp_path / "released"), tmp_path / "hf-cache")
    assert worker_view.to_list() == [{k: e[k] for k in ("prompt", "chosen", "rejected")} for e in expected]


TRAIN = {  # the demo's CPU training (2 workers, ZeRO-3), shorter
    "dpo": {"epochs": 3, "learning_rate": 1e-3, "per_device_batch": 2, "save_steps": 2, "logging_steps": 1},
}


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("alignx") / "train.parquet"
    pq.write_table(pa.Table.from_pylist([alignx_row(i) for i in range(8)], schema.ALIGNX_SCHEMA), path)
    return path


def test_zero3_dpo_on_two_ray_train_workers(tmp_path, train_data, tiny_model_dir, tiny_tokenizer, ray_local):
    """The run's train stage: examples prepared once, DPO on two Ray Train workers reading them,
    the fit accuracy on the first `fit_sample` of them scored by the evaluation's actors."""
    from alignx_ray.run import Run, RunConfig, fit_accuracy

    model = str(tiny_model_dir)
    train = {**TRAIN, "dataset": str(train_data), "model": model, "fit_sample": 6}
    run = Run(RunConfig.model_validate(merged(DEMO.model_dump(), {"train": train})), tmp_path)
    figures = run.train("pba")
    assert figures["step"] == 6 and figures["examples"] == 8  # 8 pairs / (2 workers x 2) x 3 epochs
    assert {"loss", "rewards/accuracies", "rewards/margins"} <= set(figures)
    assert figures["n"] == 6 and figures["fit_accuracy"] is not None and figures["mean_margin"] is not None
    prepared = tmp_path / "train_pba" / "data"
    assert pq.read_table(prepared_parts(prepared)).to_pylist() == old_rendering(train_data, "pba", tiny_tokenizer)
    same = fit_accuracy(prepared, 6, DEMO.evaluate, model, model, tmp_path / "same")
    assert same["fit_accuracy"] == 0.0  # policy == reference: every reward is 0, a tie, never correct
