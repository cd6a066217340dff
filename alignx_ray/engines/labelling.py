"""Labelling responses on the preference space with any scoring engine (paper §4.1, Prompt #1).

`QuestionBank` holds the token ids of the prompt segments (few-shot head, post, comment, one
branch per question), computed once per tokenizer and space; `label_batch` turns a batch of
responses into levels and option probabilities. The annotate stage, P~ inference in the
evaluation and the tiny annotator's training all label through it.
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


def label_batch(engine, bank: QuestionBank, posts, responses, max_prompt_tokens: int | None = None) -> dict:
    """Label a batch of responses; over-long prompts are marked with a reject reason."""
    requests = [bank.request(p, r) for p, r in zip(posts, responses)]
    longest_question = max(map(len, bank.questions))
    too_long = [
        max_prompt_tokens is not None and len(q.prefix) + longest_question > max_prompt_tokens for q in requests
    ]
    scored = iter(engine.score([q for q, bad in zip(requests, too_long) if not bad]))
    # vLLM says how many prompt tokens its prefix cache served; other engines share by design.
    cached_tokens = iter(getattr(engine, "cached_tokens", None) or [])
    n_dims = len(bank.questions)
    levels, probs, reasons, cached = [], [], [], []
    for q, bad in zip(requests, too_long):
        if bad:
            levels.append(np.zeros(0, np.uint8))
            probs.append(np.zeros((0, 3), np.float32))
            reasons.append(f"prompt_too_long: {len(q.prefix)} prefix tokens + questions > {max_prompt_tokens}")
            cached.append(None)
        else:
            p = next(scored)
            assert p.shape == (n_dims, 3)
            levels.append(levels_from_probs(p))
            probs.append(p.astype(np.float32))
            reasons.append(None)
            cached.append(next(cached_tokens, None))
    return {
        "levels": levels,
        "option_probs": probs,
        REJECT_COLUMN: reasons,
        "unique_tokens": [q.unique_tokens() for q in requests],
        "prompt_tokens": [len(q.prefix) * len(q.branches) + sum(map(len, q.branches)) for q in requests],
        "cached_tokens": cached,
    }
