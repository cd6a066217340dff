"""Labelling responses on the preference space with any scoring engine (paper §4.1, Prompt #1).

`QuestionBank` holds the token ids of the prompt segments (few-shot head, post, comment, one
branch per question), computed once per tokenizer and space; `label_batch` turns a batch of
responses into levels and option probabilities, or a reject reason per response (its prompts
too long, its option log-probs unusable). The annotate stage, P~ inference in the evaluation
and the tiny annotator's training all label through it.
"""

from __future__ import annotations

import numpy as np

from alignx_ray.common import prompts
from alignx_ray.common.schema import REJECT_COLUMN
from alignx_ray.common.space import OPTION_LEVELS, SPACE
from alignx_ray.engines.scoring import ScoreRequest

# Argmax option index -> level (the order of `OPTION_LEVELS`).
OPTION_INDEX_TO_LEVEL = np.array(OPTION_LEVELS, dtype=np.uint8)


class QuestionBank:
    """Token ids of every annotation segment, computed once per tokenizer and space."""

    def __init__(self, tokenizer, templates: prompts.PromptTemplates, space=SPACE):
        self.tokenizer = tokenizer
        self.layout = prompts.annotation_layout(tokenizer, templates, space)
        self.head = self.encode(self.layout.head)
        self.questions = [self.encode(self.layout.branch(prompts.format_question(d, templates))) for d in space]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prefix(self, post: str, comment: str) -> list[int]:
        return self.head + self.encode(self.layout.post_part(post)) + self.encode(self.layout.comment_part(comment))

    def request(self, post: str, comment: str, dims: list[int] | None = None) -> ScoreRequest:
        questions = self.questions if dims is None else [self.questions[d] for d in dims]
        return ScoreRequest(self.prefix(post, comment), questions)


def levels_from_probs(probs: np.ndarray) -> np.ndarray:
    """(..., 3) option probabilities -> (...) uint8 levels by argmax."""
    return OPTION_INDEX_TO_LEVEL[np.asarray(probs).argmax(-1)]


def option_probs_or_reason(logprobs: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """(questions, 3) option log-probs from an engine -> (probabilities renormalised over the
    options, None), or (None, reject reason) when one is NaN (engines write NaN for one they
    did not return) or infinite: an argmax over those would be a label from nothing."""
    logprobs = np.asarray(logprobs, np.float64)
    for bad, reason in (
        (np.isnan(logprobs), "nan_or_missing_option_logprob"),
        (np.isinf(logprobs), "infinite_option_logprob"),
    ):
        if bad.any():
            dimension, option = np.argwhere(bad)[0]
            where = f"first at dimension {dimension}, option {option + 1}"
            return None, f"{reason}: {bad.sum()} of {bad.size} option log-probs ({where})"
    weights = np.exp(logprobs - logprobs.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True), None


def prompt_limit(configured: int | None, engine) -> int | None:
    """The longest prompt a batch may send: the configured budget, capped by what the engine
    accepts (vLLM fails a whole batch for one prompt over its max_model_len)."""
    limits = [n for n in (configured, engine.max_prompt_tokens) if n is not None]
    return min(limits, default=None)


def label_batch(engine, bank: QuestionBank, posts, responses, max_prompt_tokens: int | None = None) -> dict:
    """Label a batch of responses. A response whose prompts are too long, or whose option
    log-probs are unusable, gets no levels and a reject reason; the others are labelled."""
    requests = [bank.request(p, r) for p, r in zip(posts, responses)]
    limit = prompt_limit(max_prompt_tokens, engine)
    longest_question = max(map(len, bank.questions))
    too_long = [limit is not None and len(q.prefix) + longest_question > limit for q in requests]
    scored = iter(engine.score([q for q, bad in zip(requests, too_long) if not bad]))
    # vLLM says how many prompt tokens its prefix cache served; other engines share by design.
    cached_tokens = iter(getattr(engine, "cached_tokens", None) or [])
    n_dims = len(bank.questions)
    levels, probs, reasons, cached = [], [], [], []
    for q, bad in zip(requests, too_long):
        if bad:
            p, reason, n_cached = None, f"prompt_too_long: {len(q.prefix)} prefix tokens + questions > {limit}", None
        else:
            logprobs = next(scored)
            assert logprobs.shape == (n_dims, 3)
            (p, reason), n_cached = option_probs_or_reason(logprobs), next(cached_tokens, None)
        levels.append(np.zeros(0, np.uint8) if p is None else levels_from_probs(p))
        probs.append(np.zeros((0, 3), np.float32) if p is None else p.astype(np.float32))
        reasons.append(reason)
        cached.append(n_cached)
    return {
        "levels": levels,
        "option_probs": probs,
        REJECT_COLUMN: reasons,
        "unique_tokens": [q.unique_tokens() for q in requests],
        "prompt_tokens": [len(q.prefix) * len(q.branches) + sum(map(len, q.branches)) for q in requests],
        "cached_tokens": cached,
    }
