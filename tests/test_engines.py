"""All engines label exactly like 90 independent plain prompts (tiny model, float32)."""

import numpy as np
import pytest

from alignx_ray import prompts
from alignx_ray.annotate import QuestionBank, label_batch
from alignx_ray.engines import EngineConfig, ScoreRequest, make_engine
from alignx_ray.tree import pack_tree

POSTS = ["We are moving to a smaller flat next month. Any packing tips?",
         "Thinking of learning to paint this winter."]
COMMENTS = ["Label every box and keep a spreadsheet, it saved my sanity.",
            "I adore painting, start with cheap brushes and have fun!"]


@pytest.fixture(scope="module")
def bank(tiny_tokenizer):
    return QuestionBank(tiny_tokenizer, prompts.PromptTemplates())


@pytest.fixture(scope="module")
def plain(tiny_model_dir, tiny_tokenizer, bank):
    """The reference: 90 independent prompts per response."""
    engine = make_engine(EngineConfig(kind="transformers-plain"), str(tiny_model_dir), tiny_tokenizer)
    return label_batch(engine, bank, POSTS, COMMENTS)


def test_prompt_segments_concatenate_to_the_full_prompt(tiny_tokenizer, bank):
    layout = bank.layout
    question = prompts.format_question(prompts.SPACE[2], prompts.PromptTemplates())
    full = layout.head + layout.post_part(POSTS[0]) + layout.comment_part(COMMENTS[0]) + layout.branch(question)
    user = prompts.PromptTemplates().annotation.format(
        example=prompts.annotation_example(prompts.PromptTemplates()), post=POSTS[0], comment=COMMENTS[0],
        question=question)
    assert full == prompts.render_chat(tiny_tokenizer, user)
    assert "Comments alone cannot reflect" in question and full.endswith("<|im_start|>assistant\n")


def test_tree_mask_and_positions():
    tree = pack_tree([1, 2, 3], [[4, 5], [6]])
    assert tree.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert tree.position_ids.tolist() == [0, 1, 2, 3, 4, 3]
    assert tree.last.tolist() == [4, 5]
    assert tree.allowed[5].tolist() == [True, True, True, False, False, True]  # branch 2 never sees branch 1
    assert tree.allowed[4].tolist() == [True, True, True, True, True, False]


def test_transformers_tree_equals_plain_prompts(tiny_model_dir, tiny_tokenizer, bank, plain):
    engine = make_engine(EngineConfig(kind="transformers", max_tree_tokens=3000), str(tiny_model_dir), tiny_tokenizer)
    tree = label_batch(engine, bank, POSTS, COMMENTS)
    for a, b in zip(tree["option_probs"], plain["option_probs"]):
        assert a.shape == (90, 3)
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(tree["levels"], plain["levels"]))


def test_vllm_equals_plain_prompts(tiny_model_dir, tiny_tokenizer, bank, plain):
    engine = make_engine(EngineConfig(kind="vllm"), str(tiny_model_dir), tiny_tokenizer)
    out = label_batch(engine, bank, POSTS, COMMENTS)
    for a, b in zip(out["option_probs"], plain["option_probs"]):
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)  # renormalised over the three options
    assert all(np.array_equal(a, b) for a, b in zip(out["levels"], plain["levels"]))
    # The three option probabilities come back for a single prompt too.
    single = engine.score([ScoreRequest(bank.prefix(POSTS[0], COMMENTS[0]), bank.questions[:1])])
    assert single[0].shape == (1, 3)


def test_over_long_prompts_are_rejected_not_lost(tiny_model_dir, tiny_tokenizer, bank):
    engine = make_engine(EngineConfig(kind="transformers"), str(tiny_model_dir), tiny_tokenizer)
    out = label_batch(engine, bank, POSTS, [COMMENTS[0], COMMENTS[1] * 40], max_prompt_tokens=500)
    assert out["reject_reason"][0] is None and out["levels"][0].shape == (90,)
    assert out["reject_reason"][1].startswith("prompt_too_long") and out["levels"][1].size == 0
