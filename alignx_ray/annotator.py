"""The tiny annotator: a tiny model fine-tuned to read the demo's planted traits.

A random-weight model labels at random, and then nothing downstream of annotation means
anything. So the demo's annotator is the tiny model fine-tuned, on CPU in a few minutes, on
annotation prompts rendered by `alignx_ray.prompts` for generated threads of *other* seeds
than the demo's, with the planted answer as target. Training uses the same packed prefix
trees as scoring: one response's prefix once and many question branches, a loss at every
branch end. The result is cached per machine, keyed by everything that shapes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alignx_ray import prompts, synthetic
from alignx_ray.annotate import QuestionBank, label_batch
from alignx_ray.config import Section
from alignx_ray.engines import EngineConfig, make_engine
from alignx_ray.space import LEVEL_HIGH, LEVEL_LOW
from alignx_ray.tiny import TinyModelSpec, build_tiny_model, tokenizer_corpus
from alignx_ray.tree import branch_logits, pack_forest

# Level -> index of the answer option ('1' high, '2' low, '3' cannot reflect).
LEVEL_TO_OPTION_INDEX = {LEVEL_HIGH: 0, LEVEL_LOW: 1, 2: 2}
TRAIN_SEED_OFFSET = 1_000_003  # demo threads use small seeds; training and evaluation never do
EVAL_SEED_OFFSET = 2_000_003


class AnnotatorConfig(Section):
    """How the tiny annotator is built.

    model: the tiny model's shape (its seed is replaced by `seed`).
    Data: train_threads / eval_threads generated threads with traits planted on
        planted_dimensions (as the demo's threads). Besides its planted questions, each
        response is asked hard_negatives "cannot reflect" questions on dimensions it could
        have carried but does not (so the model must find the cue, not learn which questions
        are ever answered) and other_questions on dimensions never planted.
    Curriculum: first prompts cut to the comment and the question, at a constant lr (short
        sequences: the model finds the cue words fast). The search for them ends abruptly
        after a few hundred steps, at a step that varies with the seed, so this phase runs
        until the mean loss of the last `loss_window` steps is below comment_target_loss
        (at most comment_steps). Then prompt_steps on the full prompt it will serve, at
        prompt_lr with cosine decay: the cues are found, only the longer context is new.
    batch_size: responses per step. cache_dir: one folder per configuration.
    """

    seed: int = 0
    version: int = 4  # bump when the training code changes: it is part of the cache key
    model: TinyModelSpec = TinyModelSpec()
    planted_dimensions: tuple[int, ...] | None = synthetic.DEMO_PLANTED_DIMENSIONS
    train_threads: int = 400
    eval_threads: int = 24
    hard_negatives: int = 3
    other_questions: int = 2
    comment_steps: int = 750
    comment_target_loss: float = 0.22
    loss_window: int = 25
    prompt_steps: int = 60
    batch_size: int = 16
    lr: float = 3e-3
    prompt_lr: float = 1e-3
    warmup_steps: int = 20
    cache_dir: str = "~/.cache/alignx-ray/annotators"

    def spec(self) -> TinyModelSpec:
        return replace(self.model, seed=self.seed)

    def cache_key(self) -> str:
        """Changes with the config and the package data the model learns from (the annotation
        prompt, the dimension questions, the phrase bank)."""
        payload = json.dumps(self.model_dump(exclude={"cache_dir"}), sort_keys=True)
        payload += "".join(tokenizer_corpus()) + prompts.annotation_example(prompts.PromptTemplates())
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def training_examples(config: AnnotatorConfig, n_threads: int, seed: int) -> list[tuple[str, str, np.ndarray]]:
    """(post, comment, planted levels) for generated threads of one seed."""
    config = replace(synthetic.SyntheticConfig(), n_threads=n_threads, seed=seed,
                     planted_dimensions=config.planted_dimensions)
    return [(post, text, np.asarray(levels)) for post, text, levels in synthetic.iter_examples(config)]


def tree(bank: QuestionBank, post: str, comment: str, dims: list[int] | None = None, full_prompt: bool = True):
    """The packed tree of one response (a forest of one) as training runs it: after the
    prompt head (which `train` runs once per step), or without `full_prompt` the comment alone."""
    request = bank.request(post, comment, dims)
    if not full_prompt:
        return pack_forest([(bank.encode(bank.layout.comment_part(comment)), request.branches)])
    h = len(bank.head)
    return pack_forest([(request.prefix[h:], request.branches)], position_offset=h)


def label_accuracy(levels_true: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy of argmax labels against planted levels, overall and on planted dimensions."""
    option_of_level = np.vectorize(LEVEL_TO_OPTION_INDEX.get)(levels_true)
    correct = probs.argmax(-1) == option_of_level
    planted = levels_true != 2
    return {
        "accuracy": float(correct.mean()),
        "planted_accuracy": float(correct[planted].mean()) if planted.any() else float("nan"),
        "unplanted_accuracy": float(correct[~planted].mean()),
        "n_labels": int(correct.size),
        "n_planted": int(planted.sum()),
    }


def _lr_at(step: int, steps: int, peak: float, warmup: int, decay: bool) -> float:
    """Linear warm-up to `peak`, then constant or cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress)) if decay else peak


def train(model, bank: QuestionBank, examples, config: AnnotatorConfig, steps: int, full_prompt: bool,
          target_loss: float | None = None) -> list[float]:
    """Fine-tune on planted answers: each response's planted questions plus "cannot reflect" ones.
    With `target_loss`, stop early once the mean loss of the last `loss_window` steps is below it."""
    rng = np.random.default_rng(config.seed + int(full_prompt))
    option_ids = prompts.option_token_ids(bank.tokenizer)
    peak = config.prompt_lr if full_prompt else config.lr
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.0)
    plantable = np.zeros(len(bank.questions), bool)
    plantable[list(config.planted_dimensions or range(len(plantable)))] = True

    def questions(levels: np.ndarray) -> np.ndarray:
        absent = np.flatnonzero((levels == 2) & plantable)
        never = np.flatnonzero((levels == 2) & ~plantable)
        return np.concatenate([np.flatnonzero(levels != 2),
                               rng.choice(absent, min(len(absent), config.hard_negatives), replace=False),
                               rng.choice(never, min(len(never), config.other_questions), replace=False)])

    losses = []
    model.train()
    desc = f"tiny annotator ({'full prompts' if full_prompt else 'comment + question'})"
    progress = tqdm(range(steps), desc=desc, unit="step")
    for step in progress:
        batch = [examples[i] for i in rng.choice(len(examples), config.batch_size, replace=False)]
        trees, targets = [], []
        for post, comment, levels in batch:
            dims = rng.permutation(questions(levels)).tolist()
            trees.append(tree(bank, post, comment, dims, full_prompt))
            targets += [LEVEL_TO_OPTION_INDEX[int(levels[d])] for d in dims]
        # Over the three option tokens only: every engine reads them renormalised.
        shared = bank.head if full_prompt else None
        logits = torch.cat(branch_logits(model, trees, bank.tokenizer.pad_token_id, shared))[:, option_ids]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets))
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, peak, config.warmup_steps, decay=full_prompt)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        recent = float(np.mean(losses[-config.loss_window:]))
        progress.set_postfix(loss=f"{recent:.3f}", refresh=False)
        if target_loss is not None and len(losses) >= config.loss_window and recent < target_loss:
            break
    progress.close()
    model.eval()
    return losses


def build_annotator(config: AnnotatorConfig = AnnotatorConfig()) -> Path:
    """Return the cached annotator for this config, building it first when missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(config.cache_dir).expanduser() / f"annotator-s{config.seed}-v{config.version}-{config.cache_key()}"
    if (out / "annotator_report.json").exists():
        return out
    started = time.time()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(tmp, config.spec())
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    torch.manual_seed(config.seed)
    bank = QuestionBank(tokenizer, prompts.PromptTemplates())
    train_set = training_examples(config, config.train_threads, TRAIN_SEED_OFFSET + config.seed)
    comment_losses = train(model, bank, train_set, config, config.comment_steps, full_prompt=False,
                           target_loss=config.comment_target_loss)
    losses = comment_losses + train(model, bank, train_set, config, config.prompt_steps, full_prompt=True)
    model.save_pretrained(tmp)
    eval_set = training_examples(config, config.eval_threads, EVAL_SEED_OFFSET + config.seed)
    engine = make_engine(EngineConfig(kind="transformers"), str(tmp), tokenizer)
    labelled = label_batch(engine, bank, [e[0] for e in eval_set], [e[1] for e in eval_set])
    report = {
        **label_accuracy(np.stack([lv for _, _, lv in eval_set]), np.stack(labelled["option_probs"])),
        "eval_responses": len(eval_set),
        "train_responses": len(train_set),
        "comment_steps_run": len(comment_losses),
        "final_loss": float(np.mean(losses[-config.loss_window:])),
        "seconds": round(time.time() - started, 1),
        "config": config.model_dump(),
        "spec": asdict(config.spec()),
    }
    (tmp / "annotator_report.json").write_text(json.dumps(report, indent=1))
    tmp.rename(out)
    return out
