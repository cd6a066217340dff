"""AlignX rows for tests: persona items whose directions are known."""

import numpy as np

from alignx_ray.common import schema
from alignx_ray.common.space import NEUTRAL, SPACE

D = len(SPACE)


def example_consistent(direction: np.ndarray, personas: list[np.ndarray]) -> bool:
    """The paper's filter, one example at a time (the oracle of the build's vectorised one):
    some dimension is non-neutral in P and every present persona's vote equals P there."""
    agree = direction != NEUTRAL
    for persona in personas:
        agree &= persona == direction
    return bool(agree.any())


def direction(**dims) -> list[float]:
    v = [0.5] * D
    for key, value in dims.items():
        v[int(key[1:])] = value
    return v


def alignx_row(i: int, n_ugc=6, n_pair=6) -> dict:
    return {
        "prompt": f"Post {i}: what should I cook tonight?",
        "chosen": f"Try a spicy curry, friend {i}.",
        "rejected": f"Order takeout {i}.",
        schema.DIRECTION: direction(d2=1.0),
        schema.DEMOGRAPHIC: "An outgoing cook.",
        schema.UGC: [
            {"prompt": f"u-post {j}", "comment": f"u-comment {j}", schema.DIRECTION: direction(d2=1.0)}
            for j in range(n_ugc)
        ],
        schema.PAIR: [
            {
                "prompt": f"p-post {j}",
                "chosen": f"good {j}",
                "rejected": f"bad {j}",
                schema.DIRECTION: direction(d2=1.0, d3=0.0 if j % 2 else 0.5),
            }
            for j in range(n_pair)
        ],
        "example_id": f"ex-{i}",
        "split": "train",
    }
