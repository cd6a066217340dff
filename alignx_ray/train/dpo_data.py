"""DPO training examples for the two AlignXpert methods (paper §5, Appendix B, C.2).

From one AlignX row: 0–4 UGC and 0–4 PAIR items are sampled (when both come out 0, 4 of
each, as far as the row has them), seeded by the example id, so every epoch, worker and
resumed run sees the same prompts.
- ICA: the task and the behaviour history (UGC items, PAIR items, demographic text) in
  context (Appendix B.2).
- PBA: the task and P~, the description of aggregate_directions over the sampled items'
  directions (Appendix B.1). The demographic text has no direction in the released data, so
  P~ is built from the behavioural items alone.
Both are rendered with the policy model's chat template; chosen / rejected are the responses.
"""

from __future__ import annotations

from typing import Literal

from alignx_ray.common import prompts, schema
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import SPACE, PreferenceSpace

Method = Literal["ica", "pba"]
MAX_ITEMS = 4


def sample_items(row: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """(UGC items, PAIR items) for one example: 0–4 of each, 4 of each when both draw 0."""
    rng = seeded_rng("dpo-items", seed, row["example_id"])
    ugc, pairs = row[schema.UGC] or [], row[schema.PAIR] or []
    n_ugc, n_pair = (int(rng.integers(0, MAX_ITEMS + 1)) for _ in range(2))
    if n_ugc == n_pair == 0:
        n_ugc = n_pair = MAX_ITEMS
    pick = lambda items, n: [items[i] for i in sorted(rng.permutation(len(items))[:n])]  # noqa: E731
    return pick(ugc, n_ugc), pick(pairs, n_pair)


def profile_text(ugc: list[dict], pairs: list[dict], space: PreferenceSpace = SPACE) -> str:
    """P~ (Appendix B.1): the sampled items' directions aggregated and described."""
    vectors = [item[schema.DIRECTION] for item in ugc + pairs]
    if not vectors:
        return ""
    return space.describe_direction(space.aggregate_directions(vectors))


def dpo_example(
    row: dict,
    method: Method,
    tokenizer,
    templates: prompts.PromptTemplates,
    seed: int = 0,
    space: PreferenceSpace = SPACE,
) -> dict:
    """{prompt, chosen, rejected, example_id} in the format of `method`."""
    ugc, pairs = sample_items(row, seed)
    if method == "ica":
        prompt = prompts.ica_prompt(
            tokenizer, templates, row[schema.PROMPT], ugc, pairs, row.get(schema.DEMOGRAPHIC) or ""
        )
    elif method == "pba":
        prompt = prompts.pba_prompt(tokenizer, templates, row[schema.PROMPT], profile_text(ugc, pairs, space))
    else:
        raise ValueError(f"unknown method {method!r}: use 'ica' or 'pba'")
    return {
        "prompt": prompt,
        "chosen": row[schema.CHOSEN],
        "rejected": row[schema.REJECTED],
        "example_id": row["example_id"],
    }
