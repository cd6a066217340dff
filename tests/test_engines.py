"""All engines label exactly like 90 independent plain prompts (tiny model, float32)."""

import numpy as np
import pytest
import torch
from cpu import cpu_engine

from alignx_ray.common import prompts
from alignx_ray.engines.labelling import QuestionBank, label_batch
from alignx_ray.engines.prefix_forest import (
    branch_logits,
    pack_forest,
    plan_packs,
    visibility_block_mask,
    visibility_mask,
)
from alignx_ray.engines.scoring import ScoreRequest, make_engine

# Two threads; the first has two responses, so packs share its post.
POSTS = [
    "We are moving to a smaller flat next month. Any packing tips?",
    "Thinking of learning to paint this winter.",
    "We are moving to a smaller flat next month. Any packing tips?",
]
COMMENTS = [
    "Label every box and keep a spreadsheet, it saved my sanity.",
    "I adore painting, start with cheap brushes and have fun!",
    "honestly just throw half of it away lol",
]


@pytest.fixture(scope="module")
def bank(tiny_tokenizer):
    return QuestionBank(tiny_tokenizer, prompts.PromptTemplates())


@pytest.fixture(scope="module")
def plain(tiny_model_dir, tiny_tokenizer, bank):
    """The reference: 90 independent prompts per response."""
    engine = make_engine(cpu_engine(kind="transformers-plain"), str(tiny_model_dir), tiny_tokenizer)
    return label_batch(engine, bank, POSTS, COMMENTS)


def test_prompt_segments_concatenate_to_the_full_prompt(tiny_tokenizer, bank):
    layout = bank.layout
    question = prompts.format_question(prompts.SPACE[2], prompts.PromptTemplates())
    full = layout.head + layout.post_part(POSTS[0]) + layout.comment_part(COMMENTS[0]) + layout.branch(question)
    user = prompts.PromptTemplates().annotation.format(
        example=prompts.annotation_example(prompts.PromptTemplates()),
        post=POSTS[0],
        comment=COMMENTS[0],
        question=question,
    )
    assert full == prompts.render_chat(tiny_tokenizer, user)
    assert "Comments alone cannot reflect" in question and full.endswith("<|im_start|>assistant\n")


def test_one_request_lays_out_prefix_then_branches():
    tree = pack_forest([([1, 2, 3], [[4, 5], [6]])])
    assert tree.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert tree.position_ids.tolist() == [0, 1, 2, 3, 4, 3]
    assert tree.last.tolist() == [4, 5]
    assert tree.allowed()[5].tolist() == [True, True, True, False, False, True]  # branch 2 never sees branch 1
    assert tree.allowed()[4].tolist() == [True, True, True, True, True, False]


def test_forest_lays_out_shared_prefixes_once():
    # Requests 0 and 2 share their whole prefix; request 1 shares [1, 2] with them.
    forest = pack_forest([([1, 2, 3, 7], [[4, 5], [6]]), ([1, 2, 9], [[4]]), ([1, 2, 3, 7], [[8]])], position_offset=10)
    assert forest.input_ids.tolist() == [1, 2, 3, 7, 4, 5, 6, 8, 9, 4]
    assert forest.position_ids.tolist() == [10, 11, 12, 13, 14, 15, 14, 14, 12, 13]
    assert forest.counts == [2, 1, 1]
    assert forest.last.tolist() == [5, 6, 9, 7]  # branches in request order
    allowed = forest.allowed()
    seen = [allowed[forest.last[i]].nonzero().flatten().tolist() for i in range(4)]
    assert seen == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 6], [0, 1, 8, 9], [0, 1, 2, 3, 7]]
    padded = forest.padded(13, pad_id=0)
    assert len(padded) == 13 and padded.allowed()[12].nonzero().flatten().tolist() == [12]
    assert not padded.allowed()[:10, 10:].any()  # nothing real sees padding


def test_packs_count_shared_prefixes_once():
    requests = [([1, 2, 3, 7], [[4, 5], [6]]), ([1, 2, 9], [[4]]), ([1, 2, 3, 7], [[8]])]
    assert plan_packs(requests, 10) == [[0, 1, 2]]  # 4 + 3, + 1 + 1, + 0 + 1 = 10 tokens
    assert plan_packs(requests, 8) == [[0], [1, 2]]
    assert plan_packs(requests, 1) == [[0], [1], [2]]  # too large requests still get a pack


def test_block_mask_skips_only_blocks_nothing_sees():
    """The block mask, expanded (skipped blocks: none; full: all; partial: per token), is the
    dense mask exactly, for a pack after a cached prefix, with sizes off the block grid."""
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(3):
        post = rng.integers(5, 99, 37).tolist()
        requests += [
            (
                post + rng.integers(5, 99, 51).tolist(),
                [rng.integers(5, 99, int(rng.integers(3, 60))).tolist() for _ in range(18)],
            )
            for _ in range(2)
        ]
    h, block = 283, 128
    forest = pack_forest(requests, position_offset=h).padded(4500, pad_id=0)
    t = len(forest)
    first = torch.cat([torch.zeros(h, dtype=torch.long), torch.arange(t)])
    end = torch.cat([torch.full((h,), t), forest.subtree_end])
    dense = visibility_mask(first, end, t)
    mask = visibility_block_mask(first, end, t, block)
    expanded = torch.zeros_like(dense)
    for i in range(mask.kv_num_blocks.shape[-1]):
        rows = slice(i * block, (i + 1) * block)
        for j in mask.kv_indices[0, 0, i, : mask.kv_num_blocks[0, 0, i]].tolist():
            expanded[rows, j * block : (j + 1) * block] = dense[rows, j * block : (j + 1) * block]
        for j in mask.full_kv_indices[0, 0, i, : mask.full_kv_num_blocks[0, 0, i]].tolist():
            expanded[rows, j * block : (j + 1) * block] = True
    assert torch.equal(expanded, dense)
    visited = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
    assert visited < 0.25 * mask.kv_indices.shape[-2] * mask.kv_indices.shape[-1]  # most blocks skipped


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_transformers_forest_equals_plain_prompts(tiny_model_dir, tiny_tokenizer, bank, plain, attention):
    config = cpu_engine(kind="transformers", attention=attention, pack_tokens=6000)  # two responses a pack
    engine = make_engine(config, str(tiny_model_dir), tiny_tokenizer)
    first = label_batch(engine, bank, POSTS[:1], COMMENTS[:1])  # caches this whole prefix
    assert engine.shared == bank.prefix(POSTS[0], COMMENTS[0])
    rest = label_batch(engine, bank, POSTS[1:], COMMENTS[1:])  # the cache shrinks to the few-shot block
    assert engine.shared == bank.head
    probs = first["option_probs"] + rest["option_probs"]
    levels = first["levels"] + rest["levels"]
    for a, b in zip(probs, plain["option_probs"], strict=True):
        assert a.shape == (90, 3)
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(levels, plain["levels"], strict=True))


def test_training_batch_after_a_shared_prefix_equals_plain_prompts(tiny_model_dir, tiny_tokenizer, bank, plain):
    """What the annotator trains on: a padded batch of forests after the few-shot block, which
    runs once; forests of different lengths, so padding is exercised too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    h = len(bank.head)
    dims = [[0, 5, 89], list(range(90)), [7]]
    forests = [
        pack_forest([(bank.prefix(p, c)[h:], [bank.questions[d] for d in ds])], position_offset=h)
        for p, c, ds in zip(POSTS, COMMENTS, dims)
    ]
    option_ids = prompts.option_token_ids(tiny_tokenizer)
    with torch.no_grad():
        logits = branch_logits(model, forests, tiny_tokenizer.pad_token_id, shared=bank.head)
    for got, ds, want in zip(logits, dims, plain["option_probs"], strict=True):
        np.testing.assert_allclose(torch.softmax(got[:, option_ids], -1).numpy(), want[ds], atol=1e-5)


def test_vllm_equals_plain_prompts(tiny_model_dir, tiny_tokenizer, bank, plain):
    engine = make_engine(cpu_engine(kind="vllm"), str(tiny_model_dir), tiny_tokenizer)
    out = label_batch(engine, bank, POSTS, COMMENTS)
    for a, b in zip(out["option_probs"], plain["option_probs"]):
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)  # renormalised over the three options
    assert all(np.array_equal(a, b) for a, b in zip(out["levels"], plain["levels"]))
    # The three option probabilities come back for a single prompt too.
    single = engine.score([ScoreRequest(bank.prefix(POSTS[0], COMMENTS[0]), bank.questions[:1])])
    assert single[0].shape == (1, 3)


def test_over_long_prompts_are_rejected_not_lost(tiny_model_dir, tiny_tokenizer, bank):
    engine = make_engine(cpu_engine(kind="transformers"), str(tiny_model_dir), tiny_tokenizer)
    out = label_batch(engine, bank, POSTS, [COMMENTS[0], COMMENTS[1] * 40], max_prompt_tokens=500)
    assert out["reject_reason"][0] is None and out["levels"][0].shape == (90,)
    assert out["reject_reason"][1].startswith("prompt_too_long") and out["levels"][1].size == 0
