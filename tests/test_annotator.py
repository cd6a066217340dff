"""The tiny annotator reads the planted traits of threads it never saw."""

import json
from dataclasses import replace

import numpy as np
import pytest
from cpu import cpu_engine
from transformers import AutoTokenizer

from alignx_ray.common import prompts
from alignx_ray.engines.labelling import QuestionBank, label_batch
from alignx_ray.engines.scoring import make_engine
from alignx_ray.fixtures import synthetic
from alignx_ray.fixtures.tiny_annotator import label_accuracy

UNSEEN_SEED = 424242  # neither the demo's, nor the annotator's training or evaluation seeds


@pytest.fixture(scope="module")
def unseen_accuracy(annotator_dir):
    tokenizer = AutoTokenizer.from_pretrained(annotator_dir)
    engine = make_engine(cpu_engine(kind="transformers"), str(annotator_dir), tokenizer)
    bank = QuestionBank(tokenizer, prompts.PromptTemplates())
    examples = list(synthetic.iter_examples(replace(synthetic.SyntheticConfig(), n_threads=8, seed=UNSEEN_SEED)))
    out = label_batch(engine, bank, [e[0] for e in examples], [e[1] for e in examples])
    return label_accuracy(np.array([e[2] for e in examples]), np.stack(out["option_probs"]))


def test_accuracy_against_planted_levels_on_unseen_threads(unseen_accuracy, annotator_dir):
    assert unseen_accuracy["n_planted"] > 50
    assert unseen_accuracy["accuracy"] >= 0.9
    # The build's own report (other unseen threads) agrees.
    report = json.loads((annotator_dir / "annotator_report.json").read_text())
    assert report["accuracy"] >= 0.9 and report["eval_responses"] > 100
    assert abs(report["accuracy"] - unseen_accuracy["accuracy"]) < 0.05


def test_planted_dimensions_are_read(unseen_accuracy):
    assert unseen_accuracy["planted_accuracy"] >= 0.9  # chance on a planted dimension is 1/3
    assert unseen_accuracy["unplanted_accuracy"] >= 0.9  # and it does not see traits that are not there
