"""Configuration of the evaluation of one method on one benchmark file (paper §6)."""

from __future__ import annotations

from typing import Literal

from alignx_ray.common.config import PoolConfig, Section
from alignx_ray.engines.scoring import EngineConfig

ProfileSource = Literal["auto", "field", "gold", "items", "infer"]


class EvalConfig(Section):
    """Evaluation of one method on one benchmark file.

    Variants: personas (persona types, each scored separately; `all` is the full P),
        history_sizes (persona items kept, seeded per example; None keeps all; Fig. 3 is
        [2, 4, 8, 16]), reversal (also score every variant with y_w and y_l swapped, Table 5).
    PBA: profile_source (`auto`, `field`, `gold`, `items`, `infer`: see
        `examples.profile_direction`); direction_engine annotates persona items for `infer`
        (its model None: the run's annotator), with direction_batch responses per call, in
        a Ray task holding direction_num_gpus GPUs.
    Scoring: dtype of both models (`auto`: bfloat16 on a GPU, float32 on the CPU); pool: the
        scorer actors (batch_size rows per call).
    max_examples: score the first n rows only (None: every row of the file).
    benchmarks: extra files the demo evaluates besides its AlignX_test.
    """

    personas: list[str] = ["ugc", "pair", "demo", "all"]
    history_sizes: list[int | None] = [None]
    reversal: bool = True
    profile_source: ProfileSource = "auto"
    direction_engine: EngineConfig = EngineConfig()
    direction_batch: int = 256
    direction_num_gpus: float = 1
    dtype: str = "auto"
    pool: PoolConfig = PoolConfig(batch_size=8, concurrency=(1, 8), num_cpus=8, num_gpus=1)
    max_examples: int | None = None
    benchmarks: list[str] = []
    seed: int = 0
