"""Typed configuration loaded from `configs/*.yaml`.

Code defaults are the paper's and production's (a GPU cluster); the CPU demo's values live
in `configs/demo.yaml` only. `--set a.b=value` on the command line overrides one field (value
parsed as YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict

from alignx_ray.common.space import SPACE, PreferenceSpace

Config = TypeVar("Config", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RayConfig(Section):
    """How to reach Ray.

    address: None starts a local instance (or joins the one `ray job submit` runs under).
    num_cpus: logical CPUs of a local instance (None: the machine's); Ray Data's checkpoint
        filter and the engine actors each hold one, so the demo asks for 4 on a 2-core machine.
    """

    address: str | None = None
    num_cpus: int | None = None


class PoolConfig(Section):
    """The Ray Data actor pool of one stage: every actor stage embeds one as `pool`.

    batch_size: rows per actor call (a response's 90 questions, or a pair's retries, always
        stay in one call).
    concurrency: (min, max) actors; Ray Data scales the pool between them with the backlog,
        and an autoscaling cluster adds nodes for the actors it cannot place.
    num_cpus / num_gpus: resources each actor holds (num_gpus = tensor_parallel_size for an
        engine on GPUs; the CPU build of vLLM uses num_cpus torch threads).
    resources: custom Ray resources each actor holds (e.g. {"engine": 1}: only nodes that
        offer it, such as one GPU node type of an autoscaling cluster, get the actors).
    max_restarts: how many times Ray restarts an actor whose process died (killed, its node
        pre-empted, its engine dead, a batch over `batch_timeout_s`); -1: without limit; 0: the
        first death fails the job.
    max_task_retries: how many times a batch whose actor died is sent again (to the restarted
        actor); -1: without limit. A batch is written once, whichever attempt finishes it.
    init_retries: actors whose constructor fails (a model path missing on a node) that are
        replaced before the job fails with the constructor's error.
    batch_timeout_s: a batch still running after this many seconds ends its actor's process,
        so that Ray retries the batch on a fresh actor (a hung engine); None: no limit.
    node_loss_reruns: how many times the stage runs again, skipping the rows it wrote, after a
        lost node failed it (outputs on that node that Ray could not rebuild while their actor
        restarted: ActorUnavailableError, ObjectLostError).
    """

    batch_size: int
    concurrency: tuple[int, int] = (1, 8)
    num_cpus: float = 1
    num_gpus: float = 0
    resources: dict[str, float] = {}
    max_restarts: int = 4
    max_task_retries: int = 4
    init_retries: int = 2
    batch_timeout_s: float | None = 1800
    node_loss_reruns: int = 3


class SpaceConfig(Section):
    """Extra dimensions appended to the official 90 (paper §6.3), as dimension records."""

    extra_dimensions: list[dict] = []

    def build(self) -> PreferenceSpace:
        return SPACE.extend(PreferenceSpace.from_records(self.extra_dimensions)) if self.extra_dimensions else SPACE


def resolve_local(path: str) -> str:
    """An existing local path made absolute (Ray workers run in another directory); URIs and
    model-store names unchanged."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def load_config(cls: type[Config], path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML (or nothing: all defaults), apply dotted `key=value` overrides, validate."""
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data = data or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return cls.model_validate(data)
