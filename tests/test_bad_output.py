"""Bad engine output and cut input files: a response the engine gave NaN, infinite or no
option log-probs for, or whose prompt is over the engine's limit, is rejected alone with its
reason while its batch is labelled; a parquet file cut short stops ingest naming the file."""

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cpu import DEMO, cpu_engine

from alignx_ray.build.readers import read_records
from alignx_ray.common.prompts import EXAMPLE_ANSWERS, PromptTemplates
from alignx_ray.common.schema import REJECT_COLUMN
from alignx_ray.common.space import OPTION_LEVELS, SPACE, PreferenceSpace
from alignx_ray.engines.labelling import QuestionBank, label_batch, levels_from_probs, option_probs_or_reason
from alignx_ray.engines.scoring import make_engine

pytestmark = pytest.mark.faults

POSTS = ["Any tips for a first marathon?", "Which houseplants survive a dark flat?", "Any tips for a first marathon?"]
COMMENTS = [
    "Start slow and enjoy the crowd, honestly the best day ever!",
    "Snake plants. Zamioculcas too. Forget about them for weeks.",
    "Hydrate early; the wall at kilometre thirty is real.",
]


@pytest.fixture(scope="module")
def bank(tiny_tokenizer):
    """The few-shot example's three dimensions only: what is tested holds per response, at a
    thirtieth of the cost."""
    few = PreferenceSpace(d for d in SPACE if d.name in dict(EXAMPLE_ANSWERS))
    return QuestionBank(tiny_tokenizer, PromptTemplates(), few)


def test_usable_logprobs_are_renormalised_over_the_options():
    probs = np.array([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    got, reason = option_probs_or_reason(np.log(probs) + [[-3.0], [1.5]])  # a constant per row aside
    assert reason is None
    np.testing.assert_allclose(got, probs)
    assert levels_from_probs(got).tolist() == [OPTION_LEVELS[2], OPTION_LEVELS[0]]


@pytest.mark.parametrize(
    "value, reason",
    [(math.nan, "nan_or_missing_option_logprob"), (math.inf, "infinite_option_logprob"), (-math.inf, "infinite")],
)
def test_unusable_logprobs_give_a_reason_not_a_label(value, reason):
    logprobs = np.log(np.full((90, 3), 1 / 3))
    logprobs[7, 1] = logprobs[40, 2] = value
    probs, why = option_probs_or_reason(logprobs)
    assert probs is None
    assert why.startswith(reason) and why.endswith(": 2 of 270 option log-probs (first at dimension 7, option 2)")


@pytest.mark.parametrize("kind", ["transformers-plain", "transformers"])
def test_a_response_the_engine_scores_nan_is_rejected_alone(kind, tiny_model_dir, tiny_tokenizer, bank):
    """A real model whose embedding of one token only the second response has is NaN: that
    response's log-probs are NaN, the others' are untouched (one prompt per branch; in a packed
    forest, where the NaN reaches the whole pack, by scoring that pack again response by response)."""
    engine = make_engine(cpu_engine(kind=kind), str(tiny_model_dir), tiny_tokenizer)
    clean = label_batch(engine, bank, POSTS, COMMENTS)
    elsewhere = {t for q in bank.questions for t in q} | {t for i in (0, 2) for t in bank.prefix(POSTS[i], COMMENTS[i])}
    token = next(t for t in bank.prefix(POSTS[1], COMMENTS[1]) if t not in elsewhere)
    with torch.no_grad():
        engine.model.get_input_embeddings().weight[token] = math.nan
    out = label_batch(engine, bank, POSTS, COMMENTS)
    assert out[REJECT_COLUMN][0] is None and out[REJECT_COLUMN][2] is None
    assert out[REJECT_COLUMN][1].startswith("nan_or_missing_option_logprob: 9 of 9")
    assert out["levels"][1].size == 0 and out["option_probs"][1].shape == (0, 3)
    for i in (0, 2):
        assert np.array_equal(out["levels"][i], clean["levels"][i])
        np.testing.assert_allclose(out["option_probs"][i], clean["option_probs"][i], atol=1e-6)


def test_a_prompt_over_max_model_len_is_rejected_alone_by_vllm(tiny_model_dir, tiny_tokenizer, bank):
    """vLLM fails a whole call for one prompt that leaves no room for its answer token; with the
    budget equal to max_model_len (as the configs set them) or unset, that response is rejected
    and the rest of its batch labelled."""
    comments = [COMMENTS[0], COMMENTS[1] * 8]
    longest = max(map(len, bank.questions))
    model_len = len(bank.prefix(POSTS[1], comments[1])) + longest  # the long one's longest prompt
    assert len(bank.prefix(POSTS[0], comments[0])) + longest < model_len - 1
    vllm = {**DEMO.annotate.engine.vllm, "max_model_len": model_len}
    engine = make_engine(cpu_engine(kind="vllm", vllm=vllm), str(tiny_model_dir), tiny_tokenizer)
    for budget in (model_len, None):
        out = label_batch(engine, bank, POSTS[:2], comments, max_prompt_tokens=budget)
        assert out[REJECT_COLUMN][0] is None and out["levels"][0].shape == (3,)
        assert out[REJECT_COLUMN][1].endswith(f"> {model_len - 1}") and out["levels"][1].size == 0


def test_a_parquet_file_cut_short_is_an_error_naming_it(tmp_path):
    """Its footer is lost, so how many rows it held is unknown: no reject could account for them."""
    (tmp_path / "a.jsonl").write_text('{"thread_id": "g", "post": "p", "responses": [{"text": "r"}]}\n')
    rows = [{"thread_id": f"t{i}", "post": "p", "responses": [{"text": "r"}]} for i in range(50)]
    cut = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(rows), cut)
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(f"{cut}: unreadable parquet file")):
        list(read_records(str(tmp_path)))
